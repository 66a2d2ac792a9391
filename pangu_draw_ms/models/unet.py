"""The SDXL-architecture UNet of PanGu-Draw (one class, used for the structure and the texture generator).

Parameter names follow the sgm layout of the released checkpoints (``model.diffusion_model.`` + these):
``time_embed.{0,2}``, ``label_emb.0.{0,2}``, ``input_blocks.N.M...``, ``middle_block.{0,1,2}``,
``output_blocks.N.M...``, ``out.{0,2}``; inside a ResBlock ``in_layers.{0,2}``, ``emb_layers.1``,
``out_layers.{0,3}``, ``skip_connection``; inside a SpatialTransformer ``norm``, ``proj_in``,
``transformer_blocks.K.{norm1,attn1,norm2,attn2,norm3,ff}``, ``proj_out``.

Conditioning (PanGu-Draw): cross-attention on the concatenated text features ``context`` (B, 77, 2048)
and a vector ``y`` = pooled English text || sinusoidal(256) of the resolution-bucket index, mapped by
``label_emb`` and added to the timestep embedding. The UNet predicts eps.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import UNetConfig
from . import cpu_kernels
from . import layers as L


class ResBlock(L.FusedBlock):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-dropout-conv, + skip. On the CPU, one op
    after the embedding's projection (:class:`~pangu_draw_ms.models.layers.FusedBlock`)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float, dtype):
        super().__init__()
        # Each GroupNorm applies the SiLU that follows it (one CPU kernel); the Identity holds sgm's SiLU slot,
        # so that the convolutions keep their checkpoint names (in_layers.2, out_layers.3).
        self.in_layers = nn.SequentialCell([
            L.GroupNorm(groups, channels, eps=1e-5, dtype=dtype, activation="silu"), nn.Identity(),
            L.Conv2d(channels, out_channels, 3, padding=1, dtype=dtype)])
        self.emb_layers = nn.SequentialCell([L.SiLU(), L.Dense(emb_channels, out_channels, dtype=dtype)])
        self.out_layers = nn.SequentialCell([
            L.GroupNorm(groups, out_channels, eps=1e-5, dtype=dtype, activation="silu"), nn.Identity(),
            L.Dropout(dropout), L.Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype)])
        self.has_skip_conv = out_channels != channels
        self.skip_connection = (L.Conv2d(channels, out_channels, 1, dtype=dtype) if self.has_skip_conv
                                else nn.Identity())
        self.cpu_kernel = (cpu_kernels.res_block(groups, 1e-5, self.has_skip_conv)
                           if not L.ascend_kernels() and dtype == ms.float32 else None)
        self.use_cpu_kernel = self.cpu_kernel is not None
        self.cpu_kernel_config = Tensor(np.array([groups, 1e-5], np.float32))
        self.hold_kernel_parameters()

    def _kernel_layers(self) -> tuple:
        skip = (self.skip_connection,) if self.has_skip_conv else ()
        return (self.in_layers[0], self.in_layers[2], self.out_layers[0], self.out_layers[3]) + skip

    def _kernel_cells(self) -> tuple:
        kinds = (L.GroupNorm, L.Conv2d, L.GroupNorm, L.Conv2d, L.Conv2d)
        return tuple(zip(self._kernel_layers(), kinds))

    def construct(self, x, emb):
        if self.fused and not self.training:
            return self.cpu_kernel(L.as_dtype(x, ms.float32), L.as_dtype(self.emb_layers(emb), ms.float32),
                                   *self.kernel_parameters, self.cpu_kernel_config)
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Cell):
    """Multi-head attention of ``x`` over ``context`` (over ``x`` itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, dropout: float, dtype):
        super().__init__()
        inner = heads * head_dim
        self.to_q = L.Dense(query_dim, inner, bias=False, dtype=dtype)
        self.to_k = L.Dense(context_dim, inner, bias=False, dtype=dtype)
        self.to_v = L.Dense(context_dim, inner, bias=False, dtype=dtype)
        self.to_out = nn.SequentialCell([L.Dense(inner, query_dim, dtype=dtype), L.Dropout(dropout)])
        self.attention = L.ScaledDotProductAttention(heads, head_dim, dtype=dtype)

    def construct(self, x, context=None):
        if context is None:
            context = x
        return self.to_out(self.attention(self.to_q(x), self.to_k(context), self.to_v(context)))


