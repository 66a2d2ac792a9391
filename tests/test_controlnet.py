"""ControlNet: parity with diffusers ControlNetModel (weights through save_pretrained and our loader), the UNet
taking its residuals, the config and key mappings, the released-size layout, input errors."""
import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

from pangu_draw_ms.config import ConfigError, ControlNetConfig, UNetConfig
from pangu_draw_ms.io.diffusers_controlnet import (
    controlnet_config_from_diffusers,
    controlnet_from_diffusers,
    diffusers_controlnet_kwargs,
)
from pangu_draw_ms.io.layouts import load_component
from pangu_draw_ms.models import layers as L
from pangu_draw_ms.models.controlnet import ControlNet
from pangu_draw_ms.models.unet import UNetModel

from helpers import (
    BUCKET_DIM,
    CONTEXT,
    POOLED,
    SD15_LIKE,
    SDXL_LIKE,
    assert_close,
    diffusers_unet,
    randomize_torch_module,
    torch_state_numpy,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Two hint levels: the control image is 2x the latent size (8x in the released configuration).
HINT = (4, 8)
LATENT = (2, 4, 8, 8)


def diffusers_controlnet(config: ControlNetConfig):
    model = diffusers.ControlNetModel(**diffusers_controlnet_kwargs(config, addition_time_embed_dim=BUCKET_DIM)).eval()
    randomize_torch_module(model, seed=3)  # zero convs included: a zero-initialised model would hide mistakes
    return model


def inputs(config: UNetConfig, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(LATENT).astype(np.float32)
    hint = rng.uniform(-1, 1, (LATENT[0], 3, LATENT[2] * 2, LATENT[3] * 2)).astype(np.float32)
    t = np.array([999.0, 37.0], np.float32)
    context = rng.standard_normal((2, 7, CONTEXT)).astype(np.float32)
    pooled = rng.standard_normal((2, POOLED)).astype(np.float32)
    bucket = np.array([5.0, 9.0], np.float32)
    y = np.concatenate([pooled, L.sinusoidal_embedding(ms.Tensor(bucket), BUCKET_DIM).asnumpy()], axis=1)
    added = {}
    if config.adm_in_channels is not None:
        added["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(pooled),
                                      "time_ids": torch.from_numpy(bucket[:, None])}
    return x, hint, t, context, y, added


@pytest.mark.parametrize("unet_config", [SDXL_LIKE, SD15_LIKE], ids=["sdxl_like", "sd15_like"])
def test_controlnet_and_controlled_unet_match_diffusers(unet_config, ms_mode, tmp_path):
    config = ControlNetConfig(unet=unet_config, hint_channels=HINT)
    reference = diffusers_controlnet(config)
    reference.save_pretrained(tmp_path / "controlnet")
    controlnet = ControlNet(config)
    report = load_component(controlnet, str(tmp_path / "controlnet"))
    assert report.layout == "diffusers" and report.ok and len(report.loaded) == len(list(controlnet.get_parameters()))

    x, hint, t, context, y, added = inputs(unet_config)
    with torch.no_grad():
        down, mid = reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context),
                              torch.from_numpy(hint),
                              conditioning_scale=0.7, return_dict=False, **added)
    residuals = controlnet(ms.Tensor(x), ms.Tensor(hint), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y), 0.7)
    assert len(residuals) == len(down) + 1
    for i, (ours, expected) in enumerate(zip(residuals, list(down) + [mid])):
        assert_close(ours.asnumpy(), expected.numpy(), what=f"residual {i} ({ms_mode})")

    unet_reference = diffusers_unet(unet_config)
    unet = UNetModel(unet_config)
    load_component(unet, _saved(unet_reference, tmp_path / "unet"))
    with torch.no_grad():
        expected = unet_reference(torch.from_numpy(x), torch.from_numpy(t),
                                  encoder_hidden_states=torch.from_numpy(context),
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                  **added).sample.numpy()
        plain = unet_reference(torch.from_numpy(x), torch.from_numpy(t),
                               encoder_hidden_states=torch.from_numpy(context),
                               **added).sample.numpy()
    got = unet(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y), residuals).asnumpy()
    assert_close(got, expected, what=f"controlled UNet ({ms_mode})")
    assert np.abs(expected - plain).max() > 1e-2 * np.abs(plain).max()  # the residuals matter


def _saved(model, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


def test_config_and_names_round_trip_through_diffusers():
    for unet_config in (SDXL_LIKE, SD15_LIKE):
        config = ControlNetConfig(unet=unet_config, hint_channels=HINT, conditioning_channels=1)
        reference = diffusers.ControlNetModel(**diffusers_controlnet_kwargs(config, BUCKET_DIM))
        assert controlnet_config_from_diffusers(reference.config) == config
        with no_init_parameters():
            ours = ControlNet(config)
        mapped = controlnet_from_diffusers(torch_state_numpy(reference), config)
        assert {k: v.shape for k, v in mapped.items()} == {p.name: tuple(p.shape) for p in ours.get_parameters()}


def test_released_size_controlnet_matches_diffusers_parameter_count():
    config = ControlNetConfig(unet=UNetConfig())
    with no_init_parameters():
        ours = ControlNet(config)
    with torch.device("meta"):
        reference = diffusers.ControlNetModel(**diffusers_controlnet_kwargs(config))
    assert L.count_parameters(ours) == sum(p.numel() for p in reference.parameters())
    names = {p.name for p in ours.get_parameters()}
    # sgm/cldm names: the hint stack's convs at even indices, one zero conv per input block.
    assert {f"input_hint_block.{i}.weight" for i in range(0, 16, 2)} <= names
    assert "zero_convs.8.0.weight" in names and "zero_convs.9.0.weight" not in names
    assert "middle_block_out.0.bias" in names and not any(n.startswith(("output_blocks", "out.")) for n in names)


def test_fresh_controlnet_leaves_the_unet_unchanged():
    config = ControlNetConfig(unet=SD15_LIKE, hint_channels=HINT)
    x, hint, t, context, y, _ = inputs(SD15_LIKE)
    residuals = ControlNet(config)(ms.Tensor(x), ms.Tensor(hint), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y))
    assert all(not r.asnumpy().any() for r in residuals)


def test_bad_inputs_raise():
    config = ControlNetConfig(unet=SD15_LIKE, hint_channels=HINT)
    x, hint, t, context, y, _ = inputs(SD15_LIKE)
    with pytest.raises(ValueError, match=r"latents 8x8 need a 16x16 image, got 8x8"):
        ControlNet(config)(ms.Tensor(x), ms.Tensor(hint[:, :, :8, :8]), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y))
    residuals = tuple(ms.Tensor(np.zeros((2, 1, 1, 1), np.float32)) for _ in range(3))
    with pytest.raises(ValueError, match="got 3 ControlNet residuals; this UNet takes 5"):
        UNetModel(SD15_LIKE)(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y), residuals)
    with pytest.raises(TypeError, match="needs a ControlNetConfig"):
        ControlNet(SD15_LIKE)
    with pytest.raises(ConfigError, match="hint_channels must list at least one width"):
        ControlNetConfig(hint_channels=())
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order 'bgr' is not supported"):
        controlnet_config_from_diffusers(dict(diffusers_controlnet_kwargs(config),
                                              controlnet_conditioning_channel_order="bgr"))
