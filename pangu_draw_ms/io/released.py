"""The released PanGu-Draw 3.0 checkpoints: a pair of whole-model files, and which one is which.

The release ships ``pangu_high_timestamp-*.ckpt`` (the structure generator, denoising t >= t_struct) and
``pangu_low_timestamp-*.ckpt`` (the texture generator, t < t_struct). Each holds a UNet, both text
encoders and the VAE in the sgm layout (:mod:`pangu_draw_ms.io.layouts`); the release uses only the
texture file's text encoders and VAE, and so do we: the structure file's copies are never read.

Swapped files. Both UNets have one architecture, so a swapped pair loads without any error and quietly
gives worse images. :func:`check_roles` compares the role of each file, taken from

1. the ``role`` metadata of the files we write (``tools/convert.py`` records ``structure``/``texture``
   and the timestep range), else
2. the file name: the release's ``high_timestamp``/``low_timestamp`` (also ``high_timestep``,
   ``low_timestep``, ``structure``, ``texture``).

Both are exact when present. No weight statistic is used: without the real weights none can be
validated, and an unvalidated threshold would either cry wolf or stay silent. A file whose role cannot
be told is not checked (logged at INFO).
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Tuple

import yaml

from ..config import PanGuDrawConfig, to_dict
from .checkpoint import CheckpointReader, SaveSummary, atomic_output, open_checkpoint
from .layouts import ComponentReport, convert_component, load_component

logger = logging.getLogger(__name__)

ROLES = ("structure", "texture")
_NAME_HINTS = {"structure": ("high_timestamp", "high_timestep", "structure"),
               "texture": ("low_timestamp", "low_timestep", "texture")}


class SwappedCheckpointsError(ValueError):
    """The structure and texture checkpoints look swapped (or are two files of one role)."""


def checkpoint_role(reader: CheckpointReader) -> Tuple[Optional[str], str]:
    """``(role, evidence)`` of a file: ``structure``, ``texture`` or None, and what said so."""
    role = reader.metadata.get("role")
    if role in ROLES:
        return role, f"its metadata says role={role!r}"
    name = os.path.basename(reader.path).lower()
    for role, hints in _NAME_HINTS.items():
        hint = next((h for h in hints if h in name), None)
        if hint:
            return role, f"its name contains {hint!r}"
    return None, "neither its metadata nor its name tells"


def check_roles(structure: CheckpointReader, texture: CheckpointReader, allow_swapped: bool = False) -> None:
    """Raise :class:`SwappedCheckpointsError` when the file given as structure generator is known to be a
    texture file, or the reverse; with ``allow_swapped`` log a warning instead."""
    problems = []
    for given, reader in (("structure", structure), ("texture", texture)):
        role, evidence = checkpoint_role(reader)
        if role is None:
            logger.info("%s: cannot verify that it is the %s generator (%s)", reader.path, given, evidence)
        elif role != given:
            problems.append(f"{os.path.basename(reader.path)} was given as the {given} generator but is a {role} "
                            f"file ({evidence})")
    if not problems:
        return
    message = ("the structure and texture checkpoints look swapped: " + "; ".join(problems) + ". The structure "
               "(high-timestep) file must denoise t >= t_struct and the texture (low-timestep) file the rest; "
               "pass them the other way round, or allow_swapped=True (CLI: --allow-swapped) if you mean it")
    if not allow_swapped:
        raise SwappedCheckpointsError(message)
    logger.warning(message)


def _open_pair(structure: Optional[str], texture: Optional[str], allow_swapped: bool):
    if structure is None and texture is None:
        raise ValueError("give the structure (high-timestep) file, the texture (low-timestep) file, or both")
    readers = {"structure": open_checkpoint(structure) if structure else None}
    try:
        readers["texture"] = open_checkpoint(texture) if texture else None
        if readers["structure"] is not None and readers["texture"] is not None:
            check_roles(readers["structure"], readers["texture"], allow_swapped)
    except BaseException:
        _close(readers)
        raise
    return readers


def _bar(progress, name: str):
    return progress(name) if progress is not None else nullcontext()


def _close(readers) -> None:
    for reader in readers.values():
        if reader is not None:
            reader.close()


def load_released(structure: Optional[str] = None, texture: Optional[str] = None, *, structure_unet=None,
                  texture_unet=None, vae=None, conditioner=None, strict: bool = True, allow_swapped: bool = False,
                  progress: Optional[Callable[[str], object]] = None) -> Dict[str, ComponentReport]:
    """Load the released pair (or one file of it) into the cells given, streaming one tensor at a time.

    ``structure_unet`` comes from ``structure``, ``texture_unet`` from ``texture``; ``vae`` and
    ``conditioner`` from ``texture`` (from ``structure`` only when no texture file is given). The files
    are role-checked first (:func:`check_roles`). ``progress(name)`` makes a progress bar per cell (e.g.
    ``lambda name: tqdm(desc=name, unit="B", unit_scale=True)``). Returns a report per loaded cell.
    """
    readers = _open_pair(structure, texture, allow_swapped)
    shared_from = readers["texture"] or readers["structure"]
    jobs = (("structure_unet", structure_unet, readers["structure"], "unet"),
            ("texture_unet", texture_unet, readers["texture"], "unet"),
            ("vae", vae, shared_from, "vae"), ("conditioner", conditioner, shared_from, "conditioner"))
    reports = {}
    try:
        for name, cell, reader, component in jobs:
            if cell is None:
                continue
            if reader is None:
                raise ValueError(f"{name} needs the {name.split('_')[0]} checkpoint, which was not given")
            with _bar(progress, name) as bar:
                reports[name] = load_component(cell, reader, component, strict=strict, progress=bar)
    finally:
        _close(readers)
    return reports


def convert_released(out_dir: str, config: PanGuDrawConfig, structure: Optional[str] = None,
                     texture: Optional[str] = None, dtype: Optional[str] = None, file_format: str = "safetensors",
                     allow_swapped: bool = False, progress: Optional[Callable[[str], object]] = None
                     ) -> Dict[str, Tuple[ComponentReport, SaveSummary]]:
    """Split the released pair into per-component files of our layout in ``out_dir``.

    Writes ``structure_unet``, ``texture_unet``, ``vae`` and ``conditioner`` (``.safetensors`` or
    ``.ckpt``), each recording its component and config; the UNets also record their role and timestep
    range (the swapped-files guard reads these back). ``config.yaml`` is written beside them: the folder is
    then a model directory (``PanGuDrawPipeline.from_pretrained``).
    Each file is written atomically: a failure leaves earlier files of ``out_dir`` untouched.
    ``progress``: as in :func:`load_released`.
    """
    if file_format not in ("safetensors", "ckpt"):
        raise ValueError(f"file_format {file_format!r} is not valid; choose 'safetensors' or 'ckpt'")
    if not os.path.isdir(out_dir):
        raise ValueError(f"output folder {out_dir} does not exist")
    readers = _open_pair(structure, texture, allow_swapped)
    shared_from = readers["texture"] or readers["structure"]
    ranges = {"structure": f"[{config.t_struct}, {config.num_train_timesteps})", "texture": f"[0, {config.t_struct})"}
    jobs = [(f"{role}_unet", readers[role], "unet", config.unet, {"role": role, "timesteps": ranges[role]})
            for role in ROLES if readers[role] is not None]
    jobs += [("vae", shared_from, "vae", config.vae, {}), ("conditioner", shared_from, "conditioner", config.conditioner, {})]
    results = {}
    try:
        for name, reader, component, component_config, metadata in jobs:
            path = os.path.join(out_dir, f"{name}.{file_format}")
            with _bar(progress, name) as bar:
                results[name] = convert_component(reader, component, component_config, path, dtype=dtype,
                                                  metadata=metadata, progress=bar)
    finally:
        _close(readers)
    write_config(config, os.path.join(out_dir, "config.yaml"))
    return results


def write_config(config, path: str) -> None:
    """Atomically write a config dataclass as YAML (``load_config(path, type(config))`` reads it back)."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False, allow_unicode=True)
