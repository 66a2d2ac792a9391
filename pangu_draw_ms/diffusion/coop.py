"""Coop-Diffusion (PanGu-Draw sec. 3.2, Algorithm 1): fuse diffusion models that live in different latent
spaces or at different resolutions into one denoising process.

Sub-module 1, the latent-space bridge (Algorithm 1, per step t):
    eps'_t   = model_B(z'_t)                                  partner prediction in space B
    x0'      = (z'_t - sqrt(1 - a_t) eps'_t) / sqrt(a_t)       eq. (3) in B
    z0~      = E_A(D_B(x0'))                                   eq. (4): decode in B, (resize,) encode in A
    eps~_t   = (z_t - sqrt(a_t) z0~) / sqrt(1 - a_t)           eq. (5)
    eps_fuse = sum_i d_i eps~_i + (1 - sum_i d_i) eps_A(z_t)    over the partners active at t
    z_{t-1}  = S(z_t, t, eps_fuse);  z'_{t-1} = S(z'_t, t, eps'_fuse)
with eps'_fuse the fused prediction carried back to B the same way (x0 of eps_fuse -> D_A -> E_B -> eq. 5).
When both models share a latent space the bridge is the identity and is skipped.

The main latent and every partner latent are packed into ONE flat state vector, and the fused denoiser
returns the packed (eps_fuse, eps'_fuse...) - so any sampler (Euler, Heun, DPM-Solver++, ancestral)
applies S to all latents at once, exactly as the algorithm's two S lines. With no partners it is the main
model's own prediction: the plain pipeline's compiled step (:mod:`pangu_draw_ms.diffusion.compiled`)
is this with no partners.

Sub-module 2, the resolution bridge: a low-resolution model runs from T to T_low; its x0 at T_low is
decoded, upsampled in pixel space, encoded by the high-resolution VAE and re-noised with FRESH noise by
eq. (1), so the high-resolution latent at T_low holds i.i.d. noise; the high-resolution model continues
to 0. Upsampling the noisy latent itself (the paper's Fig. 3 baseline) correlates neighbouring noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .schedule import NoiseSchedule, add_noise, eps_from_x0, predict_x0

Denoise = Callable[[np.ndarray, int], np.ndarray]
RESIZE_MODES = ("bicubic", "bilinear", "nearest", "area")


class LatentBridge(nn.Cell):
    """Clean latents of space B -> images (D_B) -> resized to space A's pixel size -> clean latents of
    space A (E_A, the posterior mode): Algorithm 1's eq. (4), one compiled graph.

    ``source_vae`` / ``target_vae``: cells with ``decode_latents`` / ``encode_to_latents`` (our
    AutoencoderKL; the scaling factors are applied inside). ``target_size``: (H, W) pixels of space A.
    """

    def __init__(self, source_vae: nn.Cell, target_vae: nn.Cell, target_size: Tuple[int, int],
                 resize_mode: str = "bicubic"):
        # auto_prefix=False: the VAEs belong to their pipelines; holding them must not rename their parameters.
        super().__init__(auto_prefix=False)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize_mode!r}; valid: {', '.join(RESIZE_MODES)}")
        self.source_vae = source_vae
        self.target_vae = target_vae
        self.target_size = (int(target_size[0]), int(target_size[1]))
        self.resize_mode = resize_mode

    def construct(self, x0):
        image = self.source_vae.decode_latents(x0)
        if image.shape[-2] != self.target_size[0] or image.shape[-1] != self.target_size[1]:
            image = ops.interpolate(image, size=self.target_size, mode=self.resize_mode)
        return self.target_vae.encode_to_latents(image)

    def numpy(self, x0: np.ndarray) -> np.ndarray:
        """The bridge on the samplers' numpy arrays."""
        return self(ms.Tensor(np.ascontiguousarray(x0, np.float32))).asnumpy()


def bridged_eps(z_t, x0_source, bridge: Optional[Callable], alpha_bar):
    """eps~ (eq. 5) in the target space for a clean prediction made in the source space (eq. 4 first);
    ``bridge=None`` means both share one latent space and x0 carries over unchanged."""
    z0 = x0_source if bridge is None else bridge(x0_source)
    return eps_from_x0(z_t, z0, alpha_bar)


def fuse_predictions(z, eps_main, partner_latents, partner_eps, weights, to_main, from_main, alpha_bar):
    """Algorithm 1 lines 2-9 up to the sampler: (eps_fuse, [eps'_fuse per partner]).

    ``partner_eps[i]`` is None for a partner inactive at t; ``to_main[i]`` / ``from_main[i]`` are the
    bridges (callables) or None for a shared latent space. Operators only, so the same code runs on
    numpy arrays (:class:`CoopDenoiser`) and inside a compiled
    :class:`~pangu_draw_ms.diffusion.compiled.StepGraph`.
    """
    fused = eps_main
    total = 0.0
    terms = []
    for z_p, eps_p, weight, bridge in zip(partner_latents, partner_eps, weights, to_main):
        if eps_p is not None:
            terms.append(weight * bridged_eps(z, predict_x0(z_p, eps_p, alpha_bar), bridge, alpha_bar))
            total += weight
    if terms:
        fused = (1.0 - total) * eps_main
        for term in terms:
            fused = fused + term
    # Carry the fused prediction back to every partner's space for its own update (line 9).
    carried = [fused if back is None else bridged_eps(z_p, predict_x0(z, fused, alpha_bar), back, alpha_bar)
               for z_p, back in zip(partner_latents, from_main)]
    return fused, carried


