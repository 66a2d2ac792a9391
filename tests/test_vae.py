"""AutoencoderKL: parity with diffusers, the released configuration's size and names, latent helpers,
precision handling and input errors."""
import dataclasses
import re

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from mindspore.nn.utils import no_init_parameters

from pangu_draw_ms.config import ConfigError, VAEConfig
from pangu_draw_ms.io.diffusers_vae import vae_from_diffusers
from pangu_draw_ms.io.state import load_state
from pangu_draw_ms.models.layers import count_parameters
from pangu_draw_ms.models.vae import AutoencoderKL

from helpers import assert_close, randomize_torch_module, torch_state_numpy

# Three levels so that two decoder levels have identical shapes: a wrong up_blocks -> up index
# mapping then loads without error and only shows up numerically.
TINY = VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=8,
                 latent_channels=4, scaling_factor=0.13025)
IMAGE_SHAPE = (2, 3, 24, 16)  # H != W catches transposed axes
LATENT_SHAPE = (2, 4, 6, 4)


def diffusers_reference(config: VAEConfig) -> DiffusersAutoencoderKL:
    levels = len(config.channel_mult)
    return DiffusersAutoencoderKL(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.base_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks, latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups, scaling_factor=config.scaling_factor)


@pytest.fixture(scope="module")
def reference():
    model = diffusers_reference(TINY).eval()
    randomize_torch_module(model, seed=0)
    return model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.0, 1.0, IMAGE_SHAPE).astype(np.float32)
    latents = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    return images, latents


def ours_from(reference_model, config=TINY, dtype=ms.float32) -> AutoencoderKL:
    vae = AutoencoderKL(config, dtype=dtype)
    load_state(vae, vae_from_diffusers(torch_state_numpy(reference_model)))
    return vae


def test_parity_with_diffusers(ms_mode, reference, inputs):
    images, latents = inputs
    vae = ours_from(reference)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(images)).latent_dist
        ref_image = reference.decode(torch.from_numpy(latents)).sample.numpy()
        ref_reconstruction = reference(torch.from_numpy(images)).sample.numpy()

    mean, logvar = vae.encode(ms.Tensor(images))
    assert_close(mean.asnumpy(), posterior.mean.numpy(), what=f"{ms_mode} encode mean")
    assert_close(logvar.asnumpy(), posterior.logvar.numpy(), what=f"{ms_mode} encode logvar")
    assert_close(vae.decode(ms.Tensor(latents)).asnumpy(), ref_image, what=f"{ms_mode} decode")
    assert_close(vae(ms.Tensor(images)).asnumpy(), ref_reconstruction, what=f"{ms_mode} reconstruction")