class FeedForward(nn.Cell):
    """GEGLU feed-forward: ``net.0`` (GEGLU, dim -> mult*dim), ``net.1`` dropout, ``net.2`` back to dim."""

    def __init__(self, dim: int, mult: int, dropout: float, dtype):
        super().__init__()
        inner = dim * mult
        self.net = nn.SequentialCell([L.GEGLU(dim, inner, dtype=dtype), L.Dropout(dropout),
                                      L.Dense(inner, dim, dtype=dtype)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(L.FusedBlock):
    """Pre-LN block: self-attention, cross-attention on the text, GEGLU feed-forward (each residual). On the CPU,
    one op (:class:`~pangu_draw_ms.models.layers.FusedBlock`) instead of its 25 cells."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, ff_mult: int, dropout: float, dtype):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, dropout, dtype)
        self.ff = FeedForward(dim, ff_mult, dropout, dtype)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout, dtype)
        self.norm1 = L.LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.norm2 = L.LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.norm3 = L.LayerNorm(dim, eps=1e-5, dtype=dtype)
        scale = 1.0 / math.sqrt(head_dim)
        self.cpu_kernel = (cpu_kernels.transformer_block(heads, scale, 1e-5)
                           if not L.ascend_kernels() and dtype == ms.float32 else None)
        self.use_cpu_kernel = self.cpu_kernel is not None
        self.cpu_kernel_config = Tensor(np.array([heads, scale, 1e-5], np.float32))
        self.hold_kernel_parameters()

    def _kernel_layers(self) -> tuple:
        return (self.norm1, self.attn1.to_q, self.attn1.to_k, self.attn1.to_v, self.attn1.to_out[0], self.norm2,
                self.attn2.to_q, self.attn2.to_k, self.attn2.to_v, self.attn2.to_out[0], self.norm3,
                self.ff.net[0].proj, self.ff.net[2])

    def _kernel_cells(self) -> tuple:
        kinds = [L.LayerNorm] + [L.Dense] * 4 + [L.LayerNorm] + [L.Dense] * 4 + [L.LayerNorm] + [L.Dense] * 2
        return tuple(zip(self._kernel_layers(), kinds)) + (
            (self.attn1.attention, L.ScaledDotProductAttention), (self.attn2.attention, L.ScaledDotProductAttention),
            (self.ff.net[0], L.GEGLU))

    def construct(self, x, context):
        if self.fused and not self.training:
            return self.cpu_kernel(L.as_dtype(x, ms.float32), L.as_dtype(context, ms.float32), *self.kernel_parameters,
                                   self.cpu_kernel_config)
        return self._layers(x, context)

    def _layers(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(L.FusedBlock):
    """GroupNorm (eps 1e-6), proj_in, ``depth`` transformer blocks over the H*W tokens, proj_out, + input. On the CPU
    with linear projections, the norm, proj_in and the layout change are one op, proj_out, the layout change back and
    the residual another (:class:`~pangu_draw_ms.models.layers.FusedBlock`)."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int, config: UNetConfig,
                 dtype):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = config.use_linear_in_transformer
        self.norm = L.GroupNorm(config.norm_num_groups, channels, eps=1e-6, dtype=dtype)
        if self.use_linear:
            self.proj_in = L.Dense(channels, inner, dtype=dtype)
            self.proj_out = L.Dense(inner, channels, dtype=dtype)
        else:
            self.proj_in = L.Conv2d(channels, inner, 1, dtype=dtype)
            self.proj_out = L.Conv2d(inner, channels, 1, dtype=dtype)
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner, context_dim, heads, head_dim, config.ff_mult, config.dropout, dtype)
            for _ in range(depth)])
        on_cpu = self.use_linear and not L.ascend_kernels() and dtype == ms.float32
        self.tokens_in = cpu_kernels.tokens_in(config.norm_num_groups, 1e-6) if on_cpu else None
        self.tokens_out = cpu_kernels.tokens_out() if on_cpu else None
        self.use_cpu_kernel = self.tokens_in is not None and self.tokens_out is not None
        self.cpu_kernel_config = Tensor(np.array([config.norm_num_groups, 1e-6], np.float32))
        self.hold_kernel_parameters()

    def _kernel_layers(self) -> tuple:
        return self.norm, self.proj_in, self.proj_out

    def _kernel_cells(self) -> tuple:
        return tuple(zip(self._kernel_layers(), (L.GroupNorm, L.Dense, L.Dense)))

    def construct(self, x, context):
        if self.fused and not self.training:
            x = L.as_dtype(x, ms.float32)
            gamma, beta, in_weight, in_bias, out_weight, out_bias = self.kernel_parameters
            hidden = self.tokens_in(x, gamma, beta, in_weight, in_bias, self.cpu_kernel_config)
            for block in self.transformer_blocks:
                hidden = block(hidden, context)
            return self.tokens_out(hidden, x, out_weight, out_bias)
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        hidden = hidden.reshape(b, hidden.shape[1], h * w).transpose(0, 2, 1)
        if self.use_linear:
            hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = hidden.transpose(0, 2, 1).reshape(b, hidden.shape[-1], h, w)
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return hidden + x


