"""Building and loading the networks of a pipeline, and keeping them resident or not.

The networks come from a model directory (:mod:`pangu_draw_ms.io.model_dir`: ``config.yaml`` and one
weight file per component), or from any ``{component: path}`` files. Without weight files every network
gets seeded random weights (for tests and smoke runs), which the pipeline reports.

Memory modes:
* ``resident``: every network is built once and kept.
* ``sequential``: a network is built when first needed and released when the run moves on - the text
  encoders after encoding, the structure UNet when the texture UNet takes over, the VAE after decoding.
  Peak memory is then one UNet plus activations instead of two UNets, both encoders and the VAE.
"""
from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mindspore as ms
from mindspore import nn

from ..config import PanGuDrawConfig, load_config
from ..io.checkpoint import open_checkpoint
from ..io.layouts import build_component, load_component
from ..io.model_dir import COMPONENTS, CONFIG_FILE, check_roles, find_component_files
from ..models import layers as L

logger = logging.getLogger(__name__)

MEMORY_MODES = ("resident", "sequential")


@dataclass
class ComponentStore:
    """Builds each network on demand from the config and its weight file (or seeded random weights).

    ``precision``: compute dtype of the UNets and text encoders (``fp32``/``fp16``/``bf16``; default: the
    device's). ``weights_dtype``: storage dtype of their parameters (``fp16`` halves their memory; norms
    and softmax still compute in float32). The VAE follows ``config.vae.force_fp32``. Files load one
    tensor at a time in any layout :func:`pangu_draw_ms.io.layouts.load_component` knows (ours, the
    released sgm files, diffusers); a structure/texture pair that looks swapped is refused unless
    ``allow_swapped``.
    """

    config: PanGuDrawConfig
    files: Dict[str, Optional[str]] = field(default_factory=dict)
    precision: Optional[str] = None
    weights_dtype: str = "fp32"
    memory: str = "resident"
    random_seed: int = 0
    allow_swapped: bool = False
    show_progress: bool = False
    on_build: Optional[Callable[[str], None]] = None
    _cells: Dict[str, nn.Cell] = field(default_factory=dict, init=False, repr=False)
    _loras: Dict[str, List[Tuple[str, float]]] = field(default_factory=dict, init=False, repr=False)
    _merged: Dict[str, object] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"unknown memory mode {self.memory!r}; valid: {', '.join(MEMORY_MODES)}")
        unknown = sorted(set(self.files) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; valid: {list(COMPONENTS)}")
        given = [name for name in COMPONENTS if self.files.get(name)]
        if given and len(given) != len(COMPONENTS):
            raise ValueError(f"weights given for {given} only: name a file for every component "
                             f"{list(COMPONENTS)} (or none, for seeded random weights)")
        self.compute_dtype = L.compute_dtype(self.precision)
        self.storage_dtype = L.compute_dtype(self.weights_dtype)
        if given:
            # The release accepted its two UNet files swapped without a word; we check the recorded role.
            with open_checkpoint(self.files["structure_unet"]) as structure, \
                    open_checkpoint(self.files["texture_unet"]) as texture:
                check_roles(structure, texture, allow_swapped=self.allow_swapped)

    @classmethod
    def from_pretrained(cls, model_dir: str, **kwargs) -> "ComponentStore":
        config = load_config(os.path.join(model_dir, CONFIG_FILE))
        return cls(config, find_component_files(model_dir), **kwargs)

    @property
    def random_weights(self) -> bool:
        return not any(self.files.get(name) for name in COMPONENTS)

    def _build(self, name: str) -> nn.Cell:
        kind = "unet" if name.endswith("unet") else name
        # Built lazily: parameters get their storage dtype first, then values (seeded random or loaded
        # tensor by tensor), so no float32 copy of a large network is ever materialised.
        cell = build_component(kind, getattr(self.config, kind), dtype=self.compute_dtype, materialize=False)
        if name != "vae" and self.storage_dtype != ms.float32:
            for param in cell.get_parameters():
                param.set_dtype(self.storage_dtype)
        path = self.files.get(name)
        if path is None:
            # Each component draws from its own seed: building one alone or all together gives the same.
            ms.set_seed(self.random_seed + COMPONENTS.index(name))
            cell.init_parameters_data()
        elif self.show_progress:
            from tqdm import tqdm

            with tqdm(desc=f"loading {name}", unit="B", unit_scale=True, leave=False) as bar:
                load_component(cell, path, kind, progress=bar)
        else:
            load_component(cell, path, kind)
        cell.set_train(False)
        if self.on_build is not None:
            self.on_build(name)
        return cell

    def get(self, name: str) -> nn.Cell:
        """The network ``name``, built (and loaded) on first use."""
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; valid: {list(COMPONENTS)}")
        if name not in self._cells:
            self._cells[name] = self._build(name)
            self._merge_loras(name)
        return self._cells[name]

    def add_lora(self, path: str, scale: float, components: Sequence[str]) -> None:
        """Merge the UNet LoRA ``path`` at ``scale`` into the UNet ``components`` (``structure_unet`` and/or
        ``texture_unet``) - now where they are built, and whenever they are built again (sequential mode)."""
        for name in components:
            if name not in ("structure_unet", "texture_unet"):
                raise ValueError(f"a LoRA applies to structure_unet or texture_unet, not {name!r}")
            self._loras.setdefault(name, []).append((path, float(scale)))
            if name in self._cells:
                self._merge_loras(name)

    def remove_loras(self) -> None:
        """Take every LoRA out of the UNets (their original weights back, bit for bit)."""
        for merged in self._merged.values():
            merged.unmerge()
        self._merged.clear()
        self._loras.clear()

    def _merge_loras(self, name: str) -> None:
        from ..io.lora import MergedLoRAs, read_lora

        if name in self._merged:  # merge all again from the original weights
            self._merged.pop(name).unmerge()
        if self._loras.get(name):
            cell = self._cells[name]
            self._merged[name] = MergedLoRAs(cell, [(read_lora(path, cell), scale)
                                                    for path, scale in self._loras[name]])

    def done_with(self, name: str) -> None:
        """The run no longer needs ``name``: released in ``sequential`` mode, kept in ``resident`` mode."""
        if self.memory == "sequential" and name in self._cells:
            del self._cells[name]
            self._merged.pop(name, None)  # a rebuilt network gets its LoRAs merged again
            gc.collect()

    @property
    def resident(self):
        return sorted(self._cells)
