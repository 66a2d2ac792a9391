"""UNet: parity with diffusers UNet2DConditionModel (text_time addition), the released layout and size."""
import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

from pangu_draw_ms.config import UNetConfig
from pangu_draw_ms.io.diffusers_unet import unet_from_diffusers
from pangu_draw_ms.io.state import load_state
from pangu_draw_ms.models import layers as L
from pangu_draw_ms.models.unet import UNetModel

from helpers import BUCKET_DIM, CONTEXT, POOLED, SD15_LIKE, SDXL_LIKE, assert_close, diffusers_unet, torch_state_numpy

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

@pytest.mark.parametrize("config", [SDXL_LIKE, SD15_LIKE], ids=["sdxl_like", "sd15_like"])
def test_unet_matches_diffusers(config, ms_mode, rng):
    reference = diffusers_unet(config)
    ours = UNetModel(config)
    report = load_state(ours, unet_from_diffusers(torch_state_numpy(reference), config), what="diffusers UNet")
    assert report.ok and len(report.loaded) == len(list(ours.get_parameters()))

    x = rng.standard_normal((2, 4, 16, 24)).astype(np.float32)
    t = np.array([999.0, 37.0], np.float32)
    context = rng.standard_normal((2, 7, CONTEXT)).astype(np.float32)
    pooled = rng.standard_normal((2, POOLED)).astype(np.float32)
    bucket = np.array([5.0, 9.0], np.float32)

    kwargs = {}
    if config.adm_in_channels is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(pooled),
                                       "time_ids": torch.from_numpy(bucket[:, None])}
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context),
                             **kwargs).sample.numpy()
    y = np.concatenate([pooled, L.sinusoidal_embedding(ms.Tensor(bucket), BUCKET_DIM).asnumpy()], axis=1)
    got = ours(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y)).asnumpy()
    assert_close(got, expected, rel=1e-4, what=f"UNet eps ({ms_mode})")


def test_sinusoidal_embedding_matches_diffusers_timesteps():
    from diffusers.models.embeddings import Timesteps

    positions = np.array([0, 1, 5, 10, 999], np.float32)
    for dim in (16, 256, 320):
        expected = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(positions)).numpy()
        # float32 phases reach 999 rad, where one rounding step of a frequency moves sin/cos by ~6e-5.
        assert_close(L.sinusoidal_embedding(ms.Tensor(positions), dim).asnumpy(), expected, rel=1e-4,
                     what=f"sinusoidal({dim})")
    small = np.array([0, 1, 2, 3], np.float32)
    expected = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(small)).numpy()
    assert_close(L.sinusoidal_embedding(ms.Tensor(small), 256).asnumpy(), expected, rel=1e-6,
                 what="sinusoidal(bucket ids)")


def test_released_unet_size_and_layout():
    with no_init_parameters():
        unet = UNetModel(UNetConfig())
    shapes = {p.name: tuple(p.shape) for p in unet.get_parameters()}
    assert L.count_parameters(unet) == 2_565_825_284
    expected = {
        "time_embed.0.weight": (1280, 320),
        "label_emb.0.0.weight": (1280, 1536),
        "label_emb.0.2.bias": (1280,),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.gamma": (320,),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
        "middle_block.1.transformer_blocks.9.norm3.beta": (1280,),
        "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.3.1.proj_in.weight": (640, 640),
        "out.0.gamma": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, f"{name}: {shapes.get(name)} != {shape}"
    assert not any(".attn" in n for n in shapes
                   if n.startswith(("input_blocks.1.", "input_blocks.2.", "output_blocks.6.")))


def test_unet_rejects_latents_not_divisible_by_downsampling(rng):
    unet = UNetModel(SD15_LIKE)
    x = ms.Tensor(rng.standard_normal((1, 4, 15, 16)).astype(np.float32))
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(x, ms.Tensor(np.array([1.0], np.float32)), ms.Tensor(np.zeros((1, 3, CONTEXT), np.float32)),
             ms.Tensor(np.zeros((1,), np.float32)))
