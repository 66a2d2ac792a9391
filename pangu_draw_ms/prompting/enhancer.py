"""``PromptEnhancer``: rewrites short prompts into enriched ones with a fine-tuned causal LM (PanGu-Draw
supplement: an LLM fine-tuned on succinct -> enriched prompt pairs, then refined with RAFT).

An enhancer directory holds ``config.yaml`` (:class:`~pangu_draw_ms.prompting.config.EnhancerConfig`),
``enhancer.safetensors`` (mindformers ``LlamaForCausalLM`` parameter names) and ``tokenizer.model`` (the
SentencePiece model the LM's ids come from). ``tools/train.py`` stages ``prompt_sft``/``prompt_raft`` write one;
``tools/convert.py llama`` makes one from a transformers LLaMA checkpoint; the package ships the demo
enhancer (:data:`DEMO_ENHANCER_DIR`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import List, Mapping, Optional, Sequence, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor

from ..io.checkpoint import load_tensors, save_checkpoint
from ..io.model_dir import write_config
from ..io.state import load_state
from ..tokenizers import build_tokenizer
from .config import (
    ENHANCER_CONFIG,
    ENHANCER_TOKENIZER,
    ENHANCER_WEIGHTS,
    DecodingConfig,
    EnhancerConfig,
    load_enhancer_config,
)
from .decoding import generate
from .llama import build_causal_lm
from .template import prefix_ids, text_of

#: The demo enhancer shipped with the demo model (configs/train/demo_prompt_sft.yaml, then demo_prompt_raft.yaml).
DEMO_ENHANCER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "enhancer")


class PromptEnhancer:
    """A causal LM and its tokenizer that continue ``[BOS] short [EOS]`` with an enriched prompt.

    ``enhancer.enhance(["a red circle"])`` -> ``[["a big red circle at the top on a black background"]]``: a list of
    ``decoding.num_candidates`` rewrites per prompt (:meth:`enhance`). The tokenizer must be the one the LM
    was trained with: a vocabulary size other than ``config.vocab_size`` is refused."""

    def __init__(self, config: EnhancerConfig, weights: Optional[Union[str, Mapping[str, np.ndarray]]] = None):
        self.config = config
        tokenizer_config = dataclasses.replace(config.tokenizer, max_length=config.max_length)
        self.tokenizer = build_tokenizer(tokenizer_config)
        if self.tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"the enhancer's tokenizer {config.tokenizer.vocab!r} has {self.tokenizer.vocab_size} "
                             f"pieces but its LM has vocab_size {config.vocab_size}: they were not trained together "
                             "(give the tokenizer.model the LM was trained with)")
        self.model = build_causal_lm(config, self.tokenizer.pad_token_id, self.tokenizer.start_token_id,
                                     self.tokenizer.eot_token_id)
        if weights is not None:
            where = weights if isinstance(weights, str) else "enhancer weights"
            state = load_tensors(weights) if isinstance(weights, str) else weights
            load_state(self.model, state, what=f"{where} (enhancer LM)")
        model = self.model

        def logits(ids):
            return model(ids)[0]

        self._logits = ms.jit(logits) if ms.get_context("mode") == ms.GRAPH_MODE else logits

    @classmethod
    def from_dir(cls, directory: str) -> "PromptEnhancer":
        """The enhancer saved in ``directory`` (config.yaml, enhancer.safetensors, tokenizer.model)."""
        config_path = os.path.join(directory, ENHANCER_CONFIG)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{directory!r} is not an enhancer directory: it has no {ENHANCER_CONFIG} "
                                    f"(expected {ENHANCER_CONFIG}, {ENHANCER_WEIGHTS}, {ENHANCER_TOKENIZER})")
        return cls(load_enhancer_config(config_path), os.path.join(directory, ENHANCER_WEIGHTS))

    def logits_of(self, ids: np.ndarray) -> np.ndarray:
        """Logits (R, max_length, V) of int32 rows (R, max_length)."""
        return self._logits(Tensor(np.asarray(ids, np.int32))).asnumpy()

    def enhance(self, prompts: Union[str, Sequence[str]], decoding: Optional[DecodingConfig] = None,
                first_prompt_index: int = 0) -> List[List[str]]:
        """``decoding.num_candidates`` enriched rewrites of each short prompt (greedy by default); prompt i samples
        as prompt ``first_prompt_index + i`` (:func:`~pangu_draw_ms.prompting.decoding.generate`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        decoding = decoding or DecodingConfig()
        tokenizer = self.tokenizer
        ids = generate(self.logits_of, [prefix_ids(tokenizer, p) for p in prompts], decoding,
                       max_length=self.config.max_length, eos_token_id=tokenizer.eot_token_id,
                       pad_token_id=tokenizer.pad_token_id, first_prompt_index=first_prompt_index)
        return [[text_of(tokenizer, c) for c in candidates] for candidates in ids]

    def save(self, directory: str, state: Optional[Mapping[str, np.ndarray]] = None, dtype: str = "fp32") -> dict:
        """Write this enhancer (or ``state``, weights of its architecture) into ``directory`` as
        :meth:`from_dir` reads it; returns the paths written."""
        return save_enhancer(directory, self.config, state if state is not None else self.model, dtype)


def save_enhancer(directory: str, config: EnhancerConfig, weights, dtype: str = "fp32") -> dict:
    """``directory/{config.yaml, enhancer.safetensors, tokenizer.model}`` from ``config`` and ``weights`` (a cell
    or ``{name: array}`` with mindformers names); the tokenizer file is copied from ``config.tokenizer.vocab``."""
    os.makedirs(directory, exist_ok=True)
    tokenizer_path = os.path.join(directory, ENHANCER_TOKENIZER)
    if os.path.abspath(config.tokenizer.vocab) != os.path.abspath(tokenizer_path):
        shutil.copyfile(config.tokenizer.vocab, tokenizer_path)
    weights_path = os.path.join(directory, ENHANCER_WEIGHTS)
    save_checkpoint(weights, weights_path, dtype=dtype, metadata={"component": "prompt_enhancer"})
    config_path = os.path.join(directory, ENHANCER_CONFIG)
    relative = dataclasses.replace(config, tokenizer=dataclasses.replace(config.tokenizer, vocab=ENHANCER_TOKENIZER,
                                                                         max_length=config.max_length))
    write_config(relative, config_path)
    return {"config": config_path, "weights": weights_path, "tokenizer": tokenizer_path}


def build_enhancer(source: str) -> PromptEnhancer:
    """The enhancer saved in directory ``source``, or a new randomly initialised one (MindSpore's seed) of the
    architecture YAML (or bundled config name) ``source``."""
    if os.path.isdir(source):
        return PromptEnhancer.from_dir(source)
    return PromptEnhancer(load_enhancer_config(source))
