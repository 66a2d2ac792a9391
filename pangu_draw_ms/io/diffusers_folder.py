"""Reading diffusers pipeline folders and transformers/diffusers model folders (``save_pretrained`` output).

A pipeline folder holds one model per subfolder (``unet/``, ``vae/``, ``text_encoder/``, ``image_encoder/``,
``controlnet/`` ...), each a model folder: its architecture in ``config.json`` (turned into our configs by
:mod:`~pangu_draw_ms.io.diffusers_unet`, :mod:`~pangu_draw_ms.io.diffusers_vae`,
:mod:`~pangu_draw_ms.io.transformers_clip` ...) beside the weights file, which
:func:`pangu_draw_ms.io.checkpoint.resolve_checkpoint_path` finds in the folder. The tokenizer's files lie
in ``tokenizer/``.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

CONFIG_JSON = "config.json"
TOKENIZER_FOLDER = "tokenizer"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_path(folder: str, model: str) -> str:
    """The model folder of a pipeline folder's ``model`` (what the component loaders read the weights of)."""
    return os.path.join(folder, model)


def model_config(folder: str, model: str) -> dict:
    """The ``config.json`` of a pipeline folder's ``model``; a clear error when the folder has none."""
    path = os.path.join(model_path(folder, model), CONFIG_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {folder!r} is not a diffusers folder with {model}/{CONFIG_JSON}")
    return _read_json(path)


def models_present(folder: str, models: Iterable[str]) -> List[str]:
    """Those of ``models`` that ``folder`` holds as subfolders (none when it is not a pipeline folder)."""
    return [model for model in models if os.path.isdir(model_path(folder, model))]


def config_beside(path: str) -> Optional[dict]:
    """The ``config.json`` of a model folder, or of the folder a weights file lies in; None when there is none."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_json = os.path.join(folder, CONFIG_JSON)
    return _read_json(config_json) if os.path.isfile(config_json) else None


def tokenizer_pad_token(folder: str, default: str) -> str:
    """The padding token ``tokenizer/special_tokens_map.json`` names (``default`` without that file or entry)."""
    path = os.path.join(folder, TOKENIZER_FOLDER, SPECIAL_TOKENS_FILE)
    if not os.path.isfile(path):
        return default
    entry = _read_json(path).get("pad_token", default)
    return entry.get("content", default) if isinstance(entry, dict) else entry
