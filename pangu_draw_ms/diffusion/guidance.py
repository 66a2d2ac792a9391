"""Classifier-free and style guidance, all branches in one batched model call.

PanGu-Draw supplementary, style guidance:
    eps = eps(uc) + s (eps(c) - eps(uc)) + sum_i s_i (eps(c_i) - eps(c))
with ``uc`` the encoding of the negative prompt (default ""), ``c`` the prompt, ``c_i`` the prompt with a
style prefix (aesthetic, anime, photography). It is a linear combination of branch predictions with
weights w_uc = 1 - s, w_c = s - sum_i s_i, w_i = s_i; branches are stacked into one batch so the UNet
runs once per step. Optional guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and
Sample Steps are Flawed", eqs. 15-16) pulls the guided prediction's std back to the conditional one's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .denoiser import Conditioning, ControlInput, EpsModel, UNetEpsModel

# Prefixes of the released PanGu-Draw 3.0 style conditions (prepended to the prompt, both encoders).
STYLE_PREFIXES: Dict[str, str] = {"aesthetic": "義 ", "anime": "饅 ", "photography": "霙 "}


def combine(eps_per_branch, weights):
    """sum_k w_k eps_k - the guided prediction (operators only: numpy arrays or tensors in a graph)."""
    guided = weights[0] * eps_per_branch[0]
    for weight, eps in zip(weights[1:], eps_per_branch[1:]):
        guided = guided + weight * eps
    return guided


@dataclass
class GuidanceBranch:
    """One conditioning of the guided batch and its weight in the linear combination."""

    name: str
    cond: Conditioning
    weight: float


def guidance_weights(guidance_scale: float, style_scales: Dict[str, float]) -> Dict[str, float]:
    """The branch weights {"uncond", "cond", style...} of the combined guidance formula."""
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    unknown = sorted(set(style_scales) - set(STYLE_PREFIXES))
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; valid: {sorted(STYLE_PREFIXES)}")
    for style, scale in style_scales.items():
        if scale < 0:
            raise ValueError(f"{style} scale must be >= 0, got {scale}")
    weights = {"uncond": 1.0 - guidance_scale, "cond": guidance_scale - sum(style_scales.values())}
    weights.update({style: scale for style, scale in style_scales.items() if scale != 0})
    return weights


def guidance_branches(conds: Mapping[str, Conditioning], weights: Mapping[str, float], num_images: int,
                      control: Optional[ControlInput] = None) -> List[GuidanceBranch]:
    """One branch per weight, in the weights' order: its conditioning (a row per prompt, ``conds[name]``) repeated
    for ``num_images`` images per prompt. With ``control`` each branch gets the ControlNet's per-row scale
    (in guess mode none for the unconditional branch)."""
    branches = []
    for name, weight in weights.items():
        cond = conds[name].repeat(num_images)
        if control is not None:
            cond.control_scale = control.row_scale(name, cond.batch_size)
        branches.append(GuidanceBranch(name, cond, weight))
    return branches


class GuidedDenoiser:
    """``denoise(z, t) -> eps``: the sampler-facing contract over an eps model and guidance branches.

    Branches with weight 0 are not computed, except the conditional one when rescaling needs it.
    """

    def __init__(self, model: EpsModel, branches: Sequence[GuidanceBranch], guidance_rescale: float = 0.0):
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        needed = [b for b in branches if b.weight != 0 or (b.name == "cond" and guidance_rescale > 0)]
        if not needed:
            raise ValueError("guidance leaves no branch with a non-zero weight")
        self.model = model
        self.branches: List[GuidanceBranch] = needed
        self.guidance_rescale = guidance_rescale
        self.batched_cond = Conditioning.concat([b.cond for b in needed])
        sizes = {b.cond.batch_size for b in needed}
        if len(sizes) != 1:
            raise ValueError(f"all guidance branches need the same batch size, got {sorted(sizes)}")
        self.batch_size = sizes.pop()
        self._graph: Optional[Tuple[nn.Cell, GuidedUNet, ms.Tensor]] = None  # (network, wrapper, weights) of graph()

    @property
    def compilable(self) -> bool:
        """Whether :meth:`graph` can express this guidance as one graph (no rescale; expert routers or a
        single model of UNets)."""
        return self.guidance_rescale == 0 and hasattr(self.model, "model_for")

    def graph(self, t: int):
        """(GuidedUNet cell, its inputs after the latents) of this guidance at timestep t, for a compiled
        step (which keeps one graph per network and number of branches: this cell is a light wrapper that only
        names them, made once per run and expert). Records the evaluation in the model's trace."""
        if not self.compilable:
            raise ValueError("guidance rescale (or a non-UNet model) has no compiled form; use the denoiser")
        model = self.model.model_for(t)
        if not isinstance(model, UNetEpsModel):
            raise TypeError(f"a compiled step needs UNet eps models, got {type(model).__name__}")
        # Kept while the network stays (a cell built per step took a sixth of the demo step's host time); only the
        # current network's, so that a router releasing the other expert frees it.
        if self._graph is None or self._graph[0] is not model.network:
            self._graph = (model.network, GuidedUNet(model.network, len(self.branches)),
                           ms.Tensor(np.array([b.weight for b in self.branches], np.float32)))
        _, cell, weights = self._graph
        return cell, (weights,) + model.condition_inputs(t, self.batched_cond)

    def __call__(self, z: np.ndarray, t: int) -> np.ndarray:
        k = len(self.branches)
        eps_all = self.model(np.concatenate([z] * k, axis=0), t, self.batched_cond)
        eps_per_branch: Tuple[np.ndarray, ...] = tuple(np.split(eps_all, k, axis=0))
        guided = combine(eps_per_branch, [b.weight for b in self.branches])
        if self.guidance_rescale > 0:
            cond = eps_per_branch[[b.name for b in self.branches].index("cond")]
            axes = tuple(range(1, z.ndim))
            rescaled = guided * (cond.std(axis=axes, keepdims=True) / guided.std(axis=axes, keepdims=True))
            guided = self.guidance_rescale * rescaled + (1.0 - self.guidance_rescale) * guided
        return guided.astype(np.float32)


class GuidedUNet(nn.Cell):
    """The guided prediction of one network as ONE graph: the latents tiled once per branch, one network
    call on the stacked branch conditionings, the weighted sum (the same :func:`combine`).

    ``network``: a UNetModel or a ControlledUNet; ``num_branches``: K. Inputs: ``z`` (B, ...), the K branch
    weights as a (K,) tensor (an input, not a constant, so that one graph serves every guidance scale),
    then the network's remaining inputs for the K*B stacked rows (timesteps, context, vector[, hint,
    control scale]).
    """

    def __init__(self, network: nn.Cell, num_branches: int):
        super().__init__(auto_prefix=False)  # the network keeps its own parameter names
        self.network = network
        self.num_branches = int(num_branches)

    def construct(self, z, weights, *inputs):
        k = self.num_branches
        b = z.shape[0]
        eps = self.network(ops.tile(z, (k, 1, 1, 1)), *inputs)
        return combine(tuple(eps[i * b:(i + 1) * b] for i in range(k)), tuple(weights[i] for i in range(k)))
