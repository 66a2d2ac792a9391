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
# the probability-flow ODE keeps (z_t - sqrt(a_t) mu) / sqrt(a_t s^2 + 1 - a_t) constant, so a deterministic
# sampler started from z_T must end at mu + s (z_T - sqrt(a_T) mu) / sqrt(a_T s^2 + 1 - a_T).
MU, S = 0.7, 0.3


def gaussian_denoiser(z, t):
    a = SCHEDULE.alpha_bar(t)
    return ((1 - a) ** 0.5 * (z - a ** 0.5 * MU) / (a * S ** 2 + 1 - a)).astype(np.float32)


def ode_solution(z_T, t_first):
    a = SCHEDULE.alpha_bar(t_first)
    return MU + S * (z_T - a ** 0.5 * MU) / (a * S ** 2 + 1 - a) ** 0.5


DETERMINISTIC = ["euler", "heun", "ddim", "dpmpp_2m"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_ode_solution(name, rng):
    z_T = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    errors = []
    for steps in (10, 40, 160):
        ts = SCHEDULE.timesteps(steps, "trailing")
        out = make_sampler(name, SCHEDULE).sample(gaussian_denoiser, z_T, ts)
        errors.append(np.abs(out - ode_solution(z_T, ts[0])).max())
    print(name, ["%.2e" % e for e in errors])
    assert errors[-1] < 2e-3, errors
    assert errors[2] < errors[0], errors
    if name in ("heun", "dpmpp_2m"):  # second order: much more accurate than Euler at the same steps
        euler = make_sampler("euler", SCHEDULE).sample(gaussian_denoiser, z_T, SCHEDULE.timesteps(10, "trailing"))
        assert errors[0] < 0.5 * np.abs(euler - ode_solution(z_T, 999)).max()


@pytest.mark.parametrize("name, options", [("euler_ancestral", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_samplers_sample_the_data_distribution(name, options):
    gen = np.random.default_rng(1)
    z_T = gen.standard_normal((64, 4, 16, 16)).astype(np.float32)
    out = make_sampler(name, SCHEDULE, **options).sample(gaussian_denoiser, z_T, SCHEDULE.timesteps(50, "trailing"),
                                                          rng=np.random.default_rng(2))
    assert abs(out.mean() - MU) < 0.01 and abs(out.std() - S) < 0.01, (out.mean(), out.std())


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
