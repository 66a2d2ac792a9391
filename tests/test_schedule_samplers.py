"""Noise schedule, timestep spacings and samplers: properties of the math, and parity with diffusers."""
import numpy as np
import pytest

from pangu_draw_ms.diffusion.samplers import SAMPLERS, make_sampler
from pangu_draw_ms.diffusion.schedule import CLEAN, NoiseSchedule, add_noise, eps_from_x0, predict_x0

SCHEDULE = NoiseSchedule()


def test_release_spacing_is_the_sgm_discretization():
    ts = SCHEDULE.timesteps(40, "release")
    assert ts[:3].tolist() == [999, 974, 949] and ts[-1] == 24 and len(ts) == 40
    assert np.all(np.diff(ts) < 0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 40, 50])
def test_spacings_match_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    offset = 1 if spacing == "leading" else 0
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    assert SCHEDULE.timesteps(steps, spacing, steps_offset=offset).tolist() == scheduler.timesteps.tolist()
    np.testing.assert_allclose(SCHEDULE.alphas_cumprod, scheduler.alphas_cumprod.numpy(), rtol=2e-6)


def test_bad_step_counts_and_spacings_are_rejected():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            SCHEDULE.timesteps(bad)
    with pytest.raises(ValueError, match="valid: release"):
        SCHEDULE.timesteps(10, "karras")
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        make_sampler("plms", SCHEDULE)


def test_eq1_and_eq3_invert_each_other(rng):
    z0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal(z0.shape).astype(np.float32)
    for t in (0, 250, 999):
        a = SCHEDULE.alpha_bar(t)
        z_t = add_noise(z0, eps, a)
        np.testing.assert_allclose(predict_x0(z_t, eps, a), z0, atol=2e-3 if t == 999 else 1e-5)
        np.testing.assert_allclose(eps_from_x0(z_t, z0, a), eps, atol=1e-4)
    assert SCHEDULE.alpha_bar(CLEAN) == 1.0 and SCHEDULE.sigma(CLEAN) == 0.0


# ---- samplers on a Gaussian data distribution, where the exact answer is known ---------------------
# Data x0 ~ N(mu, s^2) per element. Then E[eps | z_t] = sqrt(1-a) (z_t - sqrt(a) mu) / (a s^2 + 1 - a), and
# the probability-flow ODE keeps k = (z_t - sqrt(a_t) mu) / sqrt(a_t s^2 + 1 - a_t) constant, which gives
# the exact latent at every t.
MU, S = 0.7, 0.3
T_CHECK = 99  # a timestep every test schedule below passes through


def gaussian_denoiser(z, t):
    a = SCHEDULE.alpha_bar(t)
    return ((1 - a) ** 0.5 * (z - a ** 0.5 * MU) / (a * S ** 2 + 1 - a)).astype(np.float32)


def exact_latent(z_T, t_first, t):
    a_first, a = SCHEDULE.alpha_bar(t_first), SCHEDULE.alpha_bar(t)
    k = (z_T.astype(np.float64) - a_first ** 0.5 * MU) / (a_first * S ** 2 + 1 - a_first) ** 0.5
    return a ** 0.5 * MU + (a * S ** 2 + 1 - a) ** 0.5 * k


DETERMINISTIC = ["euler", "heun", "ddim", "dpmpp_2m"]


def errors_at_check_point(name, z_T, step_counts):
    """Max error of the sampler's latent at T_CHECK, for n steps spread evenly over [999, T_CHECK]."""
    errors = []
    for steps in step_counts:
        ts = np.round(np.linspace(999, T_CHECK, steps + 1)).astype(np.int64)
        captured = {}
        make_sampler(name, SCHEDULE).sample(gaussian_denoiser, z_T, ts,
                                            callback=lambda i, t, z: captured.setdefault(i, z))
        errors.append(float(np.abs(captured[steps - 1] - exact_latent(z_T, 999, T_CHECK)).max()))
    return errors


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_at_their_order(name, rng):
    z_T = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    errors = errors_at_check_point(name, z_T, (10, 20, 40, 80))
    observed_order = np.log2(errors[-2] / errors[-1])
    print(name, ["%.2e" % e for e in errors], "order %.2f" % observed_order)
    expected_order = 2 if name in ("heun", "dpmpp_2m") else 1
    assert observed_order > 0.8 * expected_order, errors
    assert errors[-1] < (1e-2 if expected_order == 1 else 1e-3), errors


def test_samplers_reach_the_clean_end_point(rng):
    """Through the clean end: the last step jumps from the smallest scheduled t to a = 1 by returning
    x0_hat (eq. 3) - the exact target is x0_hat at the exact latent of that t."""
    z_T = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ts = SCHEDULE.timesteps(200, "trailing")
    z_last = exact_latent(z_T, ts[0], ts[-1])
    target = predict_x0(z_last, gaussian_denoiser(z_last, ts[-1]), SCHEDULE.alpha_bar(ts[-1]))
    for name in DETERMINISTIC:
        out = make_sampler(name, SCHEDULE).sample(gaussian_denoiser, z_T, ts)
        err = np.abs(out - target).max()
        print(name, "%.2e" % err)
        assert err < (3e-2 if name in ("euler", "ddim") else 5e-3), name


