"""How a (short -> enriched) prompt pair is laid out for the causal LM, and how its text comes back.

A training sequence is ``[BOS] short [EOS] enriched [EOS]``: the short prompt as the tokenizer encodes it,
then the enriched prompt and the end token. The LM learns only the second half (the loss mask covers the
enriched prompt and its end token, as supervised fine-tuning on instruction-response pairs does); at
inference ``[BOS] short [EOS]`` is the prefix and decoding stops at the next end token.
"""
from __future__ import annotations

import re
from typing import Tuple

import numpy as np

from ..tokenizers import Tokenizer

# Spaces jieba put between Chinese words (the SentencePiece model was trained on segmented text).
_CJK = "\u3000-\u303f\u4e00-\u9fff\uff00-\uffef"
_SPACE_BETWEEN_CJK = re.compile(rf"(?<=[{_CJK}])\s+(?=[{_CJK}])")


def prefix_ids(tokenizer: Tokenizer, short: str) -> list:
    """``[BOS] short [EOS]``: what the enhancer continues."""
    return tokenizer.encode(short)


def training_row(tokenizer: Tokenizer, short: str, enriched: str, max_length: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids, loss_mask)`` of one pair, both of length ``max_length + 1`` (the model shifts them: position i
    predicts token i + 1), padded with the pad id. ``loss_mask[i]`` is 1 where token i + 1 belongs to the
    enriched prompt or its end token. A pair longer than ``max_length`` tokens raises ValueError."""
    prefix = prefix_ids(tokenizer, short)
    target = tokenizer.encode(enriched)[1:]  # enriched [EOS], without its BOS
    sequence = prefix + target
    if len(sequence) > max_length:
        raise ValueError(f"pair {short!r} -> {enriched!r} is {len(sequence)} tokens; the enhancer's context holds "
                         f"{max_length}: give a larger max_length or shorter prompts")
    ids = np.full(max_length + 1, tokenizer.pad_token_id, np.int32)
    ids[:len(sequence)] = sequence
    mask = np.zeros(max_length + 1, np.float32)
    mask[len(prefix) - 1:len(sequence) - 1] = 1.0
    return ids, mask


def text_of(tokenizer: Tokenizer, ids) -> str:
    """The text of continuation ids: decoded, with the spaces of jieba's segmentation between Chinese
    characters removed ("一个 红色 的 圆形" -> "一个红色的圆形")."""
    return _SPACE_BETWEEN_CJK.sub("", tokenizer.decode(list(ids))).strip()
