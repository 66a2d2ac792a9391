"""LoRA files for the UNet (Hu et al. 2021: W' = W + scale x (alpha / r) x B A), read from the layouts SDXL
LoRAs are shared in, and merged into (and exactly out of) our UNet's dense layers.

Layouts read (safetensors; the UNet part - text-encoder entries are refused by name):

* diffusers / PEFT: ``unet.<diffusers module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r), with
  an optional ``<module>.alpha``; the ``unet.`` prefix optional (``get_peft_model_state_dict`` omits it);
* diffusers' older attention processors: ``<...>.processor.to_q_lora.down.weight`` / ``up.weight``;
* kohya (sd-scripts): ``lora_unet_<module with '_' for '.'>.lora_down.weight`` / ``lora_up.weight`` /
  ``alpha``, the module named in the diffusers layout or in the sgm layout of SDXL's original checkpoints.

Module names are carried into ours by the UNet converter's mapping (:mod:`pangu_draw_ms.io.diffusers_unet`);
kohya's underscored names are matched against our dense layers' names with '.' read as '_'. Only dense
layers take LoRAs here (attention q/k/v/out, feed-forward, linear proj_in/out); convolution LoRAs (LoCon)
are refused.

Written (:func:`write_lora`, what training exports): the diffusers layout (``unet.<diffusers module>.lora_A``
/ ``lora_B``, alpha / r folded into B: diffusers and PEFT read a file without alphas at scale 1) or kohya's
(sgm module names, ``alpha`` stored), both loadable by diffusers' ``load_lora_weights`` and by us.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor, nn

from ..config import UNetConfig
from ..models import layers as L
from .checkpoint import load_tensors, save_checkpoint
from .diffusers_unet import UnmappedKeyError, diffusers_attention_module, map_module


class LoRAError(ValueError):
    """A LoRA file that does not fit the UNet, or a layout that is not read."""


@dataclass(frozen=True)
class LoRALayer:
    """One dense layer's low-rank update: ``down`` (r, in), ``up`` (out, r), its delta up @ down x alpha / r."""

    down: np.ndarray
    up: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        return (self.up.astype(np.float64) @ self.down.astype(np.float64)) * (self.alpha / self.rank)


