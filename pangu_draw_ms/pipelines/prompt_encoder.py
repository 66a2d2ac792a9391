"""Prompts -> UNet conditioning: every text encoder's tokenizer, then the Conditioner cell."""
from __future__ import annotations

from typing import List, Sequence, Union

import mindspore as ms
import numpy as np

from ..diffusion.denoiser import Conditioning
from ..models.conditioner import Conditioner
from ..tokenizers import Tokenizer


class PromptEncoder:
    """Runs both encoders on the same prompts (each through its own tokenizer) and returns the
    cross-attention context (B, 77, sum of widths) and the vector (pooled || bucket embedding)."""

    def __init__(self, conditioner: Conditioner, tokenizers: Sequence[Tokenizer]):
        if len(tokenizers) != len(conditioner.encoders):
            raise ValueError(f"{len(tokenizers)} tokenizers for {len(conditioner.encoders)} text encoders")
        self.conditioner = conditioner
        self.tokenizers: List[Tokenizer] = list(tokenizers)

    def tokenize(self, prompts: Sequence[str]) -> tuple:
        return tuple(tokenizer(list(prompts)) for tokenizer in self.tokenizers)

    def __call__(self, prompts: Union[str, Sequence[str]], bucket_index: int) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        # mutable: a plain tuple of tensors is a graph constant, and every new prompt would recompile.
        ids = ms.mutable(tuple(ms.Tensor(t.astype(np.int32)) for t in self.tokenize(prompts)))
        buckets = ms.Tensor(np.full((len(prompts),), bucket_index, np.int32))
        context, vector = self.conditioner(ids, buckets)
        return Conditioning(context.asnumpy().astype(np.float32), vector.asnumpy().astype(np.float32))
