"""The denoiser contract every sampler, guidance rule, expert split and Coop-Diffusion builds on.

An *eps model* maps (z_t, t, conditioning) to the predicted noise: ``model(z, t, cond) -> eps`` with
``z`` float32 (B, C, h, w) latents in the model's own latent space (eq. (1)), ``t`` an integer timestep and
``cond`` a :class:`Conditioning` of batch B. :class:`UNetEpsModel` wraps one of our UNet cells (optionally
with a ControlNet); anything else with that call signature (experts, fused Coop models, a diffusers model
in tests) fits in its place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import nn

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
    """A ControlNet and its control image (1, C, H, W) in [0, 1] at H, W = ControlNet's factor x latents, or
    one per image of the run (N, C, H, W), in the run's image order (every guidance branch gets the same N).

    ``guess_mode`` (ControlNet paper sec. 4 / diffusers): the residuals of block i are scaled by
    10^(i/n - 1), rising to 1 at the middle block; with classifier-free guidance the unconditional rows
    get no control (their ``Conditioning.control_scale`` is 0).
    """

    controlnet: nn.Cell
    image: np.ndarray
    scale: float = 1.0
    guess_mode: bool = False

    def row_scale(self, branch: str, batch: int) -> np.ndarray:
        """``Conditioning.control_scale`` for the rows of a guidance branch."""
        scale = 0.0 if (self.guess_mode and branch == "uncond") else self.scale
        return np.full((batch,), scale, np.float32)


def give_unique_names(kept: Sequence[nn.Cell], renamed: Sequence[tuple]) -> None:
    """Make the parameter names of the networks one graph will hold unique, renaming only the ``renamed``
    ((prefix, cell) pairs) parameters whose names are taken: "<prefix>.<name>". Why: on the first call of a
    cell whose parameters share a name, MindSpore renames EVERY parameter of it to its attribute path -
    the ``kept`` networks (the pipeline's UNet, its VAE) too, which breaks their other graphs and their
    saved keys. A ControlNet copies its UNet's names, and two UNets or VAEs of one family share theirs."""
    taken, seen = set(), set()
    for cell in kept:
        for param in cell.get_parameters():
            seen.add(id(param))
            taken.add(param.name)
    for prefix, cell in renamed:
        for param in cell.get_parameters():
            if id(param) in seen:  # shared with a network named before (a ControlNet's base UNet)
                continue
            seen.add(id(param))
            while param.name in taken:
                param.name = f"{prefix}.{param.name}"
            taken.add(param.name)


class ControlledUNet(nn.Cell):
    """A UNet fed by a ControlNet: residuals = ControlNet(x, hint, ...) x per-row scale (x the guess-mode
    ramp), added to the UNet's skip features and middle block. One graph."""

    def __init__(self, unet: UNetModel, controlnet: nn.Cell, guess_mode: bool):
        super().__init__(auto_prefix=False)  # the networks keep their own parameter names
        give_unique_names([unet], [("controlnet", controlnet)])
        self.unet = unet
        self.controlnet = controlnet
        self.guess_mode = guess_mode
        n = unet.num_control
        self.ramp = tuple(float(s) for s in np.logspace(-1, 0, n)) if guess_mode else (1.0,) * n

    def construct(self, x, timesteps, context, y, hint, row_scale):
        residuals = self.controlnet(x, hint, timesteps, context, y, row_scale.reshape(-1, 1, 1, 1))
        residuals = tuple(r * s for r, s in zip(residuals, self.ramp))
        return self.unet(x, timesteps, context, y, residuals)


class UNetEpsModel:
    """The eps model of one UNet cell (optionally with a ControlNet feeding it). Each distinct input shape
    compiles once (GRAPH_MODE) and is reused."""

    def __init__(self, unet: UNetModel, control: Optional[ControlInput] = None):
        self.unet = unet
        self.has_vector = unet.has_label_emb
        self.control = control
        self.network = unet if control is None else ControlledUNet(unet, control.controlnet, control.guess_mode)
        # The tensors of the last conditioning seen: a run gives the same one at every step (made anew they took
        # a tenth of the demo step's host time).
        self._conditioning: Optional[Tuple[Conditioning, tuple]] = None

    def condition_inputs(self, t: int, cond: Conditioning) -> tuple:
        """The network's tensor inputs after the latents, for ``cond``'s rows at timestep ``t``."""
        if self.has_vector and cond.vector is None:
            raise ValueError("this UNet takes a vector conditioning (adm_in_channels) but none was given")
        if self._conditioning is None or self._conditioning[0] is not cond:
            self._conditioning = (cond, self._condition_tensors(cond))
        context, vector, control = self._conditioning[1]
        timesteps = ms.Tensor(np.full((cond.batch_size,), float(t), np.float32))
        # A model without label_emb ignores y; the timesteps stand in so that the graph sees a tensor.
        return (timesteps, context, timesteps if vector is None else vector) + control

    def _condition_tensors(self, cond: Conditioning) -> tuple:
        """(context, vector or None, the ControlNet's (hint, row scale) or ()) of ``cond`` as tensors."""
        context = ms.Tensor(np.ascontiguousarray(cond.context, np.float32))
        vector = ms.Tensor(np.ascontiguousarray(cond.vector, np.float32)) if self.has_vector else None
        if self.control is None:
            return context, vector, ()
        batch = cond.batch_size
        image = self.control.image.astype(np.float32)
        if batch % image.shape[0] != 0:
            raise ValueError(f"{image.shape[0]} control images for {batch} UNet rows: give one control image, or "
                             f"one per image of the run")
        hint = np.tile(image, (batch // image.shape[0], 1, 1, 1))  # guidance branches are blocks of the run's images
        scale = np.full((batch,), self.control.scale, np.float32) if cond.control_scale is None \
            else cond.control_scale
        return context, vector, (ms.Tensor(hint), ms.Tensor(scale.astype(np.float32)))

    def __call__(self, z: np.ndarray, t: int, cond: Conditioning) -> np.ndarray:
        if cond.batch_size != z.shape[0]:
            raise ValueError(f"conditioning batch {cond.batch_size} != latent batch {z.shape[0]}")
        x = ms.Tensor(np.ascontiguousarray(z, np.float32))
        return self.network(x, *self.condition_inputs(t, cond)).asnumpy()
