"""The enhancer's causal LM: mindformers' ``LlamaForCausalLM`` (LLaMA, Touvron et al. 2023) built from an
:class:`~pangu_draw_ms.prompting.config.EnhancerConfig`, in settings that run on CPU as well as on Ascend.

Measured with mindformers 1.9.0 and MindSpore 2.9 on CPU: the model trains and runs (GRAPH and PyNative) with
``use_rope_slice=True`` (rotary embeddings by slicing, transformers' rotate-half convention) and
``fused_rms_norm=False`` (the fused RmsNorm kernel is Ascend-only); ``use_past`` (its paged KV cache) and flash
attention are Ascend-only, so the model always runs without them and the decoding loop
(:mod:`pangu_draw_ms.prompting.decoding`) feeds it whole rows of ``max_length`` tokens: its causal mask comes
from the token ids (padding is masked as keys), so a right-padded row gives every real position the logits of
the unpadded sequence. Inputs of another length fail in its mask (``seq_length`` is fixed at build time);
training inputs are one token longer (the model shifts them into inputs and labels itself).
"""
from __future__ import annotations

import logging
import os

from .config import EnhancerConfig


def _quiet_mindformers_logs() -> None:
    """mindformers writes its log files under ``./output`` of the working directory unless told otherwise:
    send them to the user's cache folder (``LOG_MF_PATH`` / ``LOCAL_DEFAULT_PATH`` set beforehand win). Its
    console logger (named ``mindformers<log path>``, reset to INFO when first used) prints pages of INFO lines
    per model and warnings about optional modules at import: a filter, which survives that reset, passes only
    its errors."""
    root = os.path.join(os.path.expanduser("~"), ".cache", "pangu_draw_ms", "mindformers")
    os.environ.setdefault("LOCAL_DEFAULT_PATH", root)
    os.environ.setdefault("LOG_MF_PATH", os.path.join(root, "log"))
    mindformers_logger = logging.getLogger("mindformers" + os.path.expanduser(os.environ["LOG_MF_PATH"]))
    if _errors_only not in mindformers_logger.filters:
        mindformers_logger.addFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def build_causal_lm(config: EnhancerConfig, pad_token_id: int, bos_token_id: int, eos_token_id: int):
    """A float32 mindformers ``LlamaForCausalLM`` of ``config`` with random weights, in eval mode.

    Called with ``(ids)`` of shape (B, max_length) in eval mode it returns ``(logits (B, max_length, V), ...)``;
    in train mode, ``(ids (B, max_length + 1), loss_mask=...)`` returns the mean next-token cross-entropy over
    the positions whose ``loss_mask`` is 1 (position i predicts token i + 1)."""
    _quiet_mindformers_logs()
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        batch_size=1, seq_length=config.max_length, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_layers=config.num_layers, num_heads=config.num_heads, n_kv_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size, rms_norm_eps=config.rms_norm_eps, theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, compute_dtype="float32", layernorm_compute_type="float32",
        softmax_compute_type="float32", rotary_dtype="float32", param_init_type="float32",
        use_rope_slice=True, fused_rms_norm=False, use_past=False, use_flash_attention=False)
    model = LlamaForCausalLM(llama_config)
    model.set_train(False)
    return model
