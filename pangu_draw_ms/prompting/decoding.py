"""The enhancer's decoding loop: greedy, temperature and nucleus (top-p) sampling, on the host.

mindformers' own ``generate`` needs kernels CPU MindSpore lacks (ArgMaxExt/TopkExt) and a KV cache that is
Ascend-only, so the loop is ours and device-neutral: each step runs the model once on fixed-shape rows of
``max_length`` tokens (one compiled graph for the whole decode; right padding is masked as keys, see
:mod:`pangu_draw_ms.prompting.llama`), reads the logits at each row's last real position and picks the next
token with numpy. Without a KV cache a step costs a full forward of ``max_length`` positions; the demo
enhancer's rows are 64 tokens, where a cache would save little and would be a second model implementation.

Nucleus sampling: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration" (top-p).
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np

from .config import DecodingConfig


def choose_token(logits: np.ndarray, settings: DecodingConfig, rng: np.random.Generator) -> int:
    """The next token from one position's ``logits`` (V,): the argmax when ``settings.temperature`` is 0,
    else a draw from the temperature-scaled softmax restricted to the top-p nucleus (one uniform number from
    ``rng`` per token)."""
    logits = np.asarray(logits, np.float64)
    if settings.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits / settings.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    # Keep the most probable tokens until their mass reaches top_p (the token that crosses it included).
    keep = int(np.searchsorted(np.cumsum(sorted_probs), settings.top_p * (1 - 1e-12))) + 1
    nucleus = sorted_probs[:keep] / sorted_probs[:keep].sum()
    pick = min(int(np.searchsorted(np.cumsum(nucleus), rng.random(), side="right")), keep - 1)
    return int(order[pick])


def generate(logits_of: Callable[[np.ndarray], np.ndarray], prompts: Sequence[Sequence[int]],
             settings: DecodingConfig, *, max_length: int, eos_token_id: int, pad_token_id: int,
             first_prompt_index: int = 0) -> List[List[List[int]]]:
    """``settings.num_candidates`` continuations of each prompt (token ids, the end token excluded).

    ``logits_of(ids)`` maps int32 rows (R, max_length) to logits (R, max_length, V). A continuation ends at
    the end token, after ``max_new_tokens`` tokens or when its row is full. Candidate j of prompt i draws
    from ``default_rng([seed, first_prompt_index + i, j])``: seeded, and independent of the other rows of the call
    (a prompt numbered n in a larger job draws the same wherever the job is split)."""
    for i, prompt in enumerate(prompts):
        if not 1 <= len(prompt) < max_length:
            raise ValueError(f"prompt {i} is {len(prompt)} tokens long; the enhancer's context holds {max_length} "
                             f"tokens, prompt and continuation together: give a prompt of 1 to {max_length - 1}")
    k = settings.num_candidates
    rows = [(i, j) for i in range(len(prompts)) for j in range(k)]
    rngs = [np.random.default_rng([settings.seed, first_prompt_index + i, j]) for i, j in rows]
    ids = np.full((len(rows), max_length), pad_token_id, np.int32)
    lengths = np.zeros(len(rows), np.int64)
    for r, (i, _) in enumerate(rows):
        ids[r, :len(prompts[i])] = prompts[i]
        lengths[r] = len(prompts[i])
    start = lengths.copy()
    done = np.zeros(len(rows), bool)
    for _ in range(settings.max_new_tokens):
        logits = np.asarray(logits_of(ids))
        for r in np.flatnonzero(~done):
            token = choose_token(logits[r, lengths[r] - 1], settings, rngs[r])
            if token == eos_token_id:
                done[r] = True
                continue
            ids[r, lengths[r]] = token
            lengths[r] += 1
            done[r] = lengths[r] == max_length
        if done.all():
            break
    continuations = [[int(t) for t in ids[r, start[r]:lengths[r]]] for r in range(len(rows))]
    return [continuations[i * k:(i + 1) * k] for i in range(len(prompts))]
