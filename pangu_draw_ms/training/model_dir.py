"""Model directories as training reads and fills them (the layout ``PanGuDrawPipeline.from_pretrained`` loads).

Layout (one safetensors file per component, our parameter names, component and config in the metadata)::

    config.yaml                   a PanGuDrawConfig
    structure_unet.safetensors    UNet for t >= t_struct   (metadata role=structure)
    texture_unet.safetensors      UNet for t < t_struct    (metadata role=texture)
    vae.safetensors               AutoencoderKL
    conditioner.safetensors       the text encoders (Conditioner parameters)
    <tokenizer>.model             a trained SentencePiece model, named in config.yaml by file name

Training stages fill a directory one component at a time; later stages read the config (with the VAE's
measured ``scaling_factor``) and the frozen components from it.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from ..config import PanGuDrawConfig, from_dict, load_config, to_dict
from ..io.checkpoint import save_checkpoint
from ..io.layouts import component_metadata
from ..io.released import write_config
from ..tokenizers import bundled_vocabs

CONFIG_FILE = "config.yaml"
COMPONENT_FILES = {
    "structure_unet": "structure_unet.safetensors",
    "texture_unet": "texture_unet.safetensors",
    "vae": "vae.safetensors",
    "conditioner": "conditioner.safetensors",
    "structure_controlnet": "structure_controlnet.safetensors",
    "texture_controlnet": "texture_controlnet.safetensors",
}


def load_model_config(path: str) -> PanGuDrawConfig:
    """A PanGuDrawConfig from a model directory, a YAML file, or a bundled config name."""
    return load_config(os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path)


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


def save_component(directory: str, component: str, state: Mapping[str, np.ndarray], config: PanGuDrawConfig,
                   dtype: str = "fp32", timesteps: Optional[Tuple[int, int]] = None,
                   component_config: Any = None) -> str:
    """Write one component's ``{name: array}`` into the model directory (floats in ``dtype``), recording the
    component, its config (``component_config``, default the model config's section) and - for the UNets
    and ControlNets - the role (the generator they are / steer; the swapped-files guard reads it) and the
    timestep range they were trained on (default: the role's range)."""
    if component not in COMPONENT_FILES:
        raise ValueError(f"unknown component {component!r}; valid: {sorted(COMPONENT_FILES)}")
    kind = component.split("_")[-1] if component.endswith(("unet", "controlnet")) else component
    extra = {}
    if kind in ("unet", "controlnet"):
        role = component.split("_")[0]
        low, high = timesteps or ((config.t_struct, config.num_train_timesteps) if role == "structure"
                                  else (0, config.t_struct))
        extra = {"role": role, "timesteps": f"[{low}, {high})"}
    path = os.path.join(directory, COMPONENT_FILES[component])
    save_checkpoint(dict(state), path, dtype=dtype, metadata=component_metadata(kind, component_config or getattr(config, kind), **extra))
    return path


def with_scaling_factor(config: PanGuDrawConfig, scaling_factor: float) -> PanGuDrawConfig:
    """A copy of ``config`` whose VAE latent ``scaling_factor`` is replaced."""
    data = to_dict(config)
    data["vae"]["scaling_factor"] = float(scaling_factor)
    return from_dict(PanGuDrawConfig, data)
