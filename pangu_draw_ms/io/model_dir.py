"""Model directories: the folder format ``PanGuDrawPipeline.from_pretrained`` loads and training fills.

Layout (one weight file per component, our parameter names, component and config in the metadata)::

    config.yaml                   a PanGuDrawConfig
    structure_unet.safetensors    UNet for t >= t_struct   (metadata role=structure)
    texture_unet.safetensors      UNet for t < t_struct    (metadata role=texture)
    vae.safetensors               AutoencoderKL
    conditioner.safetensors       the text encoders (Conditioner parameters)
    <tokenizer>.model             a trained SentencePiece model, named in config.yaml by file name
    <role>_controlnet.safetensors optional: a ControlNet steering that generator (metadata role=<role>)

Weight files may also be ``.ckpt`` (``tools/convert.py --format ckpt``). ``tools/convert.py`` writes such a
directory from the released pair; training stages fill one a component at a time, and later stages read
the config (with the VAE's measured ``scaling_factor``) and the frozen components from it.

Roles and swapped files. Both UNets have one architecture, so a swapped pair loads without any error and
quietly gives worse images. :func:`check_roles` compares the role of each file, taken from

1. the ``role`` metadata of the files we write (:func:`role_metadata`: ``structure``/``texture`` and the
   timestep range), else
2. the file name: the release's ``high_timestamp``/``low_timestamp`` (also ``high_timestep``,
   ``low_timestep``, ``structure``, ``texture``).

Both are exact when present. No weight statistic is used: without the real weights none can be
validated, and an unvalidated threshold would either cry wolf or stay silent. A file whose role cannot
be told is not checked (logged at INFO).
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import yaml

from ..config import PanGuDrawConfig, from_dict, load_config, to_dict
from ..tokenizers import bundled_vocabs
from .checkpoint import CheckpointReader, atomic_output, save_checkpoint
from .layouts import component_metadata

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# The networks a pipeline loads, every one required. Order matters: without weights, a component's index
# offsets the seed of its random weights (pipelines.components.ComponentStore).
COMPONENTS = ("conditioner", "structure_unet", "texture_unet", "vae")
CONTROLNETS = ("structure_controlnet", "texture_controlnet")
# Weight file suffixes read, in order of preference; training writes the first.
WEIGHT_SUFFIXES = (".safetensors", ".ckpt")
COMPONENT_FILES = {name: name + WEIGHT_SUFFIXES[0] for name in COMPONENTS + CONTROLNETS}
ROLES = ("structure", "texture")
_NAME_HINTS = {"structure": ("high_timestamp", "high_timestep", "structure"),
               "texture": ("low_timestamp", "low_timestep", "texture")}


class SwappedCheckpointsError(ValueError):
    """The structure and texture checkpoints look swapped (or are two files of one role)."""


# ---- reading --------------------------------------------------------------------------------------

def find_component_files(model_dir: str) -> Dict[str, str]:
    """``{component: path}`` of a model directory; a clear error names what is missing."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    files, missing = {}, []
    for name in COMPONENTS:
        found = [os.path.join(model_dir, name + s) for s in WEIGHT_SUFFIXES
                 if os.path.isfile(os.path.join(model_dir, name + s))]
        if found:
            files[name] = found[0]
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(f"model directory {model_dir!r} lacks weights for {missing}; expected files "
                                f"{', '.join(COMPONENT_FILES[n] for n in COMPONENTS)} (or .ckpt)")
    return files


def load_model_config(path: str) -> PanGuDrawConfig:
    """A PanGuDrawConfig from a model directory, a YAML file, or a bundled config name."""
    return load_config(os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path)


def released_pair_files(structure: str, texture: str, conditioner: Optional[str] = None,
                        vae: Optional[str] = None) -> Dict[str, str]:
    """``{component: path}`` of the released pair, as a pipeline loads it: each whole-model file supplies
    its UNet, and the texture file also the text encoders and the VAE (the release uses only its copies)
    unless ``conditioner`` / ``vae`` name other files."""
    return {"structure_unet": structure, "texture_unet": texture, "conditioner": conditioner or texture,
            "vae": vae or texture}


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


# ---- writing --------------------------------------------------------------------------------------

def write_config(config, path: str) -> None:
    """Atomically write a config dataclass as YAML (``load_config(path, type(config))`` reads it back)."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False, allow_unicode=True)


def write_model_config(directory: str, config: PanGuDrawConfig) -> None:
    """Write ``config.yaml``; tokenizer files that are not bundled are copied in and named by file name."""
    os.makedirs(directory, exist_ok=True)
    data = to_dict(config)
    for encoder in data["conditioner"]["encoders"]:
        tokenizer = encoder["tokenizer"]
        vocab = tokenizer["vocab"]
        if vocab in bundled_vocabs():
            continue
        target = os.path.join(directory, os.path.basename(vocab))
        if os.path.abspath(vocab) != os.path.abspath(target):
            shutil.copyfile(vocab, target)
        tokenizer["vocab"] = os.path.basename(vocab)
    write_config(from_dict(PanGuDrawConfig, data), os.path.join(directory, CONFIG_FILE))


def with_scaling_factor(config: PanGuDrawConfig, scaling_factor: float) -> PanGuDrawConfig:
    """A copy of ``config`` whose VAE latent ``scaling_factor`` is replaced: a VAE trained anew opens a new
    latent space, and the directory's ``config.yaml`` records the scale its generators were trained at."""
    data = to_dict(config)
    data["vae"]["scaling_factor"] = float(scaling_factor)
    return from_dict(PanGuDrawConfig, data)


def role_metadata(config: PanGuDrawConfig, role: str, timesteps: Optional[Tuple[int, int]] = None) -> Dict[str, str]:
    """The metadata of a generator's (or its ControlNet's) file: its role, which the swapped-files guard
    reads back, and the timestep range it was trained on (default: the role's range under ``t_struct``)."""
    low, high = timesteps or ((config.t_struct, config.num_train_timesteps) if role == "structure"
                              else (0, config.t_struct))
    return {"role": role, "timesteps": f"[{low}, {high})"}


def save_component(directory: str, component: str, state: Mapping[str, np.ndarray], config: PanGuDrawConfig,
                   dtype: str = "fp32", timesteps: Optional[Tuple[int, int]] = None,
                   component_config: Any = None) -> str:
    """Write one component's ``{name: array}`` into the model directory (floats in ``dtype``), recording the
    component, its config (``component_config``, default the model config's section) and - for the UNets
    and ControlNets - the :func:`role_metadata` (``timesteps``: the range they were trained on)."""
    if component not in COMPONENT_FILES:
        raise ValueError(f"unknown component {component!r}; valid: {sorted(COMPONENT_FILES)}")
    kind = component.split("_")[-1] if component.endswith(("unet", "controlnet")) else component
    extra = role_metadata(config, component.split("_")[0], timesteps) if kind in ("unet", "controlnet") else {}
    path = os.path.join(directory, COMPONENT_FILES[component])
    metadata = component_metadata(kind, component_config or getattr(config, kind), **extra)
    save_checkpoint(dict(state), path, dtype=dtype, metadata=metadata)
    return path
