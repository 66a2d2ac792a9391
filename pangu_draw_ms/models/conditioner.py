"""The conditioner: prompt ids -> (cross-attention context, vector conditioning) for the UNet.

All text encoders read the same prompt (each through its own tokenizer). Their cross-attention
features are concatenated on the FEATURE axis in config order (PanGu-Draw: 768 Chinese + 1280 English
= 2048); the vector is the pooled text of encoder ``pooled_from`` followed by the sinusoidal embedding
(cos then sin, max_period 10000) of the resolution-bucket index.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config import ConditionerConfig
from .clip_text import CLIPTextEncoder
from .layers import sinusoidal_embedding


class Conditioner(nn.Cell):
    """``construct(ids, bucket_index)`` -> ``(crossattn, vector)``.

    ``ids``: a tuple with one int (B, L) tensor per encoder, in config order (all of one length L);
    ``bucket_index``: (B,) int. ``crossattn`` is (B, L, ``config.context_dim``), ``vector`` is
    (B, ``config.vector_dim``), both in the compute ``dtype``. Parameters are ``encoders.<i>.*``.
    """

    def __init__(self, config: ConditionerConfig, dtype=ms.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.pooled_from = config.pooled_from
        self.bucket_embed_dim = config.bucket_embed_dim
        self.encoders = nn.CellList([CLIPTextEncoder(encoder, dtype=dtype) for encoder in config.encoders])

    def construct(self, ids, bucket_index):
        if len(ids) != len(self.encoders):
            raise ValueError(f"Conditioner: got {len(ids)} id tensors for {len(self.encoders)} text encoders; "
                             "pass one (B, L) tensor per encoder, in config order")
        features = ()
        pooled = ()
        for i, encoder in enumerate(self.encoders):
            encoder_features, encoder_pooled = encoder(ids[i])
            features = features + (encoder_features,)
            pooled = pooled + (encoder_pooled,)
        bucket = sinusoidal_embedding(bucket_index, self.bucket_embed_dim).astype(self.dtype)
        return ops.cat(features, axis=-1), ops.cat((pooled[self.pooled_from], bucket), axis=-1)
