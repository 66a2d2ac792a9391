"""Prompt-pair data for the enhancer's training stages: a JSONL of ``short``, ``enriched``, ``lang`` rows, served
as the trainer's micro-batches.

The batches follow the image stages' rules (:mod:`pangu_draw_ms.training.data`): a :class:`BatchPlan` over one
"bucket" (every pair fits the enhancer's fixed ``max_length + 1`` row) permutes the pairs per ``(seed,
epoch)``, each global batch is cut into one slice per msrun worker, and micro-batch m is a pure function of m -
so a resumed run and N workers see exactly what one uninterrupted worker sees.
"""
from __future__ import annotations

import json
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from ..tokenizers import Tokenizer
from ..training.data import BatchPlan
from .template import prefix_ids, training_row


def read_pairs(path: str, languages: Sequence[str] = ("en", "zh")) -> List[Dict[str, str]]:
    """The rows of a pairs JSONL whose ``lang`` (default "en") is one of ``languages``; a row without
    ``short``/``enriched`` text raises ValueError naming its line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not (isinstance(row.get("short"), str) and row["short"] and isinstance(row.get("enriched"), str)
                    and row["enriched"]):
                raise ValueError(f"{path}:{number}: a prompt pair needs non-empty 'short' and 'enriched' texts")
            if row.get("lang", "en") in languages:
                rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompt pairs in languages {list(languages)}")
    return rows


def fitting_pairs(pairs: Sequence[Dict[str, str]], tokenizer: Tokenizer, max_length: int
                  ) -> Tuple[List[Dict[str, str]], int]:
    """``(the pairs whose training row fits max_length tokens, how many did not)``: a decoded expansion can
    tokenise longer than the ids it was decoded from."""
    kept = [p for p in pairs
            if len(prefix_ids(tokenizer, p["short"])) + len(tokenizer.encode(p["enriched"])) - 1 <= max_length]
    return kept, len(pairs) - len(kept)


class PairStream:
    """This worker's micro-batches of tokenised pairs: ``ids`` and ``loss_mask`` (B, max_length + 1) from
    :func:`~pangu_draw_ms.prompting.template.training_row`, and ``bucket_index`` (zeros: one bucket)."""

    replaced = 0  # the image streams count unreadable images here; pairs are all read up front

    def __init__(self, pairs: Sequence[Dict[str, str]], tokenizer: Tokenizer, max_length: int, plan: BatchPlan,
                 rank: int, batch_size: int):
        self.rows = [training_row(tokenizer, p["short"], p["enriched"], max_length) for p in pairs]
        self.plan, self.rank, self.batch_size = plan, rank, batch_size

    def batch(self, micro: int) -> Dict[str, np.ndarray]:
        """Micro-batch number ``micro`` of this rank."""
        epoch, position = self.plan.position(micro)
        global_batch = self.plan.epoch(epoch)[position]
        indices = global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return {"ids": np.stack([self.rows[i][0] for i in indices]),
                "loss_mask": np.stack([self.rows[i][1] for i in indices]),
                "bucket_index": np.zeros(len(indices), np.int32), "indices": indices.astype(np.int64)}

    def __call__(self, start: int) -> Iterator[Dict[str, np.ndarray]]:
        """Micro-batches ``start``, ``start + 1``, ... without end."""
        micro = start
        while True:
            yield self.batch(micro)
            micro += 1
