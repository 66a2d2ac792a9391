"""Weight-name mapping from transformers and OpenCLIP CLIP text models to :class:`CLIPTextEncoder`, from
transformers' CLIP vision model with projection and OpenAI/OpenCLIP ViT image towers to
:class:`CLIPVisionEncoder`, and of a whole transformers ``CLIPModel`` (both towers and ``logit_scale``).

Pure functions on ``{name: array}`` dicts; load the result with :func:`pangu_draw_ms.io.state.load_state`.
All accept torch suffixes (``weight``/``bias``) and MindSpore ones (``gamma``/``beta``/
``embedding_table``), because the released PanGu-Draw checkpoints hold these same models under
MindSpore naming (``conditioner.embedders.0.transformer.`` + transformers names,
``conditioner.embedders.1.model.`` + OpenCLIP names): strip those prefixes and map the rest here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Dict, Mapping, Tuple

import numpy as np

from ..config import TextEncoderConfig, VisionEncoderConfig
from .config_options import ConfigOptions
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
LOGIT_SCALE = "logit_scale"  # CLIP's contrastive temperature (log of its inverse): part of neither tower
_OPEN_CLIP_SKIPPED = (LOGIT_SCALE,)
# OpenAI/OpenCLIP ViT image tower names outside the blocks -> ours (``proj`` is transposed).
_OPEN_CLIP_VISION = {"conv1.weight": "embeddings.patch_embedding.weight",
                     "class_embedding": "embeddings.class_embedding",
                     "positional_embedding": "embeddings.position_embedding.embedding_table",
                     "proj": "visual_projection.weight"}
_OPEN_CLIP_VISION_NORMS = {"ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"}


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
    block = _open_clip_block_entries(name, value)
    if block is not None:
        return block
    if name.startswith("token_embedding.") and leaf in _EMBEDDING_SUFFIXES:
        return {"embeddings.token_embedding.embedding_table": value}
    if name == "positional_embedding":
        return {"embeddings.position_embedding.embedding_table": value}
    if name.startswith("ln_final.") and leaf in _TORCH_TO_MS_NORM:
        return {f"final_layer_norm.{_TORCH_TO_MS_NORM[leaf]}": value}
    if name == "text_projection":
        return {"text_projection.weight": np.ascontiguousarray(value.T)}
    return None


def _open_clip_block_entries(name: str, value: np.ndarray):
    """Our ``{name: array}`` for one entry of an OpenCLIP/OpenAI transformer block (the same in the text
    and the image tower), or None when the name is not a block key."""
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
    return None


def clip_vision_from_open_clip(state: Mapping[str, np.ndarray]) -> Tensors:
    """Map an OpenAI-CLIP / OpenCLIP ViT image tower state dict (the names under ``visual.``, that prefix
    stripped) to :class:`CLIPVisionEncoder` names.

    ``conv1`` is the patch convolution, ``class_embedding`` and ``positional_embedding`` the class token
    and position table, ``ln_pre``/``ln_post`` the LayerNorms around the blocks; the blocks are mapped
    as in :func:`clip_text_from_open_clip`; ``proj`` (width, embed_dim), applied as ``x @ P``, is
    transposed into the ``visual_projection`` Dense weight. Raises :class:`StateDictError` on other keys
    (e.g. a ModifiedResNet tower's ``layer1.*``/``attnpool.*``, which this encoder does not implement).
    """
    mapped: Tensors = {}
    unknown = []
    for name, value in state.items():
        value = np.asarray(value)
        module, _, leaf = name.rpartition(".")
        if name in _OPEN_CLIP_VISION:
            ours = _OPEN_CLIP_VISION[name]
            mapped[ours] = np.ascontiguousarray(value.T) if name == "proj" else value
        elif module in _OPEN_CLIP_VISION_NORMS and leaf in _TORCH_TO_MS_NORM:
            mapped[f"{_OPEN_CLIP_VISION_NORMS[module]}.{_TORCH_TO_MS_NORM[leaf]}"] = value
        else:
            entries = _open_clip_block_entries(name, value)
            if entries is None:
                unknown.append(name)
            else:
                mapped.update(entries)
    if unknown:
        raise _unknown(unknown, "ViT image tower (OpenAI-CLIP layout)",
                       "conv1.weight, class_embedding, positional_embedding, ln_pre, transformer.resblocks.N.{ln_1, "
                       "attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, "
                       "proj (strip the outer 'visual.' prefix first)")
    return mapped


def clip_model_from_transformers(state: Mapping[str, np.ndarray]) -> Tuple[Tensors, Tensors, np.ndarray]:
    """Split a transformers ``CLIPModel`` state dict into ``(text, vision, logit_scale)``: the text tower
    (``text_model.*``, ``text_projection.weight``) mapped by :func:`clip_text_from_transformers`, the image
    tower (``vision_model.*``, ``visual_projection.weight``) by :func:`clip_vision_from_transformers`, and
    the scalar ``logit_scale`` (log of the contrastive temperature's inverse). Raises
    :class:`StateDictError` on keys of neither tower, or without ``logit_scale``.
    """
    parts: Dict[str, Tensors] = {"text": {}, "vision": {}}
    unknown = []
    for name, value in state.items():
        if name.startswith(_HF_TEXT.prefix) or name == _HF_TEXT.projection:
            parts["text"][name] = value
        elif name.startswith(_HF_VISION.prefix) or name == _HF_VISION.projection:
            parts["vision"][name] = value
        elif name != LOGIT_SCALE:
            unknown.append(name)
    if unknown:
        raise _unknown(unknown, "transformers CLIPModel",
                       f"names under {_HF_TEXT.prefix!r} and {_HF_VISION.prefix!r}, {_HF_TEXT.projection!r}, "
                       f"{_HF_VISION.projection!r} and {LOGIT_SCALE!r}")
    if LOGIT_SCALE not in state:
        raise StateDictError(f"a transformers CLIPModel state dict holds {LOGIT_SCALE!r}; this one does not (a "
                             "CLIPTextModel or CLIPVisionModel alone has no logit scale)")
    return (clip_text_from_transformers(parts["text"]), clip_vision_from_transformers(parts["vision"]),
            np.asarray(state[LOGIT_SCALE], np.float32))


# PretrainedConfig's own options (and older transformers' spellings of them): generation, output and
# bookkeeping settings that a CLIP tower's computation does not read.
_GENERIC = ("_name_or_path", "add_cross_attention", "architectures", "bad_words_ids", "begin_suppress_tokens",
            "bos_token_id", "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id",
            "diversity_penalty", "do_sample", "dtype", "eos_token_id", "torch_dtype", "early_stopping",
            "encoder_no_repeat_ngram_size",
            "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id", "forced_eos_token_id",
            "id2label", "label2id", "num_labels", "is_decoder", "is_encoder_decoder", "length_penalty", "max_length",
            "min_length", "model_type", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
            "output_attentions", "output_hidden_states", "output_scores", "pad_token_id", "prefix", "problem_type",
            "remove_invalid_values", "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id",
            "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
            "tie_word_embeddings", "tokenizer_class", "top_k", "top_p", "torchscript", "transformers_version",
            "typical_p", "use_bfloat16", "gradient_checkpointing", "use_cache", "output_past", "xla_device")
_TRAINING_ONLY = "initialisation and dropout: no effect on a loaded model in evaluation"
_TOWER_INERT = {**{key: "a generic transformers setting the CLIP tower does not read" for key in _GENERIC},
                "initializer_range": _TRAINING_ONLY, "initializer_factor": _TRAINING_ONLY,
                "attention_dropout": _TRAINING_ONLY, "dropout": _TRAINING_ONLY}
_TOWER_INERT.pop("architectures")
_TOWER_FIXED = {"pruned_heads": ({},)}
TEXT_OPTIONS = ConfigOptions(
    "transformers CLIP text config",
    read=("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
          "num_attention_heads", "max_position_embeddings", "layer_norm_eps", "hidden_act", "eos_token_id",
          "architectures"),
    fixed=_TOWER_FIXED, inert={k: v for k, v in _TOWER_INERT.items() if k != "eos_token_id"})
VISION_OPTIONS = ConfigOptions(
    "transformers CLIP vision config",
    read=("image_size", "patch_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
          "num_attention_heads", "layer_norm_eps", "hidden_act"),
    fixed={**_TOWER_FIXED, "num_channels": (3,)},
    inert={**_TOWER_INERT, "architectures": "which tower a config.json came with; the image tower always projects"})
CLIP_OPTIONS = ConfigOptions(
    "transformers CLIP config",
    read=("text_config", "vision_config", "text_config_dict", "vision_config_dict", "projection_dim"),
    fixed=_TOWER_FIXED, inert={**_TOWER_INERT, "architectures": "the class that wrote the file",
           "logit_scale_init_value": "the file's logit_scale weight is loaded instead"})


def text_encoder_config_from_transformers(config: Mapping, output_layer: str = "last") -> TextEncoderConfig:
    """Our :class:`TextEncoderConfig` from a transformers ``CLIPTextConfig`` dict (``config.json`` of a
    ``CLIPTextModel`` or ``CLIPTextModelWithProjection``; a full ``CLIPConfig``'s ``text_config`` works too).

    The projection exists when the architecture is ``CLIPTextModelWithProjection``. Pooling follows
    transformers: at the argmax id for the legacy ``eos_token_id == 2``, else at ``eos_token_id``.
    ``output_layer`` is how the features will be used (SDXL-style pipelines use ``penultimate``); the
    file does not record it. Raises :class:`UnsupportedOptionError` (a ``ValueError``) naming any option
    our encoder does not honour.
    """
    config = dict(config.get("text_config") or config)
    TEXT_OPTIONS.check(config)
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
    full ``CLIPConfig``'s ``vision_config`` works too). Raises :class:`UnsupportedOptionError` naming any
    option our encoder does not honour."""
    config = dict(config.get("vision_config") or config)
    VISION_OPTIONS.check(config)
    return VisionEncoderConfig(
        image_size=config.get("image_size", 224), patch_size=config.get("patch_size", 32),
        hidden_size=config.get("hidden_size", 768), num_layers=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12), intermediate_size=config.get("intermediate_size", 3072),
        hidden_act=config.get("hidden_act", "quick_gelu"), layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        projection_dim=config.get("projection_dim", 512))


def clip_model_configs_from_transformers(config: Mapping) -> Tuple[TextEncoderConfig, VisionEncoderConfig]:
    """Our text and vision encoder configs from a transformers ``CLIPConfig`` dict (``config.json`` of a
    ``CLIPModel``): both towers project to the top-level ``projection_dim`` (what ``CLIPModel`` builds its
    ``text_projection``/``visual_projection`` with; the sub-configs' own ``projection_dim`` is not used).
    Files written by older transformers also hold ``text_config_dict``/``vision_config_dict``, which
    transformers lets override ``text_config``/``vision_config``; so do we.
    """
    if "text_config" not in config or "vision_config" not in config:
        raise ValueError(f"not a transformers CLIPConfig: a CLIPModel's config.json has 'text_config' and "
                         f"'vision_config'; got the keys {sorted(config)}")
    CLIP_OPTIONS.check(config)
    towers = {name: {**config[name], **(config.get(f"{name}_dict") or {})} for name in ("text_config", "vision_config")}
    projection_dim = config.get("projection_dim", 512)
    text = replace(text_encoder_config_from_transformers(towers["text_config"]), projection_dim=projection_dim)
    vision = replace(vision_encoder_config_from_transformers(towers["vision_config"]), projection_dim=projection_dim)
    return text, vision
