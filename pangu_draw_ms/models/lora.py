"""LoRA adapters on a network's dense layers, for training (Hu et al. 2021, eq. (3)): h = W0 x + (alpha / r) B A x.

W0 (the layer's weight) stays frozen; A (``lora_down``, r x in) starts at PyTorch's default dense init and B
(``lora_up``, out x r) at zero, so an adapted network starts exactly as the base network (sec. 4.1). The
adapted layer keeps the original layer (its weight and bias keep their names) and adds the two factors,
named ``<layer>.lora_down`` / ``<layer>.lora_up``: a checkpoint of the adapters is the parameters with those
names. Merging trained adapters into the weights for inference is :mod:`pangu_draw_ms.io.lora`'s (files in the
diffusers and kohya layouts).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import mindspore as ms
from mindspore import Parameter, mint, nn
from mindspore.common.initializer import HeUniform, initializer

from ..config import LORA_TARGETS
from . import layers as L


class LoRADense(nn.Cell):
    """``base`` (a frozen :class:`~pangu_draw_ms.models.layers.Dense`) plus the low-rank update
    (alpha / r) B A, A on the input after dropout (probability ``dropout``, training only)."""

    def __init__(self, base: L.Dense, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1 or rank > min(base.in_features, base.out_features):
            raise ValueError(f"LoRA rank must be in [1, {min(base.in_features, base.out_features)}] for a "
                             f"{base.in_features} -> {base.out_features} layer, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.dropout = L.Dropout(dropout)
        self.lora_down = Parameter(initializer(HeUniform(math.sqrt(5)), (rank, base.in_features), ms.float32),
                                   name="lora_down")
        self.lora_up = Parameter(initializer("zeros", (base.out_features, rank), ms.float32), name="lora_up")

    def construct(self, x):
        dtype = self.base.dtype
        low = mint.nn.functional.linear(self.dropout(x).astype(dtype), self.lora_down.astype(dtype))
        return self.base(x) + mint.nn.functional.linear(low, self.lora_up.astype(dtype)) * self.scale


def target_suffixes(groups: Sequence[str]) -> List[str]:
    """The layer-name endings of the target ``groups`` (keys of :data:`LORA_TARGETS`)."""
    unknown = [g for g in groups if g not in LORA_TARGETS]
    if unknown or not groups:
        raise ValueError(f"LoRA targets {list(groups)} are not valid: give one or more of {list(LORA_TARGETS)}")
    return [suffix for g in groups for suffix in LORA_TARGETS[g]]


def add_lora_adapters(network: nn.Cell, groups: Sequence[str], rank: int, alpha: float,
                      dropout: float = 0.0) -> Dict[str, LoRADense]:
    """Replace every dense layer of ``network`` whose name ends in one of the target ``groups``' names by a
    :class:`LoRADense` around it; returns ``{layer name: adapted layer}``. Parameter names stay: the base
    weight is still ``<layer>.weight``, the factors are ``<layer>.lora_down`` and ``<layer>.lora_up``. Call it
    before the network's first call: a graph compiled in GRAPH_MODE is not rebuilt for the new layers."""
    suffixes = target_suffixes(groups)
    cells = dict(network.cells_and_names())
    chosen = [name for name, cell in cells.items()
              if isinstance(cell, L.Dense) and any(name == s or name.endswith("." + s) for s in suffixes)]
    if not chosen:
        raise ValueError(f"{type(network).__name__} has no dense layer named like {suffixes}")
    adapters = {}
    for name in chosen:
        parent_name, _, attribute = name.rpartition(".")
        parent, base = cells[parent_name], cells[name]
        adapter = LoRADense(base, rank, alpha, dropout)
        if isinstance(parent, nn.SequentialCell):
            # SequentialCell.__setitem__ re-derives a name prefix from its children's parameter names and fails
            # on our names (a "0" inside "transformer_blocks.0"); the names are set below anyway.
            parent._cells[attribute] = adapter
            parent.cell_list = list(parent._cells.values())
        else:
            setattr(parent, attribute, adapter)
        # Inserting a cell re-prefixes its parameters; give them the names of the layer they adapt.
        base.weight.name = f"{name}.weight"
        if base.has_bias:
            base.bias.name = f"{name}.bias"
        adapter.lora_down.name, adapter.lora_up.name = f"{name}.lora_down", f"{name}.lora_up"
        adapters[name] = adapter
    return adapters


def lora_parameters(adapters: Dict[str, LoRADense]) -> List[Parameter]:
    """The adapters' trainable factors (A then B of each layer, in layer order)."""
    return [p for adapter in adapters.values() for p in (adapter.lora_down, adapter.lora_up)]
