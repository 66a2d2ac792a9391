"""CLIP text transformer (HF ``CLIPTextModel`` semantics and parameter names), and the transformer
blocks it shares with the CLIP vision encoder (:mod:`pangu_draw_ms.models.clip_vision`).

One cell serves both PanGu-Draw text encoders: the 11-layer Chinese CLIP (quick_gelu, output after the
final LayerNorm, no projection) and the OpenCLIP ViT-bigG text tower (gelu, output of the penultimate
block, pooled EOT feature through ``text_projection``). Parameter names are those of transformers'
``text_model.*`` with MindSpore suffixes, so the released Chinese keys map by prefix and OpenCLIP
weights map through :mod:`pangu_draw_ms.io.transformers_clip`.

Pre-LN blocks: ``x + attn(LN1(x))``, then ``x + mlp(LN2(x))``; the text encoder attends under a causal
mask, the vision encoder without one.
"""
from __future__ import annotations

from typing import Protocol

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import TextEncoderConfig
from .layers import GELU, Dense, Embedding, LayerNorm, ScaledDotProductAttention, quick_gelu


class CLIPBlockConfig(Protocol):
    """What the shared blocks read from a config: :class:`TextEncoderConfig` and
    :class:`~pangu_draw_ms.config.VisionEncoderConfig` both have these fields."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float


class CLIPTextEmbeddings(nn.Cell):
    """Token embedding + learned absolute position embedding."""

    def __init__(self, config: TextEncoderConfig, dtype=ms.float32):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype)
        self.position_ids = Tensor(np.arange(config.max_position_embeddings, dtype=np.int32))

    def construct(self, input_ids):
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"CLIP text encoder: sequences of {length} tokens exceed the "
                             f"{self.max_positions} position embeddings; pass at most {self.max_positions}")
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:length])


class CLIPAttention(nn.Cell):
    """Multi-head self-attention with separate q/k/v/out projections; ``mask``: additive, or None."""

    def __init__(self, config: CLIPBlockConfig, dtype=ms.float32):
        super().__init__()
        width = config.hidden_size
        self.q_proj = Dense(width, width, dtype=dtype)
        self.k_proj = Dense(width, width, dtype=dtype)
        self.v_proj = Dense(width, width, dtype=dtype)
        self.out_proj = Dense(width, width, dtype=dtype)
        self.attention = ScaledDotProductAttention(config.num_heads, width // config.num_heads, dtype=dtype)

    def construct(self, x, mask):
        return self.out_proj(self.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), mask))


class CLIPMLP(nn.Cell):
    def __init__(self, config: CLIPBlockConfig, dtype=ms.float32):
        super().__init__()
        self.fc1 = Dense(config.hidden_size, config.intermediate_size, dtype=dtype)
        self.fc2 = Dense(config.intermediate_size, config.hidden_size, dtype=dtype)
        self.activation = GELU() if config.hidden_act == "gelu" else quick_gelu

    def construct(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, config: CLIPBlockConfig, dtype=ms.float32):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.self_attn = CLIPAttention(config, dtype=dtype)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype)

    def construct(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    """The stack of blocks; returns the outputs of the last two (the input when there is one block)."""

    def __init__(self, config: CLIPBlockConfig, dtype=ms.float32):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(config, dtype=dtype) for _ in range(config.num_layers)])

    def construct(self, x, mask):
        penultimate = x
        for layer in self.layers:
            penultimate = x
            x = layer(x, mask)
        return penultimate, x


class CLIPTextEncoder(nn.Cell):
    """CLIP text transformer built from a :class:`TextEncoderConfig`.

    ``construct(input_ids)`` with int ids (B, L), L <= ``max_position_embeddings``, returns
    ``(hidden, pooled)``:

    * ``hidden`` (B, L, hidden_size): final-LN output of the last block (``output_layer="last"``), or
      the output of the second-to-last block without the final LN (``"penultimate"``);
    * ``pooled``: final-LN output of the last block at the EOT position, through ``text_projection``
      (B, projection_dim); without ``projection_dim`` the EOT feature itself (B, hidden_size), which is
      transformers' ``pooler_output`` (a None output would break graph-mode compile caching). The EOT
      position is the first position holding the row's largest id (``eot_token_id=None``, CLIP BPE)
      or holding ``eot_token_id``; a row without that id pools position 0, as transformers does.

    ``dtype`` is the compute dtype; weights are float32, norms and softmax run in float32.
    """

    def __init__(self, config: TextEncoderConfig, dtype=ms.float32):
        super().__init__()
        self.config = config
        self.penultimate = config.output_layer == "penultimate"
        self.eot_token_id = config.eot_token_id
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype)
        self.encoder = CLIPEncoder(config, dtype=dtype)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.has_projection = config.projection_dim is not None
        if self.has_projection:
            self.text_projection = Dense(config.hidden_size, config.projection_dim, bias=False, dtype=dtype)
        length = config.max_position_embeddings
        # Additive causal mask in float32 (scores and softmax are float32): 0 on and below the diagonal,
        # the float32 minimum above it, which underflows to probability 0 without producing inf - inf.
        self.causal_mask = Tensor(np.triu(np.full((length, length), np.finfo(np.float32).min, np.float32), k=1))

    def construct(self, input_ids):
        x = self.embeddings(input_ids)
        length = input_ids.shape[1]
        penultimate, last = self.encoder(x, self.causal_mask[:length, :length])
        last = self.final_layer_norm(last)
        hidden = penultimate if self.penultimate else last
        pooled = self._at_eot(last, input_ids)
        if self.has_projection:
            pooled = self.text_projection(pooled)
        return hidden, pooled

    def _at_eot(self, features, input_ids):
        """``features[b, eot_position[b]]`` for each row b."""
        length = input_ids.shape[1]
        if self.eot_token_id is None:
            is_eot = input_ids == input_ids.max(axis=-1, keepdims=True)
        else:
            is_eot = input_ids == self.eot_token_id
        # First EOT position = smallest position holding it; rows without one give `length`, and `% length`
        # sends those to 0 (transformers' argmax of an all-false row).
        positions = ops.where(is_eot, self.embeddings.position_ids[:length], length)
        eot_position = positions.min(axis=-1) % length
        return ops.gather(features, eot_position.reshape(-1, 1), 1, batch_dims=1).squeeze(1)