_PEFT = re.compile(r"^(?:unet\.)?(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_PROCESSOR = re.compile(r"^(?:unet\.)?(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
                        r"(?P<part>down|up)\.weight$")
_KOHYA = re.compile(r"^lora_unet_(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder(_2)?\.|te\d?\.)")


def _dense_names(unet: nn.Cell) -> Dict[str, L.Dense]:
    return {name: cell for name, cell in unet.cells_and_names() if isinstance(cell, L.Dense)}


def _ours_from_diffusers(module: str, config: UNetConfig) -> Optional[str]:
    try:
        return map_module(module, config)
    except UnmappedKeyError:
        return None


def read_lora(path: str, unet: nn.Cell) -> Dict[str, LoRALayer]:
    """``{our dense layer name: LoRALayer}`` from a LoRA file in any layout above, for ``unet`` (a UNetModel).

    Raises :class:`LoRAError` naming the entries that fit no dense layer, the text-encoder entries, or shapes
    that do not fit."""
    tensors = load_tensors(path)
    dense = _dense_names(unet)
    underscored = {name.replace(".", "_"): name for name in dense}
    parts: Dict[str, Dict[str, np.ndarray]] = {}
    unknown, text = [], []
    for key, value in tensors.items():
        if _TEXT_ENCODER.match(key):
            text.append(key)
            continue
        target = part = None
        match = _PEFT.match(key) or _PROCESSOR.match(key)
        if match:
            module = match["module"]
            if "proj" in match.groupdict() and match["proj"]:
                module = f"{module}.{match['proj']}" + (".0" if match["proj"] == "to_out" else "")
            target = _ours_from_diffusers(module, unet.config)
            part = {"A": "down", "B": "up"}.get(match["part"], match["part"])
        elif key.endswith(".alpha") and not key.startswith("lora_unet_"):
            target = _ours_from_diffusers(key[:-len(".alpha")].removeprefix("unet."), unet.config)
            part = "alpha"
        else:
            match = _KOHYA.match(key)
            if match:
                target = underscored.get(match["module"]) or _kohya_diffusers_name(match["module"], unet, underscored)
                part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[match["part"]]
        if target is None or target not in dense:
            unknown.append(key)
            continue
        parts.setdefault(target, {})[part] = np.asarray(value)
    if text:
        raise LoRAError(f"{path}: {len(text)} text-encoder LoRA entries (e.g. {text[0]}); only UNet LoRAs are "
                        "read - use a file without them")
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise LoRAError(f"{path}: {len(unknown)} entries fit no dense layer of this UNet: {shown}. Read: diffusers/"
                        "PEFT (lora_A/lora_B), diffusers attention processors (to_q_lora.down/up), kohya "
                        "(lora_unet_*.lora_down/lora_up/alpha); convolution LoRAs are not supported")
    layers = {}
    for name, got in parts.items():
        if "down" not in got or "up" not in got:
            raise LoRAError(f"{path}: {name} has {sorted(got)} but needs both down (A) and up (B)")
        down, up = got["down"].reshape(got["down"].shape[0], -1), got["up"].reshape(got["up"].shape[0], -1)
        out_features, in_features = dense[name].weight.shape
        if down.shape[1] != in_features or up.shape != (out_features, down.shape[0]):
            raise LoRAError(f"{path}: {name} is ({out_features}, {in_features}) but its LoRA has down {down.shape} "
                            f"and up {up.shape}")
        alpha = float(np.asarray(got.get("alpha", down.shape[0])).reshape(-1)[0])
        layers[name] = LoRALayer(down.astype(np.float32), up.astype(np.float32), alpha)
    if not layers:
        raise LoRAError(f"{path} holds no UNet LoRA entries")
    return layers


def _kohya_diffusers_name(module: str, unet: nn.Cell, underscored: Mapping[str, str]) -> Optional[str]:
    """Our name for a kohya module named in the diffusers layout (``down_blocks_1_attentions_0_...``)."""
    match = re.match(r"^(down_blocks|up_blocks)_(\d+)_(attentions|resnets)_(\d+)_(.+)$", module) or \
        re.match(r"^(mid_block)_(attentions|resnets)_(\d+)_(.+)$", module)
    if not match:
        return None
    groups = match.groups()
    prefix = ".".join(groups[:-1])
    block = _ours_from_diffusers(f"{prefix}.x", unet.config)  # the block's path in ours, then its layer
    if block is None:
        return None
    return underscored.get(f"{block[:-len('.x')]}.{groups[-1]}".replace(".", "_"))


class MergedLoRAs:
    """LoRAs merged into a UNet's dense weights: W + sum_i scale_i x (alpha_i / r_i) B_i A_i, computed in
    float64 from the original weights; :meth:`unmerge` puts the original weights back bit for bit."""

    def __init__(self, unet: nn.Cell, loras: Sequence[Tuple[Mapping[str, LoRALayer], float]]):
        self.unet = unet
        dense = _dense_names(unet)
        self.original: Dict[str, np.ndarray] = {}
        deltas: Dict[str, np.ndarray] = {}
        for layers, scale in loras:
            for name, layer in layers.items():
                deltas[name] = deltas.get(name, 0.0) + float(scale) * layer.delta()
        for name, delta in deltas.items():
            weight = dense[name].weight
            self.original[name] = weight.asnumpy().copy()
            merged = self.original[name].astype(np.float64) + delta
            weight.set_data(Tensor(merged.astype(self.original[name].dtype)))

    def unmerge(self) -> None:
        dense = _dense_names(self.unet)
        for name, weight in self.original.items():
            dense[name].weight.set_data(Tensor(weight))
        self.original = {}


def lora_files(path: str, generators: Sequence[str]) -> Dict[str, str]:
    """``{generator: file}`` of a LoRA given as ``path``: a file goes into every generator named; a folder (what
    training stage ``lora`` exports) holds ``<generator>_lora.safetensors`` per generator, each for its own."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise LoRAError(f"{path}: no such LoRA file or folder")
        return {generator: path for generator in generators}
    found = {g: os.path.join(path, f"{g}_lora.safetensors") for g in generators}
    found = {g: f for g, f in found.items() if os.path.isfile(f)}
    if not found:
        raise LoRAError(f"{path} is a folder without {' or '.join(f'{g}_lora.safetensors' for g in generators)} "
                        "(the files training stage 'lora' writes); give a LoRA file or such a folder")
    return found


def parse_lora_argument(text: str) -> Tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (a command-line LoRA) -> (file, scale)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?\d*\.?\d+(e[-+]?\d+)?", scale, re.IGNORECASE):
        return path, float(scale)
    return text, 1.0


def lora_summary(layers: Mapping[str, LoRALayer]) -> str:
    ranks = sorted({layer.rank for layer in layers.values()})
    return f"{len(layers)} dense layers, rank {'/'.join(map(str, ranks))}"



#: The layouts :func:`write_lora` writes.
LORA_FILE_LAYOUTS = ("diffusers", "kohya")


def write_lora(path: str, layers: Mapping[str, LoRALayer], config: UNetConfig, layout: str = "diffusers",
               metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write ``layers`` (``{our dense layer name: LoRALayer}``) of a UNet of ``config`` to ``path`` (safetensors,
    atomically) in ``layout`` (see the module docstring); returns ``path``."""
    if layout not in LORA_FILE_LAYOUTS:
        raise ValueError(f"LoRA layout {layout!r} is not written; choose one of {list(LORA_FILE_LAYOUTS)}")
    tensors = {}
    for name, layer in layers.items():
        if layout == "diffusers":
            key = "unet." + diffusers_attention_module(name, config)
            tensors[f"{key}.lora_A.weight"] = layer.down
            tensors[f"{key}.lora_B.weight"] = (layer.up * (layer.alpha / layer.rank)).astype(np.float32)
        else:
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = layer.down
            tensors[f"{key}.lora_up.weight"] = layer.up
            tensors[f"{key}.alpha"] = np.array(layer.alpha, np.float32)
    save_checkpoint(tensors, path, metadata=dict(metadata or {}))
    return path
