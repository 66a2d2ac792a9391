"""The DDPM forward process shared by sampling, Coop-Diffusion and training.

PanGu-Draw paper, eq. (1):  z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps,  a_t = prod_{s<=t} (1 - beta_s)
eq. (3):                   x0_hat = (z_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)
and eq. (3) solved for eps (the paper's eq. (5) in Coop-Diffusion): eps = (z_t - sqrt(a_t) z_0) / sqrt(1 - a_t).

The three formulas are written with arithmetic operators only, so they apply unchanged to numpy arrays
and to MindSpore tensors (inside a compiled graph too); ``alpha_bar`` is a python float or an array
broadcastable against the latents (one value per sample: shape (B, 1, 1, 1)).

Timestep t = -1 stands for the clean end point (a = 1, sigma = 0) that every sampler reaches last.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

Spacing = Literal["release", "leading", "trailing", "linspace"]
SPACINGS = ("release", "leading", "trailing", "linspace")
CLEAN = -1


def add_noise(z0, eps, alpha_bar):
    """Eq. (1): sample z_t from q(z_t | z_0) given the noise."""
    return alpha_bar ** 0.5 * z0 + (1.0 - alpha_bar) ** 0.5 * eps


def predict_x0(z_t, eps, alpha_bar):
    """Eq. (3): the clean latent implied by a noise prediction."""
    return (z_t - (1.0 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5


def eps_from_x0(z_t, x0, alpha_bar):
    """Eq. (3) solved for eps (Coop-Diffusion eq. (5)): the noise that maps x0 to z_t by eq. (1)."""
    return (z_t - alpha_bar ** 0.5 * x0) / (1.0 - alpha_bar) ** 0.5


class NoiseSchedule:
    """Stable Diffusion's scaled-linear betas: sqrt(beta) evenly spaced from sqrt(0.00085) to sqrt(0.012).

    Computed in float64 (as sgm does), exposed per integer timestep: ``alpha_bar(t)`` and the
    variance-exploding ``sigma(t) = sqrt((1 - a_t) / a_t)`` used by the EDM-form samplers.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps
        self.betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)

    def alpha_bar(self, t: int) -> float:
        """a_t for an integer timestep, 1.0 for :data:`CLEAN`."""
        t = int(t)
        if t == CLEAN:
            return 1.0
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.num_train_timesteps})")
        return float(self.alphas_cumprod[t])

    def sigma(self, t: int) -> float:
        a = self.alpha_bar(t)
        return ((1.0 - a) / a) ** 0.5

    def timesteps(self, num_steps: int, spacing: Spacing = "release", steps_offset: int = 0) -> np.ndarray:
        """The integer timesteps of an ``num_steps``-step sampling run, in order of use (descending).

        ``release``: ``linspace(T-1, 0, n, endpoint=False)`` cast to int - the released PanGu-Draw /
        sgm ``LegacyDDPMDiscretization`` (999, 974, 949, ..., 24 at n=40). ``leading``, ``trailing``,
        ``linspace``: diffusers' spacings (Lin et al. 2023, Table 2); ``steps_offset`` applies to
        ``leading`` as in diffusers.
        """
        T = self.num_train_timesteps
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if num_steps > T:
            raise ValueError(f"num_steps {num_steps} exceeds the {T} training timesteps")
        if spacing == "release":
            ts = np.linspace(T - 1, 0, num_steps, endpoint=False).astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
        if ts.min() < 0 or ts.max() >= T:
            raise ValueError(f"spacing {spacing!r} with steps_offset {steps_offset} leaves [0, {T}): {ts.tolist()}")
        return ts.copy()

    def strength_timesteps(self, timesteps: np.ndarray, strength: float) -> np.ndarray:
        """The tail of a schedule that image-to-image runs: the last round(strength * n) steps."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        keep = max(1, min(len(timesteps), int(round(strength * len(timesteps)))))
        return timesteps[len(timesteps) - keep:]
