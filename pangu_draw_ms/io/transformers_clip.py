"""Weight-name mapping from transformers and OpenCLIP CLIP text models to :class:`CLIPTextEncoder`, and
from transformers' CLIP vision model with projection to :class:`CLIPVisionEncoder`.

Pure functions on ``{name: array}`` dicts; load the result with :func:`pangu_draw_ms.io.state.load_state`.
All accept torch suffixes (``weight``/``bias``) and MindSpore ones (``gamma``/``beta``/
``embedding_table``), because the released PanGu-Draw checkpoints hold these same models under
MindSpore naming (``conditioner.embedders.0.transformer.`` + transformers names,
``conditioner.embedders.1.model.`` + OpenCLIP names): strip those prefixes and map the rest here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import numpy as np

from ..config import TextEncoderConfig, VisionEncoderConfig
from .state import StateDictError

Tensors = Dict[str, np.ndarray]

_TORCH_TO_MS_NORM = {"weight": "gamma", "bias": "beta", "gamma": "gamma", "beta": "beta"}
_EMBEDDING_SUFFIXES = ("weight", "embedding_table")


@dataclass(frozen=True)
class _TransformersTower:
    """How one transformers CLIP tower is named on disk."""

    what: str
    prefix: str  # of every tower weight
    projection: str  # the projection weight, outside the prefix
    norms: Tuple[str, ...]  # LayerNorm modules: weight/bias -> gamma/beta
    lookup_tables: Tuple[str, ...]  # Embedding modules: weight -> embedding_table

    @property
    def position_ids(self) -> str:
        """A buffer, not a weight (persistent in older checkpoints)."""
        return self.prefix + "embeddings.position_ids"


_HF_TEXT = _TransformersTower("transformers CLIP text model", "text_model.", "text_projection.weight",
                              ("layer_norm1", "layer_norm2", "final_layer_norm"),
                              ("token_embedding", "position_embedding"))
# The patch embedding is a convolution (its weight stays `weight`); the class embedding is a bare vector.
_HF_VISION = _TransformersTower("transformers CLIP vision model", "vision_model.", "visual_projection.weight",
                                ("layer_norm1", "layer_norm2", "pre_layrnorm", "post_layernorm"),
                                ("position_embedding",))

# OpenCLIP block layout -> ours, for everything in a block except the fused q/k/v projection.
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_BLOCK_KEY = re.compile(
    r"^transformer\.resblocks\.(\d+)\.(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(\w+)$")
_OPEN_CLIP_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_OPEN_CLIP_SKIPPED = ("logit_scale",)  # CLIP's contrastive temperature: not part of the text encoder


def _unknown(keys, what: str, valid: str) -> StateDictError:
    keys = sorted(keys)
    more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
    return StateDictError(f"{len(keys)} key(s) are not part of a {what}: {', '.join(keys[:10])}{more}; "
                          f"expected {valid}")


def clip_text_from_transformers(state: Mapping[str, np.ndarray]) -> Tensors:
    """Map a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` state dict, with its
    on-disk names (``text_model.*``, ``text_projection.weight``), to :class:`CLIPTextEncoder` names.

    Norm ``weight``/``bias`` become ``gamma``/``beta``, embedding ``weight`` becomes ``embedding_table``;
    the ``position_ids`` buffer is dropped. Raises :class:`StateDictError` on keys of other models.
    """
    return _from_transformers(state, _HF_TEXT)


def clip_vision_from_transformers(state: Mapping[str, np.ndarray]) -> Tensors:
    """Map a transformers ``CLIPVisionModelWithProjection`` state dict, with its on-disk names
    (``vision_model.*``, ``visual_projection.weight``), to :class:`CLIPVisionEncoder` names.

    Norm ``weight``/``bias`` (``pre_layrnorm``, ``layer_norm1/2``, ``post_layernorm``) become
    ``gamma``/``beta``, the position embedding ``weight`` becomes ``embedding_table``; the class embedding,
    the patch convolution and the projection keep their names; the ``position_ids`` buffer is dropped.
    Raises :class:`StateDictError` on keys of other models (e.g. ``text_model.*`` of a full ``CLIPModel``:
    take its ``vision_model.*`` and ``visual_projection.weight`` entries).
    """
    return _from_transformers(state, _HF_VISION)


def _from_transformers(state: Mapping[str, np.ndarray], tower: _TransformersTower) -> Tensors:
    mapped: Tensors = {}
    unknown = []
    for name, value in state.items():
        if name == tower.position_ids:
            continue
        if name == tower.projection:
            mapped[name] = np.asarray(value)
            continue
        if not name.startswith(tower.prefix):
            unknown.append(name)
            continue
        module, leaf = name[len(tower.prefix):].rsplit(".", 1)
        if module.endswith(tower.norms) and leaf in _TORCH_TO_MS_NORM:
            leaf = _TORCH_TO_MS_NORM[leaf]
        elif module.endswith(tower.lookup_tables) and leaf in _EMBEDDING_SUFFIXES:
            leaf = "embedding_table"
        mapped[f"{module}.{leaf}"] = np.asarray(value)
    if unknown:
        raise _unknown(unknown, tower.what,
                       f"names under {tower.prefix!r} and {tower.projection!r} (strip any outer prefix first)")
    return mapped


def clip_text_from_open_clip(state: Mapping[str, np.ndarray]) -> Tensors:
    """Map an OpenCLIP text tower state dict to :class:`CLIPTextEncoder` names.

    ``transformer.resblocks.N.attn.in_proj_{weight,bias}`` (rows q, k, v) are split into
    ``self_attn.{q,k,v}_proj``; ``text_projection`` (width, proj), applied as ``x @ P``, is transposed
    into the Dense weight (proj, width); ``positional_embedding`` becomes the position table;
    ``logit_scale`` is skipped. Raises :class:`StateDictError` on keys of other models (e.g. ``visual.*``).
    """
    mapped: Tensors = {}
    unknown = []
    for name, value in state.items():
        if name in _OPEN_CLIP_SKIPPED:
            continue
        entries = _open_clip_entries(name, np.asarray(value))
        if entries is None:
            unknown.append(name)
        else:
            mapped.update(entries)
    if unknown:
        raise _unknown(unknown, "OpenCLIP text tower",
                       "token_embedding, positional_embedding, transformer.resblocks.N.{ln_1, attn.in_proj_weight, "
                       "attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final, text_projection, "
                       "logit_scale (strip any outer prefix first)")
    return mapped


def _open_clip_entries(name: str, value: np.ndarray):
    """Our ``{name: array}`` for one OpenCLIP entry, or None when the name is not an OpenCLIP text key."""
    leaf = name.rsplit(".", 1)[-1]
    in_proj = _OPEN_CLIP_IN_PROJ.match(name)
    if in_proj:
        layer, kind = in_proj.groups()
        if value.shape[0] % 3:
            raise StateDictError(f"{name}: fused q/k/v projection of shape {value.shape}: the first axis must be "
                                 "3 x width (rows q, k, v)")
        return {f"encoder.layers.{layer}.self_attn.{part}_proj.{kind}": chunk
                for part, chunk in zip(("q", "k", "v"), np.split(value, 3, axis=0))}
    block = _OPEN_CLIP_BLOCK_KEY.match(name)
    if block:
        layer, module, leaf = block.groups()
        ours = _OPEN_CLIP_BLOCK[module]
        if ours.startswith("layer_norm"):
            if leaf not in _TORCH_TO_MS_NORM:
                return None
            leaf = _TORCH_TO_MS_NORM[leaf]
        elif leaf not in ("weight", "bias"):
            return None
        return {f"encoder.layers.{layer}.{ours}.{leaf}": value}
    if name.startswith("token_embedding.") and leaf in _EMBEDDING_SUFFIXES:
        return {"embeddings.token_embedding.embedding_table": value}
    if name == "positional_embedding":
        return {"embeddings.position_embedding.embedding_table": value}
    if name.startswith("ln_final.") and leaf in _TORCH_TO_MS_NORM:
        return {f"final_layer_norm.{_TORCH_TO_MS_NORM[leaf]}": value}
    if name == "text_projection":
        return {"text_projection.weight": np.ascontiguousarray(value.T)}
    return None


def text_encoder_config_from_transformers(config: Mapping, output_layer: str = "last") -> TextEncoderConfig:
    """Our :class:`TextEncoderConfig` from a transformers ``CLIPTextConfig`` dict (``config.json`` of a
    ``CLIPTextModel`` or ``CLIPTextModelWithProjection``; a full ``CLIPConfig``'s ``text_config`` works too).

    The projection exists when the architecture is ``CLIPTextModelWithProjection``. Pooling follows
    transformers: at the argmax id for the legacy ``eos_token_id == 2``, else at ``eos_token_id``.
    ``output_layer`` is how the features will be used (SDXL-style pipelines use ``penultimate``); the
    file does not record it.
    """
    config = dict(config.get("text_config") or config)
    with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
    eos = config.get("eos_token_id", 2)
    return TextEncoderConfig(
        vocab_size=config.get("vocab_size", 49408), hidden_size=config.get("hidden_size", 512),
        num_layers=config.get("num_hidden_layers", 12), num_heads=config.get("num_attention_heads", 8),
        intermediate_size=config.get("intermediate_size", 2048),
        max_position_embeddings=config.get("max_position_embeddings", 77),
        hidden_act=config.get("hidden_act", "quick_gelu"), layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        output_layer=output_layer, projection_dim=config.get("projection_dim", 512) if with_projection else None,
        eot_token_id=None if eos == 2 else eos)


def vision_encoder_config_from_transformers(config: Mapping) -> VisionEncoderConfig:
    """Our :class:`VisionEncoderConfig` from a transformers ``CLIPVisionConfig`` dict (``config.json`` of a
    ``CLIPVisionModelWithProjection``, e.g. a diffusers image-variation pipeline's ``image_encoder/``; a
    full ``CLIPConfig``'s ``vision_config`` works too)."""
    config = dict(config.get("vision_config") or config)
    return VisionEncoderConfig(
        image_size=config.get("image_size", 224), patch_size=config.get("patch_size", 32),
        hidden_size=config.get("hidden_size", 768), num_layers=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12), intermediate_size=config.get("intermediate_size", 3072),
        hidden_act=config.get("hidden_act", "quick_gelu"), layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        projection_dim=config.get("projection_dim", 512))
