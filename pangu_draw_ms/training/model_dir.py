"""Model directories: what training writes and the pipeline reads.

Layout (one safetensors file per component, our parameter names)::

    config.yaml                   a PanGuDrawConfig
    structure_unet.safetensors    UNet for t >= t_struct
    texture_unet.safetensors      UNet for t < t_struct
    vae.safetensors               AutoencoderKL
    conditioner.safetensors       the text encoders (Conditioner parameters)
    <tokenizer>.model             a trained SentencePiece model the config references by file name

A tokenizer vocab in ``config.yaml`` that is neither bundled with the package nor an absolute path is
a file in the model directory. Training stages fill the directory one component at a time.
"""
from __future__ import annotations

import copy
import os
import shutil
from typing import Dict, Mapping

import numpy as np
import yaml

from ..config import PanGuDrawConfig, from_dict, resolve_config_path, to_dict
from ..tokenizers import bundled_vocabs
from .checkpointing import atomic_write_bytes, load_tensors, save_tensors

CONFIG_FILE = "config.yaml"
COMPONENT_FILES = {
    "structure_unet": "structure_unet.safetensors",
    "texture_unet": "texture_unet.safetensors",
    "vae": "vae.safetensors",
    "conditioner": "conditioner.safetensors",
}


def _encoder_tokenizers(data: dict):
    return [encoder.setdefault("tokenizer", {}) for encoder in data.get("conditioner", {}).get("encoders", [])]


def load_model_config(path: str) -> PanGuDrawConfig:
    """A PanGuDrawConfig from a model directory, a YAML file, or a bundled config name.

    Tokenizer vocab paths that are not bundled vocabs are resolved against the YAML file's folder when
    they exist there (so a model directory can be used from any working directory).
    """
    yaml_path = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else resolve_config_path(path)
    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f"model directory {path!r} has no {CONFIG_FILE}")
    with open(yaml_path, "r", encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    folder = os.path.dirname(os.path.abspath(yaml_path))
    for tokenizer in _encoder_tokenizers(data):
        vocab = tokenizer.get("vocab", "")
        if vocab and vocab not in bundled_vocabs() and not os.path.isabs(vocab):
            beside = os.path.join(folder, vocab)
            if os.path.isfile(beside):
                tokenizer["vocab"] = beside
    return from_dict(PanGuDrawConfig, data, where=yaml_path)


def write_model_config(directory: str, config: PanGuDrawConfig) -> None:
    """Write ``config.yaml``; tokenizer files that are not bundled are copied in and named by file name."""
    os.makedirs(directory, exist_ok=True)
    data = to_dict(config)
    for tokenizer in _encoder_tokenizers(data):
        vocab = tokenizer["vocab"]
        if vocab in bundled_vocabs():
            continue
        target = os.path.join(directory, os.path.basename(vocab))
        if os.path.abspath(vocab) != os.path.abspath(target):
            shutil.copyfile(vocab, target)
        tokenizer["vocab"] = os.path.basename(vocab)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    atomic_write_bytes(os.path.join(directory, CONFIG_FILE), text.encode("utf-8"))


def save_component(directory: str, component: str, state: Mapping[str, np.ndarray], dtype: str = "float32") -> str:
    """Write one component's ``{name: array}`` (float arrays cast to ``dtype``) into the model directory."""
    if component not in COMPONENT_FILES:
        raise ValueError(f"unknown component {component!r}; valid: {sorted(COMPONENT_FILES)}")
    path = os.path.join(directory, COMPONENT_FILES[component])
    cast = {name: (value.astype(dtype) if np.issubdtype(value.dtype, np.floating) else value)
            for name, value in state.items()}
    save_tensors(path, cast, {"component": component})
    return path


def load_component(path: str) -> Dict[str, np.ndarray]:
    """``{name: float32 array}`` of a component file (float16 files are widened)."""
    tensors, _ = load_tensors(path)
    return {name: (value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value)
            for name, value in tensors.items()}


def with_scaling_factor(config: PanGuDrawConfig, scaling_factor: float) -> PanGuDrawConfig:
    """A copy of ``config`` whose VAE latent ``scaling_factor`` is replaced."""
    data = copy.deepcopy(to_dict(config))
    data["vae"]["scaling_factor"] = float(scaling_factor)
    return from_dict(PanGuDrawConfig, data)