@dataclass
class CoopPartner:
    """A partner model B of sub-module 1.

    ``denoise``: (z', t) -> eps' on the partner's own latents (its guidance, prompt and conditioning
    inside); ``latent_shape``: (B, C, h, w) of its latents; ``weight``: d_i; active for
    ``t_min <= t <= t_max``; ``to_main`` / ``from_main``: the bridges B -> A and A -> B (None: shared
    latent space, identity shortcut).
    """

    name: str
    denoise: Denoise
    latent_shape: Tuple[int, ...]
    weight: float
    t_min: int = 0
    t_max: int = 999
    to_main: Optional[LatentBridge] = None
    from_main: Optional[LatentBridge] = None

    def __post_init__(self):
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"partner {self.name!r}: weight d must be in [0, 1], got {self.weight}")
        if self.t_min > self.t_max:
            raise ValueError(f"partner {self.name!r}: t_min {self.t_min} > t_max {self.t_max}")
        if (self.to_main is None) != (self.from_main is None):
            raise ValueError(f"partner {self.name!r}: give both bridges (to and from the main space) or neither")

    def active(self, t: int) -> bool:
        return self.t_min <= t <= self.t_max and self.weight > 0


@dataclass
class CoopDenoiser:
    """Sub-module 1 as one denoiser over the packed state [z, z'_1, ..., z'_k] (see module docstring).

    ``trace`` records, per evaluated t, the names of the models that ran.
    """

    main: Denoise
    main_shape: Tuple[int, ...]
    partners: Sequence[CoopPartner]
    schedule: NoiseSchedule
    main_name: str = "main"
    trace: List[Tuple[int, Tuple[str, ...]]] = field(default_factory=list)

    def __post_init__(self):
        names = [p.name for p in self.partners]
        if len(set(names)) != len(names):
            raise ValueError(f"partner names must be unique, got {names}")
        shapes = [tuple(self.main_shape)] + [tuple(p.latent_shape) for p in self.partners]
        self._sizes = [int(np.prod(s)) for s in shapes]
        self._shapes = shapes

    def pack(self, z: np.ndarray, partner_latents: Sequence[np.ndarray]) -> np.ndarray:
        """One state for the sampler: the latents flattened and concatenated; with no partners, ``z`` as it is."""
        arrays = [z] + list(partner_latents)
        for a, shape in zip(arrays, self._shapes):
            if tuple(a.shape) != shape:
                raise ValueError(f"latent of shape {tuple(a.shape)} where {shape} is expected")
        if not self.partners:
            return np.asarray(z, np.float32)
        return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])

    def unpack(self, state: np.ndarray) -> Tuple[np.ndarray, List[np.ndarray]]:
        if not self.partners:
            return state, []
        parts = np.split(state, np.cumsum(self._sizes)[:-1])
        arrays = [p.reshape(s) for p, s in zip(parts, self._shapes)]
        return arrays[0], arrays[1:]

    def active(self, t: int) -> Tuple[bool, ...]:
        return tuple(p.active(t) for p in self.partners)

    def begin_step(self, t: int) -> None:
        """Check the active partners' weights at t and record who runs (every evaluation, host or compiled)."""
        total = sum(p.weight for p in self.partners if p.active(t))
        if total > 1.0 + 1e-6:
            raise ValueError(f"the active partners' weights sum to {total:.3f} > 1 at t={t}")
        self.trace.append((int(t), (self.main_name,) + tuple(p.name for p in self.partners if p.active(t))))

    def fuse(self, z: np.ndarray, partner_latents: Sequence[np.ndarray], t: int):
        """(eps_fuse, [eps'_fuse per partner]) at timestep t (Algorithm 1 lines 1-9)."""
        self.begin_step(t)
        a = self.schedule.alpha_bar(t)
        eps = self.main(z, t)
        partner_eps = [p.denoise(z_p, t) if p.active(t) else None for p, z_p in zip(self.partners, partner_latents)]
        fused, carried = fuse_predictions(
            z, eps, partner_latents, partner_eps, [p.weight for p in self.partners],
            [None if p.to_main is None else p.to_main.numpy for p in self.partners],
            [None if p.from_main is None else p.from_main.numpy for p in self.partners], a)
        return fused.astype(np.float32), [c.astype(np.float32) for c in carried]

    def __call__(self, state: np.ndarray, t: int) -> np.ndarray:
        z, partner_latents = self.unpack(state)
        fused, carried = self.fuse(z, partner_latents, int(t))
        return self.pack(fused, carried)


def resolution_bridge(z_low: np.ndarray, eps_low: np.ndarray, t: int, schedule: NoiseSchedule,
                      bridge: Optional[LatentBridge], noise: np.ndarray,
                      latent_upsample: Optional[Tuple[int, int]] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Sub-module 2 at T_low: the high-resolution latent z_t and its clean latent z0 (for measurements).

    Default: x0 of the low-resolution model (eq. 3), D_low, pixel upsampling and E_high (``bridge``), then
    eq. (1) with FRESH ``noise``. ``latent_upsample=(h, w)``: the paper's Fig. 3 baseline instead -
    bilinear upsampling of the noisy latent itself (same latent space only).
    """
    a = schedule.alpha_bar(t)
    x0_low = predict_x0(z_low, eps_low, a)
    if latent_upsample is not None:
        def up(v):
            return ops.interpolate(ms.Tensor(np.ascontiguousarray(v, np.float32)), size=tuple(latent_upsample),
                                   mode="bilinear").asnumpy()
        return up(z_low), up(x0_low)
    z0_high = bridge.numpy(x0_low)
    if noise.shape != z0_high.shape:
        raise ValueError(f"noise shape {noise.shape} != high-resolution latent shape {z0_high.shape}")
    return add_noise(z0_high, noise, a).astype(np.float32), z0_high
