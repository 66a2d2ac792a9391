"""Coop-Diffusion math (Algorithm 1): fusion, bridges, carrying back, and the resolution bridge's noise."""
import numpy as np
import pytest
from mindspore import nn

from pangu_draw_ms.config import VAEConfig
from pangu_draw_ms.diffusion.coop import CoopDenoiser, CoopPartner, LatentBridge, bridged_eps, resolution_bridge
from pangu_draw_ms.diffusion.samplers import make_sampler
from pangu_draw_ms.diffusion.schedule import NoiseSchedule, add_noise, predict_x0
from pangu_draw_ms.models.vae import AutoencoderKL

SCHEDULE = NoiseSchedule()


class IdentityAutoencoder(nn.Cell):
    """D and E that are exact inverses (identity): a latent space whose bridge must change nothing."""

    def decode_latents(self, z):
        return z * 1.0

    def encode_to_latents(self, x):
        return x * 1.0


def toy_model(scale):
    """A deterministic eps model standing in for a UNet (affine in z, depends on t)."""
    def denoise(z, t):
        a = SCHEDULE.alpha_bar(t)
        return (scale * (1 - a) ** 0.5 * (z - 0.3 * a ** 0.5) / (a * 0.2 + 1 - a)).astype(np.float32)
    return denoise


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("d", [0.0, 0.4, 1.0])
def test_a_partner_that_copies_the_main_model_changes_nothing(sampler, d, rng):
    z_T = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ts = SCHEDULE.timesteps(12, "release")
    single = make_sampler(sampler, SCHEDULE).sample(toy_model(1.0), z_T, ts)
    coop = CoopDenoiser(toy_model(1.0), z_T.shape, [CoopPartner("copy", toy_model(1.0), z_T.shape, d)], SCHEDULE)
    state = make_sampler(sampler, SCHEDULE).sample(coop, coop.pack(z_T, [z_T.copy()]), ts)
    z, (z_partner,) = coop.unpack(state)
    np.testing.assert_allclose(z, single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z_partner, single, rtol=1e-5, atol=1e-5)


def test_fusion_weights_and_active_ranges(rng):
    z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    main, left, right = toy_model(1.0), toy_model(2.0), toy_model(-1.0)
    partners = [CoopPartner("left", left, z.shape, 0.25, t_min=500, t_max=999),
                CoopPartner("right", right, z.shape, 0.5, t_min=0, t_max=600)]
    coop = CoopDenoiser(main, z.shape, partners, SCHEDULE)
    for t, expected in ((800, 0.75 * main(z, 800) + 0.25 * left(z, 800)),
                        (550, 0.25 * main(z, 550) + 0.25 * left(z, 550) + 0.5 * right(z, 550)),
                        (100, 0.5 * main(z, 100) + 0.5 * right(z, 100))):
        fused, carried = coop.fuse(z, [z, z], t)
        np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6)
        assert all(np.array_equal(c, fused) for c in carried)  # shared latent space: carried unchanged
    assert [names for _, names in coop.trace] == [("main", "left"), ("main", "left", "right"), ("main", "right")]
    with pytest.raises(ValueError, match="weight d"):
        CoopPartner("bad", main, z.shape, 1.5)


def test_identity_bridge_returns_eps_unchanged(rng):
    bridge = LatentBridge(IdentityAutoencoder(), IdentityAutoencoder(), (8, 8))
    z_t = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal(z_t.shape).astype(np.float32)
    for t in (999, 500, 20):
        a = SCHEDULE.alpha_bar(t)
        np.testing.assert_allclose(bridged_eps(z_t, predict_x0(z_t, eps, a), bridge.numpy, a), eps,
                                   rtol=1e-4, atol=1e-4)


def test_eps_tilde_renoises_a_reconstructible_x0_to_z_t(rng):
    """Eq. (5) inverts eq. (1): for the x0 the bridge produces, add_noise(z0~, eps~) gives z_t back."""
    vae = AutoencoderKL(VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=8))
    bridge = LatentBridge(vae, vae, (16, 16))
    z_t = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x0_partner = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    for t in (900, 300):
        a = SCHEDULE.alpha_bar(t)
        z0 = bridge.numpy(x0_partner)
        eps_tilde = bridged_eps(z_t, x0_partner, bridge.numpy, a)
        np.testing.assert_allclose(add_noise(z0, eps_tilde, a), z_t, rtol=1e-4, atol=1e-4)


def test_bridge_across_resolutions_and_latent_spaces(rng):
    """Space B: 4-channel latents of 32x32 images; space A: 8-channel latents of 64x64 images."""
    vae_b = AutoencoderKL(VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=8))
    vae_a = AutoencoderKL(VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=8,
                                    latent_channels=8, scaling_factor=0.5))
    names = [p.name for p in vae_a.get_parameters()]
    bridge = LatentBridge(vae_b, vae_a, (64, 64), resize_mode="bilinear")
    assert [p.name for p in vae_a.get_parameters()] == names  # holding a VAE does not rename its weights
    out = bridge.numpy(rng.standard_normal((2, 4, 16, 16)).astype(np.float32))
    assert out.shape == (2, 8, 16, 16)
    with pytest.raises(ValueError, match="resize mode"):
        LatentBridge(vae_b, vae_a, (64, 64), resize_mode="lanczos")


def neighbour_stats(noise):
    """(variance, mean correlation of horizontally and vertically adjacent elements)."""
    n = noise - noise.mean()
    corr_h = (n[..., :, 1:] * n[..., :, :-1]).mean() / n.var()
    corr_v = (n[..., 1:, :] * n[..., :-1, :]).mean() / n.var()
    return float(noise.var()), float((corr_h + corr_v) / 2)


def test_resolution_bridge_keeps_the_noise_iid_and_latent_upsampling_does_not(rng):
    t = 600
    a = SCHEDULE.alpha_bar(t)
    x0_low = rng.standard_normal((4, 4, 16, 16)).astype(np.float32)
    eps_low = rng.standard_normal(x0_low.shape).astype(np.float32)
    z_low = add_noise(x0_low, eps_low, a)
    vae = AutoencoderKL(VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=8))
    bridge = LatentBridge(vae, vae, (64, 64), resize_mode="bicubic")   # 32 px -> 64 px
    fresh = rng.standard_normal((4, 4, 32, 32)).astype(np.float32)

    z_high, z0_high = resolution_bridge(z_low, eps_low, t, SCHEDULE, bridge, fresh)
    ours = (z_high - a ** 0.5 * z0_high) / (1 - a) ** 0.5
    z_up, x0_up = resolution_bridge(z_low, eps_low, t, SCHEDULE, None, fresh, latent_upsample=(32, 32))
    baseline = (z_up - a ** 0.5 * x0_up) / (1 - a) ** 0.5
    (var_ours, corr_ours), (var_base, corr_base) = neighbour_stats(ours), neighbour_stats(baseline)
    print(f"pixel-space bridge: var {var_ours:.3f} corr {corr_ours:.3f}; "
          f"latent bilinear: var {var_base:.3f} corr {corr_base:.3f}")
    assert abs(var_ours - 1) < 0.05 and abs(corr_ours) < 0.05
    assert var_base < 0.8 and corr_base > 0.3
