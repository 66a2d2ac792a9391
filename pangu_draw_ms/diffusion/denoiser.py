"""The denoiser contract every sampler, guidance rule, expert split and Coop-Diffusion builds on.

An *eps model* maps (z_t, t, conditioning) to the predicted noise: ``model(z, t, cond) -> eps`` with
``z`` float32 (B, C, h, w) latents in the model's own latent space (eq. (1)), ``t`` an integer timestep and
``cond`` a :class:`Conditioning` of batch B. :class:`UNetEpsModel` wraps one of our UNet cells (optionally
with a ControlNet); anything else with that call signature (experts, fused Coop models, a diffusers model
in tests) fits in its place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import mindspore as ms

from ..models.unet import UNetModel


def _concat(parts):
    return None if any(p is None for p in parts) else np.concatenate(parts, axis=0)


@dataclass
class Conditioning:
    """What a UNet is conditioned on, per sample: cross-attention features, the vector input, and (for
    a ControlNet) how strongly the control applies to each sample (0 for guess mode's unconditional rows)."""

    context: np.ndarray                       # (B, L, context_dim)
    vector: Optional[np.ndarray] = None       # (B, adm_in_channels), or None for models without label_emb
    control_scale: Optional[np.ndarray] = None  # (B,) ControlNet residual scale per sample

    @property
    def batch_size(self) -> int:
        return int(self.context.shape[0])

    @staticmethod
    def concat(parts: Sequence["Conditioning"]) -> "Conditioning":
        return Conditioning(np.concatenate([p.context for p in parts], axis=0), _concat([p.vector for p in parts]),
                            _concat([p.control_scale for p in parts]))

    def repeat(self, times: int) -> "Conditioning":
        """Each sample repeated ``times`` times in place (prompt-major order: p0 p0 p1 p1 ...)."""
        def rep(a):
            return None if a is None else np.repeat(a, times, axis=0)
        return Conditioning(rep(self.context), rep(self.vector), rep(self.control_scale))


class EpsModel(Protocol):
    def __call__(self, z: np.ndarray, t: int, cond: Conditioning) -> np.ndarray:
        ...


@dataclass
class ControlInput:
    """A ControlNet and its control image (1, C, H, W) in [0, 1] at H, W = ControlNet's factor x latents.

    ``guess_mode`` (ControlNet paper sec. 4 / diffusers): the residuals of block i are scaled by
    10^(i/n - 1), rising to 1 at the middle block; with classifier-free guidance the unconditional rows
    get no control (their ``Conditioning.control_scale`` is 0).
    """

    controlnet: ms.nn.Cell
    image: np.ndarray
    scale: float = 1.0
    guess_mode: bool = False

    def row_scale(self, branch: str, batch: int) -> np.ndarray:
        """``Conditioning.control_scale`` for the rows of a guidance branch."""
        scale = 0.0 if (self.guess_mode and branch == "uncond") else self.scale
        return np.full((batch,), scale, np.float32)


class UNetEpsModel:
    """The eps model of one UNet cell (and optionally a ControlNet feeding it residuals). Each distinct
    input shape compiles once (GRAPH_MODE) and is reused."""

    def __init__(self, unet: UNetModel, control: Optional[ControlInput] = None):
        self.unet = unet
        self.has_vector = unet.has_label_emb
        self.control = control

    def __call__(self, z: np.ndarray, t: int, cond: Conditioning) -> np.ndarray:
        if cond.batch_size != z.shape[0]:
            raise ValueError(f"conditioning batch {cond.batch_size} != latent batch {z.shape[0]}")
        if self.has_vector and cond.vector is None:
            raise ValueError("this UNet takes a vector conditioning (adm_in_channels) but none was given")
        timesteps = ms.Tensor(np.full((z.shape[0],), float(t), np.float32))
        # A model without label_emb ignores y; the timesteps stand in so that the graph sees a tensor.
        vector = ms.Tensor(np.ascontiguousarray(cond.vector, np.float32)) if self.has_vector else timesteps
        x = ms.Tensor(np.ascontiguousarray(z, np.float32))
        context = ms.Tensor(np.ascontiguousarray(cond.context, np.float32))
        residuals = None
        if self.control is not None:
            hint = np.repeat(self.control.image.astype(np.float32), z.shape[0], axis=0)
            scale = np.full((z.shape[0],), self.control.scale, np.float32) if cond.control_scale is None \
                else cond.control_scale
            residuals = self.control.controlnet(x, ms.Tensor(hint), timesteps, context, vector,
                                                ms.Tensor(scale.astype(np.float32)[:, None, None, None]))
            if self.control.guess_mode:
                residuals = tuple(r * float(s) for r, s in zip(residuals, np.logspace(-1, 0, len(residuals))))
            residuals = ms.mutable(tuple(residuals))
        return self.unet(x, timesteps, context, vector, residuals).asnumpy()