class Downsample(nn.Cell):
    """Stride-2 3x3 convolution (symmetric padding 1), as the sgm/diffusers UNet."""

    def __init__(self, channels: int, dtype):
        super().__init__()
        self.op = L.Conv2d(channels, channels, 3, stride=2, padding=1, dtype=dtype)

    def construct(self, x):
        return self.op(x)


class Upsample(nn.Cell):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, channels: int, dtype):
        super().__init__()
        self.upsample = L.Upsample2xNearest()
        self.conv = L.Conv2d(channels, channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        return self.conv(self.upsample(x))


class TimestepEmbedSequential(nn.SequentialCell):
    """A UNet stage: children named ``0``, ``1``, ... (sgm layout), each given what it consumes."""

    def construct(self, x, emb, context):
        for cell in self.cell_list:
            if isinstance(cell, ResBlock):
                x = cell(x, emb)
            elif isinstance(cell, SpatialTransformer):
                x = cell(x, context)
            else:
                x = cell(x)
        return x


def time_embedding(config: UNetConfig, dtype) -> nn.SequentialCell:
    """``time_embed``: Linear-SiLU-Linear on the sinusoidal timestep embedding."""
    width = config.time_embed_dim
    return nn.SequentialCell([L.Dense(config.model_channels, width, dtype=dtype), L.SiLU(),
                              L.Dense(width, width, dtype=dtype)])


def label_embedding(config: UNetConfig, dtype) -> nn.SequentialCell:
    """``label_emb``: the vector conditioning's Linear-SiLU-Linear (nested once, as sgm names it)."""
    width = config.time_embed_dim
    return nn.SequentialCell([nn.SequentialCell([L.Dense(config.adm_in_channels, width, dtype=dtype), L.SiLU(),
                                                 L.Dense(width, width, dtype=dtype)])])


def _res_block(config: UNetConfig, channels: int, out_channels: int, dtype) -> ResBlock:
    return ResBlock(channels, config.time_embed_dim, out_channels, config.norm_num_groups, config.dropout, dtype)


def _attention(config: UNetConfig, channels: int, depth: int, dtype) -> SpatialTransformer:
    heads, head_dim = config.heads(channels)
    return SpatialTransformer(channels, heads, head_dim, depth, config.context_dim, config, dtype)


def encoder_blocks(config: UNetConfig, dtype) -> Tuple[List[TimestepEmbedSequential], List[int]]:
    """The ``input_blocks`` stages and the channels of each stage's output (the skip features).

    Shared by :class:`UNetModel` and the ControlNet, which copies this encoder.
    """
    mc = config.model_channels
    blocks = [TimestepEmbedSequential([L.Conv2d(config.in_channels, mc, 3, padding=1, dtype=dtype)])]
    channels = [mc]
    ch = mc
    last_level = len(config.channel_mult) - 1
    for level, mult in enumerate(config.channel_mult):
        depth = config.transformer_depth[level]
        for _ in range(config.num_res_blocks):
            stage = [_res_block(config, ch, mc * mult, dtype)]
            ch = mc * mult
            if depth > 0:
                stage.append(_attention(config, ch, depth, dtype))
            blocks.append(TimestepEmbedSequential(stage))
            channels.append(ch)
        if level != last_level:
            blocks.append(TimestepEmbedSequential([Downsample(ch, dtype)]))
            channels.append(ch)
    return blocks, channels


def middle_block(config: UNetConfig, dtype) -> TimestepEmbedSequential:
    """ResBlock - SpatialTransformer - ResBlock at the coarsest level."""
    ch = config.model_channels * config.channel_mult[-1]
    return TimestepEmbedSequential([_res_block(config, ch, ch, dtype),
                                    _attention(config, ch, config.transformer_depth_middle, dtype),
                                    _res_block(config, ch, ch, dtype)])


class UNetModel(nn.Cell):
    """eps_theta(x_t, t, context, y) of an SDXL-style latent diffusion model.

    Args:
        config: architecture.
        dtype: compute dtype (weights stay float32); the output is float32.

    Inputs: ``x`` (B, C, H, W) latents, ``timesteps`` (B,) (float or int), ``context`` (B, L,
    context_dim), ``y`` (B, adm_in_channels) vector conditioning (ignored when adm_in_channels is None;
    pass any tensor, e.g. the timesteps). H and W must be divisible by 2**(levels-1).
    ``control`` (optional): ControlNet residuals, one per input block then one for the middle block
    (what :class:`~pangu_draw_ms.models.controlnet.ControlNet` returns, already scaled); as in diffusers
    they are added to the skip features and to the middle block's output.
    """

    def __init__(self, config: UNetConfig, dtype=ms.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model_channels = config.model_channels
        self.size_multiple = 2 ** (len(config.channel_mult) - 1)
        mc = config.model_channels
        self.time_embed = time_embedding(config, dtype)
        self.has_label_emb = config.adm_in_channels is not None
        if self.has_label_emb:
            self.label_emb = label_embedding(config, dtype)

        input_blocks, skip_channels = encoder_blocks(config, dtype)
        self.input_blocks = nn.CellList(input_blocks)
        self.num_control = len(input_blocks) + 1
        self.middle_block = middle_block(config, dtype)

        output_blocks: List[nn.Cell] = []
        ch = skip_channels[-1]
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            depth = config.transformer_depth[level]
            for i in range(config.num_res_blocks + 1):
                stage = [_res_block(config, ch + skip_channels.pop(), mc * mult, dtype)]
                ch = mc * mult
                if depth > 0:
                    stage.append(_attention(config, ch, depth, dtype))
                if level != 0 and i == config.num_res_blocks:
                    stage.append(Upsample(ch, dtype))
                output_blocks.append(TimestepEmbedSequential(stage))
        self.output_blocks = nn.CellList(output_blocks)

        self.out = nn.SequentialCell([
            L.GroupNorm(config.norm_num_groups, ch, eps=1e-5, dtype=dtype, activation="silu"), nn.Identity(),
            L.Conv2d(mc, config.out_channels, 3, padding=1, dtype=dtype)])  # out.1: the SiLU, fused as in ResBlock

    def construct(self, x, timesteps, context, y, control=None):
        if x.shape[-2] % self.size_multiple != 0 or x.shape[-1] % self.size_multiple != 0:
            raise ValueError(f"UNet: latent height and width must be multiples of {self.size_multiple}, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        if control is not None and len(control) != self.num_control:
            raise ValueError(f"UNet: got {len(control)} ControlNet residuals; this UNet takes {self.num_control} "
                             "(one per input block, then the middle block's)")
        t_emb = L.sinusoidal_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.astype(self.dtype))
        if self.has_label_emb:
            emb = emb + self.label_emb(y.astype(self.dtype))
        context = context.astype(self.dtype)
        h = x.astype(self.dtype)
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            skips.append(h if control is None else h + control[i].astype(self.dtype))
        h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control[-1].astype(self.dtype)
        num_skips = len(skips)
        for i, block in enumerate(self.output_blocks):
            h = ops.cat((h, skips[num_skips - 1 - i]), axis=1)
            h = block(h, emb, context)
        return self.out(h).astype(ms.float32)
