"""ControlNet (Zhang et al. 2023) in the sgm/cldm layout: a trainable copy of a UNet's encoder that turns a
control image into residuals for the UNet's skip features and middle block.

Parameter names (sgm ``control_model.`` + these): ``time_embed.{0,2}``, ``label_emb.0.{0,2}``,
``input_hint_block.{0,2,...}`` (the control-image convs; SiLU between them), ``input_blocks.N.M...``
(exactly the UNet's encoder, built by the same code), ``zero_convs.N.0``, ``middle_block.{0,1,2}``,
``middle_block_out.0``. The zero convs and the hint stack's last conv start at zero, so a fresh
ControlNet leaves the UNet unchanged. Diffusers ``ControlNetModel`` weights map onto these names with
:mod:`pangu_draw_ms.io.diffusers_controlnet`.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn
from mindspore.common.initializer import Zero, initializer

from ..config import ControlNetConfig
from . import layers as L
from .unet import TimestepEmbedSequential, encoder_blocks, label_embedding, middle_block, time_embedding


def _zero_conv(in_channels: int, out_channels: int, kernel_size: int, dtype) -> L.Conv2d:
    conv = L.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, dtype=dtype)
    conv.weight = Parameter(initializer(Zero(), conv.weight.shape, ms.float32), name="weight")
    conv.bias = Parameter(initializer(Zero(), conv.bias.shape, ms.float32), name="bias")
    return conv


def hint_block(config: ControlNetConfig, dtype) -> TimestepEmbedSequential:
    """Control image -> features of the first UNet stage: a 3x3 conv per width, then a stride-2 conv to
    the next width, SiLU after each, and a zero-initialised conv to ``model_channels``."""
    widths = config.hint_channels
    cells = [L.Conv2d(config.conditioning_channels, widths[0], 3, padding=1, dtype=dtype), L.SiLU()]
    for width, next_width in zip(widths[:-1], widths[1:]):
        cells += [L.Conv2d(width, width, 3, padding=1, dtype=dtype), L.SiLU(),
                  L.Conv2d(width, next_width, 3, stride=2, padding=1, dtype=dtype), L.SiLU()]
    cells.append(_zero_conv(widths[-1], config.unet.model_channels, 3, dtype))
    return TimestepEmbedSequential(cells)


class ControlNet(nn.Cell):
    """``construct(x, hint, timesteps, context, y, conditioning_scale=1.0)`` -> tuple of residuals.

    ``x``, ``timesteps``, ``context``, ``y`` are the UNet's inputs; ``hint`` is the control image
    (B, conditioning_channels, H * f, W * f) with f = ``config.hint_downsample_factor`` (8 for SDXL:
    pixel resolution). The output holds one residual per UNet input block, then the middle block's,
    each multiplied by ``conditioning_scale``: pass it to ``UNetModel(..., control=residuals)``.
    """

    def __init__(self, config: ControlNetConfig, dtype=ms.float32):
        super().__init__()
        if not isinstance(config, ControlNetConfig):
            raise TypeError(f"ControlNet needs a ControlNetConfig, got {type(config).__name__}")
        unet = config.unet
        self.config = config
        self.dtype = dtype
        self.model_channels = unet.model_channels
        self.hint_factor = config.hint_downsample_factor
        self.time_embed = time_embedding(unet, dtype)
        self.has_label_emb = unet.adm_in_channels is not None
        if self.has_label_emb:
            self.label_emb = label_embedding(unet, dtype)
        self.input_hint_block = hint_block(config, dtype)
        blocks, channels = encoder_blocks(unet, dtype)
        self.input_blocks = nn.CellList(blocks)
        self.zero_convs = nn.CellList([TimestepEmbedSequential([_zero_conv(c, c, 1, dtype)]) for c in channels])
        self.middle_block = middle_block(unet, dtype)
        width = channels[-1]
        self.middle_block_out = TimestepEmbedSequential([_zero_conv(width, width, 1, dtype)])

    def construct(self, x, hint, timesteps, context, y, conditioning_scale=1.0):
        if hint.shape[-2] != x.shape[-2] * self.hint_factor or hint.shape[-1] != x.shape[-1] * self.hint_factor:
            raise ValueError(f"ControlNet: the control image must be {self.hint_factor}x the latent size: latents "
                             f"{x.shape[-2]}x{x.shape[-1]} need a {x.shape[-2] * self.hint_factor}x"
                             f"{x.shape[-1] * self.hint_factor} image, got {hint.shape[-2]}x{hint.shape[-1]}")
        emb = self.time_embed(L.sinusoidal_embedding(timesteps, self.model_channels).astype(self.dtype))
        if self.has_label_emb:
            emb = emb + self.label_emb(y.astype(self.dtype))
        context = context.astype(self.dtype)
        guided_hint = self.input_hint_block(hint.astype(self.dtype), emb, context)
        h = x.astype(self.dtype)
        residuals = ()
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            residuals = residuals + ((self.zero_convs[i](h, emb, context) * conditioning_scale).astype(ms.float32),)
        h = self.middle_block(h, emb, context)
        return residuals + ((self.middle_block_out(h, emb, context) * conditioning_scale).astype(ms.float32),)