def ancestral_moments(timesteps, mean, var):
    """Exact mean/variance after DDPM ancestral sampling (DDIM eq. 12 with eta = 1) of Gaussian data:
    each step is affine in z plus independent noise, z_next = alpha z + beta + s xi."""
    for i, t in enumerate(timesteps):
        a = SCHEDULE.alpha_bar(t)
        a_next = SCHEDULE.alpha_bar(timesteps[i + 1]) if i + 1 < len(timesteps) else 1.0
        c = (1 - a) ** 0.5 / (a * S ** 2 + 1 - a)                  # eps(z) = c (z - sqrt(a) mu)
        s2 = (1 - a_next) / (1 - a) * (1 - a / a_next)
        k = (1 - a_next - s2) ** 0.5
        # z_next = sqrt(a_next) (z - sqrt(1-a) eps) / sqrt(a) + k eps + s xi
        alpha = a_next ** 0.5 / a ** 0.5 * (1 - (1 - a) ** 0.5 * c) + k * c
        beta = (a_next ** 0.5 / a ** 0.5 * (1 - a) ** 0.5 - k) * c * a ** 0.5 * MU
        mean, var = alpha * mean + beta, alpha ** 2 * var + s2
    return mean, var


def test_ancestral_samplers_match_the_exact_output_distribution():
    gen = np.random.default_rng(1)
    z_T = gen.standard_normal((64, 4, 16, 16)).astype(np.float32)
    ts = SCHEDULE.timesteps(50, "trailing")
    mean, var = ancestral_moments(ts, 0.0, 1.0)
    ddpm = make_sampler("ddim", SCHEDULE, eta=1.0).sample(gaussian_denoiser, z_T, ts, rng=np.random.default_rng(2))
    print("expected mean %.4f std %.4f, got %.4f %.4f" % (mean, var ** 0.5, ddpm.mean(), ddpm.std()))
    assert abs(ddpm.mean() - mean) < 0.005 and abs(ddpm.std() - var ** 0.5) < 0.005
    # k-diffusion's Euler ancestral (eta = 1) is the same update written in sigma form.
    ancestral = make_sampler("euler_ancestral", SCHEDULE).sample(gaussian_denoiser, z_T, ts,
                                                                 rng=np.random.default_rng(2))
    np.testing.assert_allclose(ancestral, ddpm, atol=1e-4)


def test_stochastic_sampler_requires_a_generator():
    with pytest.raises(ValueError, match="stochastic"):
        make_sampler("euler_ancestral", SCHEDULE).sample(gaussian_denoiser, np.zeros((1, 4, 2, 2), np.float32), [999])


def test_euler_equals_ddim_eta0_for_eps_models(rng):
    z_T = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ts = SCHEDULE.timesteps(25, "release")
    euler = make_sampler("euler", SCHEDULE).sample(gaussian_denoiser, z_T, ts)
    ddim = make_sampler("ddim", SCHEDULE).sample(gaussian_denoiser, z_T, ts)
    np.testing.assert_allclose(euler, ddim, atol=1e-5)


def test_every_sampler_evaluates_only_schedule_timesteps(rng):
    ts = SCHEDULE.timesteps(12, "release")
    for name in SAMPLERS:
        seen = []

        def denoise(z, t):
            seen.append(t)
            return gaussian_denoiser(z, t)

        make_sampler(name, SCHEDULE).sample(denoise, rng.standard_normal((1, 4, 4, 4)).astype(np.float32), ts,
                                            rng=np.random.default_rng(0))
        assert set(seen) == set(ts.tolist()), name
        assert len(seen) == (2 * len(ts) - 1 if name == "heun" else len(ts)), name


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_affine_coefficients_reproduce_the_step_of_first_order_deterministic_samplers(name):
    """Coop-Diffusion's compiled fused step applies z_next = A z + B eps; (A, B) must be the sampler's own step."""
    rng = np.random.default_rng(5)
    z, eps = rng.standard_normal((2, 1, 4, 3, 3)).astype(np.float64)
    sampler = make_sampler(name, SCHEDULE)
    for t, t_next in ((999, 749), (500, 499), (249, CLEAN)):
        coefficients = sampler.linear_coefficients(t, t_next)
        if name not in ("euler", "ddim"):
            assert coefficients is None  # second-order or stochastic: no single affine map
            continue
        sampler.reset()
        expected = sampler.step(lambda x, s: eps, z, t, t_next, None)
        np.testing.assert_allclose(coefficients[0] * z + coefficients[1] * eps, expected, rtol=1e-12, atol=1e-12)
    assert sampler.affine == (name in ("euler", "ddim"))
    stochastic_ddim = make_sampler("ddim", SCHEDULE, eta=0.5)
    assert stochastic_ddim.linear_coefficients(999, 749) is None and not stochastic_ddim.affine


def test_configs_name_exactly_the_registered_samplers():
    """config.py names the samplers (it sits below diffusion/ and must not import it); the registry of
    diffusion/samplers.py must hold exactly those names."""
    from pangu_draw_ms.config import SAMPLER_NAMES
    from pangu_draw_ms.diffusion.samplers import SAMPLERS

    assert sorted(SAMPLERS) == sorted(SAMPLER_NAMES)
