"""The interface every tokenizer of this package implements, and the batching they share.

A tokenizer turns a prompt into ``[start] text ids [end]`` and a batch of prompts into an int32
array ``(B, max_length)`` padded with ``pad_token_id``. Text encoders pool at ``eot_token_id``.
"""
from __future__ import annotations

import abc
import warnings
from typing import List, Sequence, Union

import numpy as np


def _preview(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


class Tokenizer(abc.ABC):
    """Base class: subclasses implement :meth:`_text_to_ids` and :meth:`_ids_to_text`.

    Attributes: ``vocab_size``, ``max_length``, ``start_token_id``, ``eot_token_id`` (the end token,
    also the last id of a truncated prompt), ``pad_token_id``.
    """

    def __init__(self, *, vocab_size: int, max_length: int, start_token_id: int, eot_token_id: int,
                 pad_token_id: int):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (start and end tokens), got {max_length!r}")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.start_token_id = start_token_id
        self.eot_token_id = eot_token_id
        self.pad_token_id = pad_token_id

    @abc.abstractmethod
    def _text_to_ids(self, text: str) -> List[int]:
        """Ids of ``text`` without start/end tokens."""

    @abc.abstractmethod
    def _ids_to_text(self, ids: List[int]) -> str:
        """Text of ids that hold no start/end/padding."""

    def encode(self, text: str) -> List[int]:
        """``[start] ids [end]`` of one prompt, neither truncated nor padded."""
        if not isinstance(text, str):
            raise TypeError(f"expected a prompt string, got {type(text).__name__}")
        return [self.start_token_id] + self._text_to_ids(text) + [self.eot_token_id]

    def __call__(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """int32 ids ``(B, max_length)``: ``[start] ids [end] pad ...``.

        A prompt longer than ``max_length`` keeps its first ``max_length - 1`` ids and ends with the
        end token (as open_clip and BERT do); a warning says how many ids were dropped.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"expected a prompt string or a list of prompt strings, got {type(texts).__name__}")
        if not texts:
            raise ValueError("expected at least one prompt, got an empty list")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompt {i} is a {type(text).__name__}; every prompt must be a string")
        batch = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int32)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > self.max_length:
                warnings.warn(
                    f"prompt {i} {_preview(text)} is {len(ids)} tokens long with start and end tokens; "
                    f"max_length is {self.max_length}, so its last {len(ids) - self.max_length} text tokens "
                    f"were dropped",
                    stacklevel=2,
                )
                ids = ids[: self.max_length - 1] + [self.eot_token_id]
            batch[i, : len(ids)] = ids
        return batch

    def decode(self, ids: Union[Sequence[int], np.ndarray]) -> str:
        """Text of one id row (from :meth:`encode` or a padded row of :meth:`__call__`): a leading
        start token is skipped and the row ends at its first end token."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if ids and ids[0] == self.start_token_id:
            ids = ids[1:]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        return self._ids_to_text(ids)
