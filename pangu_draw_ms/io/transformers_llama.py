"""transformers LLaMA checkpoints (``LlamaForCausalLM``) -> mindformers ``LlamaForCausalLM`` parameter names.

The two layouts hold the same tensors in the same orientation (transformers already permutes Meta's q/k
weights into the rotate-half convention that mindformers' ``use_rope_slice`` computes); only the names differ:
``model.embed_tokens.weight`` -> ``model.tok_embeddings.embedding_weight``, ``self_attn.{q,k,v,o}_proj`` ->
``attention.w{q,k,v,o}``, ``mlp.{gate,down,up}_proj`` -> ``feed_forward.w{1,2,3}``, ``input_layernorm`` ->
``attention_norm``, ``post_attention_layernorm`` -> ``ffn_norm``, ``model.norm`` -> ``model.norm_out``;
``lm_head.weight`` keeps its name. Rotary ``inv_freq`` buffers are recomputed, not read.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Mapping, Tuple

import numpy as np

from .checkpoint import load_tensors

_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_TOP_NAMES = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
              "model.norm.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}


def llama_name(name: str) -> str:
    """The mindformers name of transformers LLaMA parameter ``name``; KeyError for a name that is no weight of
    a LLaMA causal LM."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    raise KeyError(f"{name!r} is not a parameter of a transformers LlamaForCausalLM")


def llama_state_from_transformers(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A transformers ``LlamaForCausalLM`` state dict in mindformers names (rotary buffers dropped)."""
    return {llama_name(k): np.asarray(v) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def read_transformers_llama(folder: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """``(config.json as a dict, weights in mindformers names)`` of a transformers LLaMA folder (``config.json``
    and ``model.safetensors`` or a ``model.safetensors.index.json`` shard index)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder!r} has no config.json: give a transformers LlamaForCausalLM folder")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != "llama":
        raise ValueError(f"{config_path}: model_type {config.get('model_type')!r} is not 'llama'")
    weights = next((os.path.join(folder, name) for name in ("model.safetensors", "model.safetensors.index.json")
                    if os.path.isfile(os.path.join(folder, name))), None)
    if weights is None:
        raise ValueError(f"{folder!r} has no model.safetensors (or shard index)")
    return config, llama_state_from_transformers(load_tensors(weights))
