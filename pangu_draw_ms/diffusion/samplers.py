"""Samplers: update rules over one denoiser contract.

The contract: ``denoise(z_t, t) -> eps``, with ``z_t`` the variance-preserving latent of eq. (1) and ``t``
an integer timestep (every sampler here evaluates the model only at schedule timesteps, so experts,
guidance and Coop-Diffusion see ordinary integer t). A sampler step maps ``z_t`` to ``z_{t_next}``;
``t_next`` after the last timestep is :data:`~pangu_draw_ms.diffusion.schedule.CLEAN` (a = 1).

The EDM-form samplers work internally with x = z_t / sqrt(a_t) and sigma_t = sqrt((1 - a_t) / a_t)
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", sec. 2 and
App. C.3: the DDPM eps-model as a denoiser D(x; sigma) = x - sigma eps). Latents are float32 numpy
arrays; the stochastic samplers draw their noise from a numpy ``Generator`` so runs are reproducible.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Type

import numpy as np

from .schedule import CLEAN, NoiseSchedule, predict_x0

Denoise = Callable[[np.ndarray, int], np.ndarray]
StepCallback = Callable[[int, int, np.ndarray], None]


class NonFiniteLatentsError(FloatingPointError):
    """The latents became NaN or infinite during sampling: every later step and the decoded image would be
    garbage (black or saturated noise), so the run stops at the step where it happened. ``suspects`` says
    which settings most likely caused it (the pipeline knows them; the sampler does not)."""

    def __init__(self, step: int, num_steps: int, timestep: int, bad_values: int, suspects: str = ""):
        self.step, self.num_steps, self.timestep, self.bad_values = step, num_steps, timestep, bad_values
        super().__init__(f"the latents became non-finite ({bad_values} NaN or infinite values) at step "
                         f"{step + 1}/{num_steps} (timestep {timestep}); no image was made from them"
                         + (f"; most likely at fault: {suspects}" if suspects else ""))

    def naming(self, suspects: str) -> "NonFiniteLatentsError":
        """The same error, naming the settings most likely at fault."""
        return NonFiniteLatentsError(self.step, self.num_steps, self.timestep, self.bad_values, suspects)


class Sampler:
    """Base: ``sample`` runs ``step`` over the timesteps; subclasses implement one step."""

    name = ""
    stochastic = False

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def reset(self) -> None:
        """Forget state carried between steps (multistep methods); called at the start of a run."""

    def step(self, denoise: Denoise, z: np.ndarray, t: int, t_next: int,
             rng: Optional[np.random.Generator]) -> np.ndarray:
        raise NotImplementedError

    def linear_coefficients(self, t: int, t_next: int) -> Optional[Tuple[float, float]]:
        """(A, B) with z_next = A z + B eps for deterministic first-order samplers, whose step is then
        one affine map (a compiled step takes it into its graph); None for the others."""
        return None

    @property
    def affine(self) -> bool:
        """Whether every step is one affine map z_next = A z + B eps (:meth:`linear_coefficients`)."""
        return self.linear_coefficients(self.schedule.num_train_timesteps - 1, CLEAN) is not None

    def sample(self, denoise: Denoise, z: np.ndarray, timesteps, rng: Optional[np.random.Generator] = None,
               callback: Optional[StepCallback] = None, final_timestep: int = CLEAN) -> np.ndarray:
        """Denoise ``z`` (the latent at ``timesteps[0]``) through every timestep down to ``final_timestep``
        (the clean end by default; a later timestep stops part-way, e.g. at Coop-Diffusion's T_low).

        The one sampling loop of the package: host denoisers and compiled ones alike. A denoiser with an
        ``affine_step(z, t, A, B)`` method is handed the whole step z_next = A z + B eps when this sampler's
        step is affine (:meth:`linear_coefficients`); other samplers call it as ``denoise(z, t)``.

        The latents are checked after every step (one pass over host memory, which the loop holds anyway):
        NaN or inf raises :class:`NonFiniteLatentsError` naming the step."""
        if self.stochastic and rng is None:
            raise ValueError(f"sampler {self.name!r} is stochastic: pass a numpy Generator as rng")
        self.reset()
        timesteps = [int(t) for t in timesteps]
        if final_timestep != CLEAN and timesteps and final_timestep >= timesteps[-1]:
            raise ValueError(f"final_timestep {final_timestep} must come after the last timestep {timesteps[-1]}")
        # A compiled denoiser (diffusion/compiled.py) takes an affine step's update into its graph.
        affine_step = getattr(denoise, "affine_step", None)
        for i, t in enumerate(timesteps):
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else final_timestep
            coefficients = None if affine_step is None else self.linear_coefficients(t, t_next)
            if coefficients is None:
                z = self.step(denoise, z, t, t_next, rng)
            else:
                z = affine_step(z, t, *coefficients)
            if not np.isfinite(z).all():
                raise NonFiniteLatentsError(i, len(timesteps), t, int(np.size(z) - np.count_nonzero(np.isfinite(z))))
            if callback is not None:
                callback(i, t, z)
        return z

    # VP <-> VE (x = z / sqrt(a) = z * sqrt(1 + sigma^2)) conversions of the EDM-form samplers.
    def _to_x(self, z, t):
        return z * (1.0 + self.schedule.sigma(t) ** 2) ** 0.5

    def _to_z(self, x, t):
        return x / (1.0 + self.schedule.sigma(t) ** 2) ** 0.5


class EulerSampler(Sampler):
    """Euler in sigma (EDM) form: x_next = x + (sigma_next - sigma) * eps (Karras et al. 2022, Alg. 2
    without churn and without the second-order correction; sgm ``EulerEDMSampler``, the release's
    default). Deterministic; for eps models it equals DDIM with eta = 0 up to rounding."""

    name = "euler"

    def linear_coefficients(self, t, t_next):
        # x = z sqrt(1 + sigma^2); x_next = x + (sigma_next - sigma) eps; z_next = x_next / sqrt(1 + sigma_next^2)
        sigma, sigma_next = self.schedule.sigma(t), self.schedule.sigma(t_next)
        scale_next = (1.0 + sigma_next ** 2) ** 0.5
        return (1.0 + sigma ** 2) ** 0.5 / scale_next, (sigma_next - sigma) / scale_next

    def step(self, denoise, z, t, t_next, rng):
        a, b = self.linear_coefficients(t, t_next)
        return a * z + b * denoise(z, t)


class HeunSampler(Sampler):
    """Heun's 2nd-order method in sigma form (Karras et al. 2022, Alg. 1, deterministic): an Euler
    predictor to sigma_next, a second model evaluation there, and the average slope; plain Euler on
    the last step (sigma_next = 0). 2n - 1 model evaluations for n steps."""

    name = "heun"

    def step(self, denoise, z, t, t_next, rng):
        sigma, sigma_next = self.schedule.sigma(t), self.schedule.sigma(t_next)
        x = self._to_x(z, t)
        eps = denoise(z, t)
        x_euler = x + (sigma_next - sigma) * eps
        if t_next == CLEAN:
            return x_euler
        eps_next = denoise(self._to_z(x_euler, t_next), t_next)
        return self._to_z(x + (sigma_next - sigma) * 0.5 * (eps + eps_next), t_next)


class EulerAncestralSampler(Sampler):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``): an Euler step to sigma_down, then fresh
    noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 and
    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) (the DDPM ancestral variance at eta=1)."""

    name = "euler_ancestral"
    stochastic = True

    def __init__(self, schedule: NoiseSchedule, eta: float = 1.0):
        super().__init__(schedule)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    def step(self, denoise, z, t, t_next, rng):
        sigma, sigma_next = self.schedule.sigma(t), self.schedule.sigma(t_next)
        eps = denoise(z, t)
        sigma_up = min(sigma_next, self.eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = self._to_x(z, t) + (sigma_down - sigma) * eps
        if sigma_up > 0:
            x = x + sigma_up * rng.standard_normal(z.shape, dtype=np.float32)
        return self._to_z(x, t_next)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12): z_next = sqrt(a_next) x0_hat + sqrt(1 - a_next - s^2) eps + s noise
    with s = eta * sqrt((1 - a_next) / (1 - a_t)) * sqrt(1 - a_t / a_next); eta = 0 is deterministic,
    eta = 1 the DDPM posterior variance."""

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0):
        super().__init__(schedule)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
        self.eta = eta
        self.stochastic = eta > 0

    def linear_coefficients(self, t, t_next):
        if self.stochastic:
            return None
        # eta = 0: z_next = sqrt(a_next) (z - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a_next) eps
        a, a_next = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_next)
        return (a_next / a) ** 0.5, (1.0 - a_next) ** 0.5 - (a_next * (1.0 - a) / a) ** 0.5

    def step(self, denoise, z, t, t_next, rng):
        a, a_next = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_next)
        eps = denoise(z, t)
        x0 = predict_x0(z, eps, a)
        s = self.eta * ((1.0 - a_next) / (1.0 - a)) ** 0.5 * (1.0 - a / a_next) ** 0.5
        z_next = a_next ** 0.5 * x0 + max(1.0 - a_next - s ** 2, 0.0) ** 0.5 * eps
        if s > 0:
            z_next = z_next + s * rng.standard_normal(z.shape, dtype=np.float32)
        return z_next


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2) in data prediction, written in sigma form
    with lambda = -log sigma: x_next = (sigma_next / sigma) x - expm1(-h) D, where D is the current x0
    estimate extrapolated with the previous one (r = h_prev / h); first order on the first step and on
    the final step to sigma = 0 (which then returns D = x0_hat)."""

    name = "dpmpp_2m"

    def reset(self):
        self._previous_x0 = None
        self._previous_h = None

    def step(self, denoise, z, t, t_next, rng):
        sigma, sigma_next = self.schedule.sigma(t), self.schedule.sigma(t_next)
        eps = denoise(z, t)
        x = self._to_x(z, t)
        x0 = x - sigma * eps
        if t_next == CLEAN:
            x_next = x0
            h = None
        else:
            h = math.log(sigma / sigma_next)
            d = x0
            if self._previous_x0 is not None:
                r = self._previous_h / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * self._previous_x0
            x_next = (sigma_next / sigma) * x - math.expm1(-h) * d
        self._previous_x0, self._previous_h = x0, h
        return self._to_z(x_next, t_next)


SAMPLERS: Dict[str, Type[Sampler]] = {
    cls.name: cls for cls in (EulerSampler, HeunSampler, EulerAncestralSampler, DDIMSampler, DPMSolverPP2MSampler)
}


def make_sampler(name: str, schedule: NoiseSchedule, **options) -> Sampler:
    """Build a sampler by name (``euler``, ``heun``, ``euler_ancestral``, ``ddim``, ``dpmpp_2m``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](schedule, **options)
