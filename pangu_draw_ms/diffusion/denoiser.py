"""The denoiser contract every sampler, guidance rule, expert split and Coop-Diffusion builds on.

An *eps model* maps (z_t, t, conditioning) to the predicted noise: ``model(z, t, cond) -> eps`` with
``z`` float32 (B, C, h, w) latents in the model's own latent space (eq. (1)), ``t`` an integer timestep and
``cond`` a :class:`Conditioning` of batch B. :class:`UNetEpsModel` wraps one of our UNet cells; anything
else with that call signature (experts, fused Coop models, a diffusers model in tests) fits in its place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import mindspore as ms

from ..models.unet import UNetModel


@dataclass
class Conditioning:
    """What a UNet is conditioned on, per sample: cross-attention features and the vector input."""

    context: np.ndarray               # (B, L, context_dim)
    vector: Optional[np.ndarray]      # (B, adm_in_channels), or None for models without label_emb

    @property
    def batch_size(self) -> int:
        return int(self.context.shape[0])

    @staticmethod
    def concat(parts: Sequence["Conditioning"]) -> "Conditioning":
        vectors = [p.vector for p in parts]
        return Conditioning(
            context=np.concatenate([p.context for p in parts], axis=0),
            vector=None if any(v is None for v in vectors) else np.concatenate(vectors, axis=0),
        )

    def repeat(self, times: int) -> "Conditioning":
        """Each sample repeated ``times`` times in place (prompt-major order: p0 p0 p1 p1 ...)."""
        return Conditioning(np.repeat(self.context, times, axis=0),
                            None if self.vector is None else np.repeat(self.vector, times, axis=0))


class EpsModel(Protocol):
    def __call__(self, z: np.ndarray, t: int, cond: Conditioning) -> np.ndarray:
        ...


class UNetEpsModel:
    """The eps model of one UNet cell. Each distinct input shape compiles once (GRAPH_MODE) and is reused."""

    def __init__(self, unet: UNetModel):
        self.unet = unet
        self.has_vector = unet.has_label_emb

    def __call__(self, z: np.ndarray, t: int, cond: Conditioning) -> np.ndarray:
        if cond.batch_size != z.shape[0]:
            raise ValueError(f"conditioning batch {cond.batch_size} != latent batch {z.shape[0]}")
        if self.has_vector and cond.vector is None:
            raise ValueError("this UNet takes a vector conditioning (adm_in_channels) but none was given")
        timesteps = np.full((z.shape[0],), float(t), np.float32)
        # A model without label_emb ignores y; the timesteps stand in so that the graph sees a tensor.
        vector = cond.vector if self.has_vector else timesteps
        eps = self.unet(ms.Tensor(np.ascontiguousarray(z, np.float32)), ms.Tensor(timesteps),
                        ms.Tensor(np.ascontiguousarray(cond.context, np.float32)),
                        ms.Tensor(np.ascontiguousarray(vector, np.float32)))
        return eps.asnumpy()