def test_logvar_is_clamped(reference, inputs):
    """Push the log-variance half of quant_conv's bias far out of [-30, 20] in both directions."""
    images, _ = inputs
    vae = ours_from(reference)
    bias = vae.quant_conv.bias.asnumpy().copy()
    bias[TINY.latent_channels:] = np.array([1e3, -1e3] * (TINY.latent_channels // 2), np.float32)
    vae.quant_conv.bias.set_data(ms.Tensor(bias))
    _, logvar = vae.encode(ms.Tensor(images))
    logvar = logvar.asnumpy()
    np.testing.assert_array_equal(logvar[:, 0::2], 20.0)
    np.testing.assert_array_equal(logvar[:, 1::2], -30.0)


def test_latent_helpers_apply_scaling_factor(reference, inputs):
    images, latents = inputs
    vae = ours_from(reference)
    s = TINY.scaling_factor
    mean, logvar = (t.asnumpy() for t in vae.encode(ms.Tensor(images)))

    assert_close(vae.encode_to_latents(ms.Tensor(images)).asnumpy(), s * mean, rel=1e-5, what="mode latents")
    noise = np.random.default_rng(1).standard_normal(mean.shape).astype(np.float32)
    sampled = vae.encode_to_latents(ms.Tensor(images), noise=ms.Tensor(noise)).asnumpy()
    assert_close(sampled, s * (mean + np.exp(0.5 * logvar) * noise), rel=1e-5, what="sampled latents")

    decoded = vae.decode_latents(ms.Tensor(latents)).asnumpy()
    assert_close(decoded, vae.decode(ms.Tensor(latents / s)).asnumpy(), rel=1e-5, what="decode_latents")


def test_force_fp32_overrides_fp16_compute(reference, inputs):
    images, latents = inputs
    fp32 = ours_from(reference)
    forced = ours_from(reference, dtype=ms.float16)
    assert forced.dtype == ms.float32
    mean, logvar = forced.encode(ms.Tensor(images, ms.float16))
    image = forced.decode(ms.Tensor(latents))
    assert mean.dtype == logvar.dtype == image.dtype == ms.float32
    ref_mean, ref_logvar = fp32.encode(ms.Tensor(images, ms.float16))
    np.testing.assert_array_equal(mean.asnumpy(), ref_mean.asnumpy())
    np.testing.assert_array_equal(logvar.asnumpy(), ref_logvar.asnumpy())
    np.testing.assert_array_equal(image.asnumpy(), fp32.decode(ms.Tensor(latents)).asnumpy())

    # Without force_fp32 the requested dtype is used.
    unforced = AutoencoderKL(dataclasses.replace(TINY, force_fp32=False), dtype=ms.float16)
    assert unforced.dtype == ms.float16
    assert {p.dtype for p in unforced.get_parameters()} == {ms.float32}  # weights stay float32


def test_released_config_size_and_sgm_names():
    config = VAEConfig()
    with no_init_parameters():
        vae = AutoencoderKL(config)
    assert count_parameters(vae) == 83_653_863
    shapes = {p.name: tuple(p.shape) for p in vae.get_parameters()}
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.1.norm1.gamma": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.norm.beta": (512,),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.mid.block_2.norm2.gamma": (512,),
        "encoder.norm_out.gamma": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.norm2.beta": (128,),
        "decoder.norm_out.gamma": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {name: shapes.get(name) for name in expected} == expected
    assert not any(name.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample")) for name in shapes)

    sgm_name = re.compile(
        r"(quant_conv|post_quant_conv"
        r"|(encoder|decoder)\.(conv_in|conv_out|norm_out"
        r"|mid\.(block_[12]\.(norm1|conv1|norm2|conv2)|attn_1\.(norm|q|k|v|proj_out))"
        r"|(down|up)\.\d\.(block\.\d\.(norm1|conv1|norm2|conv2|nin_shortcut)|downsample\.conv|upsample\.conv)))"
        r"\.(weight|bias|gamma|beta)")
    assert [n for n in shapes if not sgm_name.fullmatch(n)] == []


def test_mapping_covers_the_released_diffusers_layout():
    """Every entry of the SDXL-sized diffusers VAE maps onto exactly our parameters, with our shapes."""
    config = VAEConfig()
    with torch.device("meta"):
        reference_model = diffusers_reference(config)
    # Zero-stride stand-ins: shapes without memory.
    state = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in reference_model.state_dict().items()}
    converted = vae_from_diffusers(state)
    with no_init_parameters():
        vae = AutoencoderKL(config)
    assert {k: v.shape for k, v in converted.items()} == {p.name: tuple(p.shape) for p in vae.get_parameters()}


def test_mapping_accepts_legacy_attention_names(reference):
    state = torch_state_numpy(reference)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def legacy(name):
        for new, old in legacy_names.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        return name

    legacy_state = {legacy(k): v for k, v in state.items()}
    assert legacy_state.keys() != state.keys()
    converted, converted_legacy = vae_from_diffusers(state), vae_from_diffusers(legacy_state)
    assert converted.keys() == converted_legacy.keys()
    for name in converted:
        np.testing.assert_array_equal(converted_legacy[name], converted[name])


def test_mapping_rejects_foreign_and_duplicate_entries(reference):
    state = torch_state_numpy(reference)
    with pytest.raises(ValueError, match=r"not diffusers AutoencoderKL weights: vae\.encoder\.conv_in\.weight"):
        vae_from_diffusers({"vae.encoder.conv_in.weight": state["encoder.conv_in.weight"]})
    duplicated = dict(state)
    duplicated["encoder.mid_block.attentions.0.query.weight"] = state["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ValueError, match="encoder.mid.attn_1.q.weight"):
        vae_from_diffusers(duplicated)


def test_bad_inputs_raise():
    vae = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match=r"images of shape \(batch, 3, height, width\), got shape \(2, 4, 24, 16\)"):
        vae.encode(ms.Tensor(np.zeros((2, 4, 24, 16), np.float32)))
    with pytest.raises(ValueError, match=r"images of shape .* got shape \(3, 24, 16\)"):
        vae.encode_to_latents(ms.Tensor(np.zeros((3, 24, 16), np.float32)))
    with pytest.raises(ValueError, match="image size 24x18 .* not divisible by the downsample factor 4"):
        vae.encode(ms.Tensor(np.zeros((2, 3, 24, 18), np.float32)))
    with pytest.raises(ValueError, match=r"decode expects latents of shape \(batch, 4, height, width\)"):
        vae.decode(ms.Tensor(np.zeros((2, 8, 6, 4), np.float32)))
    with pytest.raises(ValueError, match=r"decode_latents expects latents of shape \(batch, 4, height, width\)"):
        vae.decode_latents(ms.Tensor(np.zeros((2, 3, 6, 4), np.float32)))
    with pytest.raises(ValueError, match=r"noise has shape \(2, 4, 3, 3\) but the latents have shape \(2, 4, 6, 4\)"):
        vae.encode_to_latents(ms.Tensor(np.zeros(IMAGE_SHAPE, np.float32)),
                              noise=ms.Tensor(np.zeros((2, 4, 3, 3), np.float32)))
    with pytest.raises(TypeError, match="needs a VAEConfig"):
        AutoencoderKL({"base_channels": 16})
    with pytest.raises(ConfigError, match="vae.latent_channels must be >= 1, got 0"):
        VAEConfig(latent_channels=0)
