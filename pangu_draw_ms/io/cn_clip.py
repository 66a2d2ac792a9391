"""Weight-name mapping from Chinese-CLIP checkpoints (OFA-Sys ``cn_clip``; Yang et al. 2022) to
:class:`~pangu_draw_ms.evaluation.cn_clip.CNCLIPModel`.

A ``cn_clip`` checkpoint (``clip_cn_vit-b-16.pt`` ...) is a torch pickle ``{"state_dict": {...}, ...}``
(:func:`pangu_draw_ms.io.checkpoint.load_tensors` unwraps ``state_dict``) whose names carry the
``module.`` prefix of the DistributedDataParallel wrapper it was trained in:

* ``visual.*``: the OpenAI-CLIP ViT image tower (``conv1``, ``class_embedding``, ``positional_embedding``,
  ``ln_pre``, ``transformer.resblocks.N`` with fused ``attn.in_proj``, ``ln_post``, ``proj``), mapped by
  :func:`pangu_draw_ms.io.transformers_clip.clip_vision_from_open_clip` to ``vision_model.*``;
* ``bert.*``: the BERT / RoBERTa-wwm text tower (``embeddings.{word,position,token_type}_embeddings``,
  ``embeddings.LayerNorm``, ``encoder.layer.N.{attention.self.{query,key,value}, attention.output.dense,
  attention.output.LayerNorm, intermediate.dense, output.dense, output.LayerNorm}``), mapped to
  ``text_model.*``; ``bert.pooler.*`` (unused by CLIP, dropped by cn_clip too) is dropped;
* ``text_projection`` (hidden, embed_dim), applied as ``x @ P``: transposed into
  ``text_model.text_projection.weight``; ``logit_scale``: kept.

Torch suffixes (``weight``/``bias``) and MindSpore ones (``gamma``/``beta``/``embedding_table``) are both
accepted. Keys of another network raise :class:`~pangu_draw_ms.io.state.StateDictError` naming them.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping

import numpy as np

from .state import StateDictError
from .transformers_clip import LOGIT_SCALE, clip_vision_from_open_clip

Tensors = Dict[str, np.ndarray]

MODULE_PREFIX = "module."  # DistributedDataParallel's wrapper name, kept in cn_clip's saved checkpoints
VISUAL_PREFIX = "visual."
BERT_PREFIX = "bert."
TEXT_PROJECTION = "text_projection"
_POOLER_PREFIX = "bert.pooler."

_NORM_LEAVES = {"weight": "gamma", "bias": "beta", "gamma": "gamma", "beta": "beta"}
_LINEAR_LEAVES = ("weight", "bias")
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")  # the same names in ours
# One BERT layer's Linear modules -> ours (see BertTextEncoder): attention projections and the MLP.
_BERT_LINEARS = {"attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
                 "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
                 "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
# ... and its two post-LN LayerNorms.
_BERT_NORMS = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "mlp_norm"}
_BERT_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(\w+)$")
_SHOW = 10


def strip_module_prefix(state: Mapping[str, np.ndarray]) -> Tensors:
    """``state`` without the ``module.`` prefix cn_clip's trainer saves (names without it are kept)."""
    return {name[len(MODULE_PREFIX):] if name.startswith(MODULE_PREFIX) else name: value
            for name, value in state.items()}


def cn_clip_from_checkpoint(state: Mapping[str, np.ndarray]) -> Tensors:
    """Map a cn_clip CLIP state dict (ViT image tower + BERT text tower, with or without ``module.``) to
    :class:`~pangu_draw_ms.evaluation.cn_clip.CNCLIPModel` names.

    Raises :class:`StateDictError` when a name belongs to neither tower (a transformers or OpenCLIP model,
    a ModifiedResNet ``visual.layer1.*`` tower, a FlashAttention-layout ``Wqkv`` checkpoint) or when a
    tower is absent altogether.
    """
    state = strip_module_prefix(state)
    visual: Tensors = {}
    mapped: Tensors = {}
    unknown: List[str] = []
    for name, value in state.items():
        value = np.asarray(value)
        if name.startswith(VISUAL_PREFIX):
            visual[name[len(VISUAL_PREFIX):]] = value
        elif name.startswith(_POOLER_PREFIX):
            continue
        elif name.startswith(BERT_PREFIX):
            ours = _bert_name(name[len(BERT_PREFIX):])
            if ours is None:
                unknown.append(name)
            else:
                mapped[f"text_model.{ours}"] = value
        elif name == TEXT_PROJECTION:
            mapped["text_model.text_projection.weight"] = np.ascontiguousarray(value.T)
        elif name == LOGIT_SCALE:
            mapped[LOGIT_SCALE] = value
        else:
            unknown.append(name)
    if unknown:
        unknown.sort()
        more = f" (+{len(unknown) - _SHOW} more)" if len(unknown) > _SHOW else ""
        raise StateDictError(
            f"{len(unknown)} key(s) are not part of a Chinese-CLIP (cn_clip) ViT + BERT model: "
            f"{', '.join(unknown[:_SHOW])}{more}; expected names under 'visual.' (OpenAI-CLIP ViT) and 'bert.' "
            "(encoder.layer.N.{attention.self.query/key/value, attention.output.dense, attention.output.LayerNorm, "
            "intermediate.dense, output.dense, output.LayerNorm}), 'text_projection' and 'logit_scale', optionally "
            "all prefixed by 'module.'. A FlashAttention-layout checkpoint (attn.Wqkv) must first be converted with "
            "cn_clip.clip.convert_state_dict")
    for prefix in (VISUAL_PREFIX, BERT_PREFIX):
        if not any(name.startswith(prefix) for name in state):
            raise StateDictError(f"no {prefix!r} keys: not a Chinese-CLIP checkpoint (it holds the image tower under "
                                 f"'visual.' and the text tower under 'bert.'); got {sorted(state)[:_SHOW]}")
    try:
        vision = clip_vision_from_open_clip(visual)
    except StateDictError as err:
        raise StateDictError(f"Chinese-CLIP image tower under 'visual.': {err}. Only ViT towers are supported, not "
                             "the ModifiedResNet of RN50") from None
    mapped.update({f"vision_model.{k}": v for k, v in vision.items()})
    return mapped


def _bert_name(name: str):
    """Our name (below ``text_model.``) of one BERT weight (``bert.`` stripped), or None if it is not one."""
    module, _, leaf = name.rpartition(".")
    if module.startswith("embeddings."):
        part = module[len("embeddings."):]
        if part in _EMBEDDINGS and leaf in ("weight", "embedding_table"):
            return f"embeddings.{part}.embedding_table"
        if part == "LayerNorm" and leaf in _NORM_LEAVES:
            return f"embeddings.layer_norm.{_NORM_LEAVES[leaf]}"
        return None
    layer = _BERT_LAYER_KEY.match(name)
    if layer is None:
        return None
    index, module, leaf = layer.groups()
    if module in _BERT_LINEARS and leaf in _LINEAR_LEAVES:
        return f"encoder.layers.{index}.{_BERT_LINEARS[module]}.{leaf}"
    if module in _BERT_NORMS and leaf in _NORM_LEAVES:
        return f"encoder.layers.{index}.{_BERT_NORMS[module]}.{_NORM_LEAVES[leaf]}"
    return None
