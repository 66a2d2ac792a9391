"""CLIP vision transformer with projection (HF ``CLIPVisionModelWithProjection`` semantics and names).

The image encoder of an image-variation model (SD image variations): its projected class-token
embedding (B, projection_dim), given to the UNet as a one-token context (B, 1, projection_dim), takes
the place of text features. Parameter names are transformers' ``vision_model.*`` without that prefix,
plus ``visual_projection.weight``, with MindSpore suffixes (map on-disk weights with
:func:`pangu_draw_ms.io.transformers_clip.clip_vision_from_transformers`).

Embeddings: a strided convolution cuts the image into patches, a learned class token goes in front,
learned absolute positions are added; then ``pre_layrnorm`` (transformers' spelling), the pre-LN
blocks shared with the text encoder (no mask: every token sees every token), and ``post_layernorm``
on the class token only.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ..config import VisionEncoderConfig
from .clip_text import CLIPEncoder
from .layers import Conv2d, Dense, Embedding, LayerNorm

RGB_CHANNELS = 3


class CLIPVisionEmbeddings(nn.Cell):
    """[class token, patch embeddings] + position embeddings: (B, 3, S, S) -> (B, 1 + (S/P)^2, hidden)."""

    def __init__(self, config: VisionEncoderConfig, dtype=ms.float32):
        super().__init__()
        self.image_size = config.image_size
        self.dtype = dtype
        self.class_embedding = Parameter(initializer(Normal(config.hidden_size ** -0.5), (config.hidden_size,),
                                                     ms.float32), name="class_embedding")
        self.patch_embedding = Conv2d(RGB_CHANNELS, config.hidden_size, config.patch_size, stride=config.patch_size,
                                      bias=False, dtype=dtype)
        self.position_embedding = Embedding(config.num_positions, config.hidden_size, dtype=dtype)
        self.position_ids = Tensor(np.arange(config.num_positions, dtype=np.int32))

    def construct(self, pixel_values):
        batch, channels, height, width = pixel_values.shape
        if channels != RGB_CHANNELS or height != self.image_size or width != self.image_size:
            raise ValueError(f"CLIP vision encoder: pixel_values of shape {pixel_values.shape} do not fit; expected "
                             f"(batch, {RGB_CHANNELS}, {self.image_size}, {self.image_size}), normalised RGB")
        patches = self.patch_embedding(pixel_values)  # (B, hidden, grid, grid)
        patches = patches.reshape(batch, patches.shape[1], -1).transpose(0, 2, 1)
        class_token = ops.broadcast_to(self.class_embedding.astype(self.dtype).reshape(1, 1, -1),
                                       (batch, 1, patches.shape[2]))
        return ops.cat((class_token, patches), axis=1) + self.position_embedding(self.position_ids)


class CLIPVisionEncoder(nn.Cell):
    """CLIP vision transformer built from a :class:`VisionEncoderConfig`.

    ``construct(pixel_values)`` with pixel_values (B, 3, image_size, image_size), already normalised with
    CLIP's mean and std (:func:`pangu_draw_ms.pipelines.image_processing.preprocess_clip_images`), returns
    ``(last_hidden_state, image_embeds)``:

    * ``last_hidden_state`` (B, 1 + num_patches, hidden_size): output of the last block, without the
      final LayerNorm (as transformers);
    * ``image_embeds`` (B, projection_dim): ``visual_projection(post_layernorm(class token))``.

    ``dtype`` is the compute dtype; weights are float32, norms and softmax run in float32.
    """

    def __init__(self, config: VisionEncoderConfig, dtype=ms.float32):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.encoder = CLIPEncoder(config, dtype=dtype)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.visual_projection = Dense(config.hidden_size, config.projection_dim, bias=False, dtype=dtype)

    def construct(self, pixel_values):
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        _, last_hidden_state = self.encoder(x, None)
        image_embeds = self.visual_projection(self.post_layernorm(last_hidden_state[:, 0]))
        return last_hidden_state, image_embeds
