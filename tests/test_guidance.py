"""Classifier-free + style guidance: the combination formula, one batched call, rescale parity."""
import numpy as np
import pytest

from pangu_draw_ms.diffusion.denoiser import Conditioning
from pangu_draw_ms.diffusion.guidance import GuidanceBranch, GuidedDenoiser, guidance_weights


class ContextModel:
    """eps = z * mean(context) per sample: distinct per branch; records every call's batch size."""

    def __init__(self):
        self.batches = []

    def __call__(self, z, t, cond):
        self.batches.append(z.shape[0])
        return z * cond.context.mean(axis=(1, 2))[:, None, None, None]


def branch(name, value, weight, batch=2):
    return GuidanceBranch(name, Conditioning(np.full((batch, 3, 4), value, np.float32), None), weight)


def test_style_guidance_formula_in_one_batched_call(rng):
    s, s_aesthetic, s_anime = 6.0, 4.0, 1.5
    w = guidance_weights(s, {"aesthetic": s_aesthetic, "anime": s_anime, "photography": 0.0})
    assert "photography" not in w
    values = {"uncond": 0.5, "cond": 2.0, "aesthetic": 3.0, "anime": -1.0}
    model = ContextModel()
    denoiser = GuidedDenoiser(model, [branch(n, values[n], w[n]) for n in w])
    z = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    eps = denoiser(z, 500)
    assert model.batches == [8]  # four branches x batch 2, one UNet call
    e = {n: z * v for n, v in values.items()}
    expected = e["uncond"] + s * (e["cond"] - e["uncond"]) + s_aesthetic * (e["aesthetic"] - e["cond"]) \
        + s_anime * (e["anime"] - e["cond"])
    np.testing.assert_allclose(eps, expected, rtol=1e-5, atol=1e-5)


def test_scale_one_skips_the_unconditional_branch(rng):
    model = ContextModel()
    w = guidance_weights(1.0, {})
    denoiser = GuidedDenoiser(model, [branch(n, 1.0, w[n]) for n in w])
    denoiser(rng.standard_normal((2, 4, 3, 3)).astype(np.float32), 10)
    assert model.batches == [2]


def test_guidance_rescale_matches_diffusers(rng):
    torch = pytest.importorskip("torch")
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    w = guidance_weights(7.5, {})
    values = {"uncond": 0.3, "cond": 1.7}
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ours = GuidedDenoiser(ContextModel(), [branch(n, values[n], w[n]) for n in w], guidance_rescale=0.7)(z, 100)
    uncond, cond = torch.from_numpy(z * 0.3), torch.from_numpy(z * 1.7)
    cfg = uncond + 7.5 * (cond - uncond)
    expected = rescale_noise_cfg(cfg, cond, guidance_rescale=0.7).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_bad_guidance_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown style"):
        guidance_weights(5.0, {"watercolour": 1.0})
    with pytest.raises(ValueError, match="guidance_scale"):
        guidance_weights(-1.0, {})
    with pytest.raises(ValueError, match="guidance_rescale"):
        GuidedDenoiser(ContextModel(), [branch("cond", 1.0, 1.0)], guidance_rescale=2.0)
