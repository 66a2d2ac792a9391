"""The released PanGu-Draw 3.0 checkpoints: a pair of whole-model files, and which one is which.

The release ships ``pangu_high_timestamp-*.ckpt`` (the structure generator, denoising t >= t_struct) and
``pangu_low_timestamp-*.ckpt`` (the texture generator, t < t_struct). Each holds a UNet, both text
encoders and the VAE in the sgm layout (:mod:`pangu_draw_ms.io.layouts`); the release uses only the
texture file's text encoders and VAE, and so do we: the structure file's copies are never read.

Swapped files load without any error and quietly give worse images: the pair is role-checked first
(:func:`pangu_draw_ms.io.model_dir.check_roles`, from the files' metadata or names).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Tuple

from ..config import PanGuDrawConfig
from .checkpoint import SaveSummary, open_checkpoint
from .layouts import ComponentReport, convert_component, load_component
from .model_dir import CONFIG_FILE, ROLES, check_roles, role_metadata, write_config


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
    jobs = [(f"{role}_unet", readers[role], "unet", config.unet, role_metadata(config, role))
            for role in ROLES if readers[role] is not None]
    jobs += [("vae", shared_from, "vae", config.vae, {}),
             ("conditioner", shared_from, "conditioner", config.conditioner, {})]
    results = {}
    try:
        for name, reader, component, component_config, metadata in jobs:
            path = os.path.join(out_dir, f"{name}.{file_format}")
            with _bar(progress, name) as bar:
                results[name] = convert_component(reader, component, component_config, path, dtype=dtype,
                                                  metadata=metadata, progress=bar)
    finally:
        _close(readers)
    write_config(config, os.path.join(out_dir, CONFIG_FILE))
    return results
