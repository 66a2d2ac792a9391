"""SDXL AutoencoderKL: the LDM convolutional VAE that maps images to latents and back.

Images are NCHW in [-1, 1]; latents have ``config.latent_channels`` channels and are
``config.downsample_factor`` times smaller on each side. The encoder predicts a diagonal Gaussian
(``mean``, ``logvar``); the diffusion model works on ``scaling_factor`` x latents.

Parameter names follow the LDM/sgm layout, so the released checkpoint's ``first_stage_model.*``
entries load after stripping that prefix::

    encoder.conv_in
    encoder.down.{level}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}
    encoder.down.{level}.downsample.conv
    encoder.mid.{block_1,attn_1.{norm,q,k,v,proj_out},block_2}
    encoder.norm_out, encoder.conv_out, quant_conv, post_quant_conv
    decoder.conv_in, decoder.mid.*, decoder.up.{level}.block.{j}.*, decoder.up.{level}.upsample.conv
    decoder.norm_out, decoder.conv_out

``decoder.up`` is indexed by resolution level like ``encoder.down``: ``up.{len-1}`` (the coarsest)
runs first. Diffusers weights map onto these names with :mod:`pangu_draw_ms.io.diffusers_vae`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import VAEConfig
from . import cpu_kernels
from .layers import (
    Conv2d,
    FusedBlock,
    GroupNorm,
    ScaledDotProductAttention,
    Upsample2xNearest,
    as_dtype,
    ascend_kernels,
)

# LDM's normalisation for every GroupNorm of the VAE (diffusers' AutoencoderKL uses the same).
_NORM_EPS = 1e-6
# Bounds of the predicted log-variance (LDM's DiagonalGaussianDistribution): keeps exp() finite.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


class ResnetBlock(FusedBlock):
    """GroupNorm-SiLU-Conv3x3 twice with a residual; a 1x1 ``nin_shortcut`` when the width changes. On the CPU one
    op, the UNet ResBlock's without its embedding (:class:`~pangu_draw_ms.models.layers.FusedBlock`)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, dtype):
        super().__init__()
        # The norms apply the SiLU that follows them (one CPU kernel for both).
        self.norm1 = GroupNorm(num_groups, in_channels, eps=_NORM_EPS, dtype=dtype, activation="silu")
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(num_groups, out_channels, eps=_NORM_EPS, dtype=dtype, activation="silu")
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1, dtype=dtype)
        self.cpu_kernel = (cpu_kernels.res_block(num_groups, _NORM_EPS, self.has_shortcut, embedding=False)
                           if not ascend_kernels() and dtype == ms.float32 else None)
        self.use_cpu_kernel = self.cpu_kernel is not None
        self.cpu_kernel_config = Tensor(np.array([num_groups, _NORM_EPS], np.float32))
        self.hold_kernel_parameters()

    def _kernel_layers(self) -> tuple:
        shortcut = (self.nin_shortcut,) if self.has_shortcut else ()
        return (self.norm1, self.conv1, self.norm2, self.conv2) + shortcut

    def _kernel_cells(self) -> tuple:
        return tuple(zip(self._kernel_layers(), (GroupNorm, Conv2d, GroupNorm, Conv2d, Conv2d)))

    def construct(self, x):
        if self.fused and not self.training:
            return self.cpu_kernel(as_dtype(x, ms.float32), *self.kernel_parameters, self.cpu_kernel_config)
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over all pixels, with 1x1-conv ``q``/``k``/``v``/``proj_out``."""

    def __init__(self, channels: int, num_groups: int, dtype):
        super().__init__()
        self.norm = GroupNorm(num_groups, channels, eps=_NORM_EPS, dtype=dtype)
        self.q = Conv2d(channels, channels, 1, dtype=dtype)
        self.k = Conv2d(channels, channels, 1, dtype=dtype)
        self.v = Conv2d(channels, channels, 1, dtype=dtype)
        self.proj_out = Conv2d(channels, channels, 1, dtype=dtype)
        self.attention = ScaledDotProductAttention(num_heads=1, head_dim=channels, dtype=dtype)

    def construct(self, x):
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t):  # (B, C, H, W) -> (B, H*W, C)
            return t.reshape(b, c, height * width).transpose(0, 2, 1)

        h = self.attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        h = h.transpose(0, 2, 1).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Cell):
    """Stride-2 3x3 conv after padding ONE zero row/column at the bottom/right (LDM's asymmetric
    padding; a symmetric padding=1 would shift the sampling grid and break checkpoint parity)."""

    def __init__(self, channels: int, dtype):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0, dtype=dtype)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Cell):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, dtype):
        super().__init__()
        self.upsample = Upsample2xNearest()
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        return self.conv(self.upsample(x))


class MidBlock(nn.Cell):
    """ResnetBlock - AttnBlock - ResnetBlock at the coarsest resolution."""

    def __init__(self, channels: int, num_groups: int, dtype):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, num_groups, dtype)
        self.attn_1 = AttnBlock(channels, num_groups, dtype)
        self.block_2 = ResnetBlock(channels, channels, num_groups, dtype)

    def construct(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Cell):
    """One encoder resolution level: ``block`` (ResnetBlocks), then an optional ``downsample``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, add_downsample: bool,
                 num_groups: int, dtype):
        super().__init__()
        self.block = nn.CellList([
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, num_groups, dtype)
            for j in range(num_blocks)])
        self.add_downsample = add_downsample
        if add_downsample:
            self.downsample = Downsample(out_channels, dtype)

    def construct(self, x):
        for block in self.block:
            x = block(x)
        if self.add_downsample:
            x = self.downsample(x)
        return x


class UpLevel(nn.Cell):
    """One decoder resolution level: ``block`` (ResnetBlocks), then an optional ``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, add_upsample: bool,
                 num_groups: int, dtype):
        super().__init__()
        self.block = nn.CellList([
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, num_groups, dtype)
            for j in range(num_blocks)])
        self.add_upsample = add_upsample
        if add_upsample:
            self.upsample = Upsample(out_channels, dtype)

    def construct(self, x):
        for block in self.block:
            x = block(x)
        if self.add_upsample:
            x = self.upsample(x)
        return x


class Encoder(nn.Cell):
    """Image (B, in_channels, H, W) -> Gaussian moments (B, 2*latent_channels, H/f, W/f), before
    ``quant_conv``. Level ``i`` has ``num_res_blocks`` blocks of width ``base * channel_mult[i]`` and
    halves the resolution unless it is the last level."""

    def __init__(self, config: VAEConfig, dtype=ms.float32):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, config.base_channels, 3, padding=1, dtype=dtype)
        self.down = nn.CellList([
            DownLevel(config.base_channels if i == 0 else widths[i - 1], widths[i], config.num_res_blocks,
                      add_downsample=i != len(widths) - 1, num_groups=groups, dtype=dtype)
            for i in range(len(widths))])
        self.mid = MidBlock(widths[-1], groups, dtype)
        self.norm_out = GroupNorm(groups, widths[-1], eps=_NORM_EPS, dtype=dtype, activation="silu")
        self.conv_out = Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(self.norm_out(h))


class Decoder(nn.Cell):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f), after
    ``post_quant_conv``. Levels run coarsest first; each has ``num_res_blocks + 1`` blocks."""

    def __init__(self, config: VAEConfig, dtype=ms.float32):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups = config.norm_num_groups
        self.num_levels = len(widths)
        self.conv_in = Conv2d(config.latent_channels, widths[-1], 3, padding=1, dtype=dtype)
        self.mid = MidBlock(widths[-1], groups, dtype)
        # Level i receives the output of level i+1 (the mid block's for the coarsest level).
        self.up = nn.CellList([
            UpLevel(widths[min(i + 1, len(widths) - 1)], widths[i], config.num_res_blocks + 1,
                    add_upsample=i != 0, num_groups=groups, dtype=dtype)
            for i in range(len(widths))])
        self.norm_out = GroupNorm(groups, widths[0], eps=_NORM_EPS, dtype=dtype, activation="silu")
        self.conv_out = Conv2d(widths[0], config.out_channels, 3, padding=1, dtype=dtype)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for i in range(self.num_levels - 1, -1, -1):
            h = self.up[i](h)
        return self.conv_out(self.norm_out(h))


class AutoencoderKL(nn.Cell):
    """The SDXL VAE (LDM ``AutoencoderKL``) built from a :class:`VAEConfig`.

    Args:
        config: architecture and latent scaling (``scaling_factor``, ``force_fp32``).
        dtype: compute dtype requested by the caller (e.g. ``compute_dtype("fp16")``). It is ignored
            when ``config.force_fp32`` is set: SDXL's VAE overflows in float16, so it then computes in
            float32 whatever the rest of the model uses. The dtype actually used is ``self.dtype``.

    Methods (all tensors NCHW; images in [-1, 1]):

    * :meth:`encode` ``(x) -> (mean, logvar)``: the posterior, after ``quant_conv``.
    * :meth:`decode` ``(z) -> image``: ``post_quant_conv`` then the decoder.
    * :meth:`encode_to_latents` ``(x, noise=None) -> latents``: what the diffusion model sees,
      ``scaling_factor * (mean + std * noise)`` (the posterior mode when ``noise`` is None).
    * :meth:`decode_latents` ``(latents) -> image``: undoes the scaling, then :meth:`decode`.
    * ``vae(x, noise=None)``: reconstruction, ``decode(mean + std * noise)``.

    Outputs are in ``self.dtype``. Inputs of any float dtype are accepted and cast by the first conv.
    In GRAPH_MODE each of the encoder and decoder compiles to one graph; the methods also work inside
    another cell's ``construct``.
    """

    def __init__(self, config: VAEConfig, dtype=ms.float32):
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"AutoencoderKL needs a VAEConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = ms.float32 if config.force_fp32 else dtype
        self.in_channels = config.in_channels
        self.latent_channels = config.latent_channels
        self.downsample_factor = config.downsample_factor
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config, self.dtype)
        self.decoder = Decoder(config, self.dtype)
        self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1, dtype=self.dtype)
        self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1, dtype=self.dtype)

    def _check_images(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"AutoencoderKL.encode expects images of shape (batch, {self.in_channels}, height, width), "
                f"got shape {x.shape}")
        f = self.downsample_factor
        if x.shape[2] % f != 0 or x.shape[3] % f != 0:
            raise ValueError(
                f"AutoencoderKL.encode: image size {x.shape[2]}x{x.shape[3]} (HxW) is not divisible by the "
                f"downsample factor {f}; use sizes that are multiples of {f}")

    def _check_latents(self, z: Tensor, what: str) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"AutoencoderKL.{what} expects latents of shape (batch, {self.latent_channels}, height, width), "
                f"got shape {z.shape}")

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Posterior of images ``x`` (B, in_channels, H, W), H and W multiples of the downsample factor:
        ``(mean, logvar)``, each (B, latent_channels, H/f, W/f); ``logvar`` is clamped to [-30, 20]."""
        self._check_images(x)
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = ops.chunk(moments, 2, axis=1)
        return mean, ops.clamp(logvar, _LOGVAR_MIN, _LOGVAR_MAX)

    def decode(self, z: Tensor) -> Tensor:
        """Image (B, out_channels, h*f, w*f) from UNSCALED latents ``z`` (B, latent_channels, h, w)."""
        self._check_latents(z, "decode")
        return self.decoder(self.post_quant_conv(z))

    def _sample(self, mean: Tensor, logvar: Tensor, noise: Optional[Tensor]) -> Tensor:
        if noise is None:
            return mean
        if noise.shape != mean.shape:
            raise ValueError(f"AutoencoderKL: noise has shape {noise.shape} but the latents have shape {mean.shape}")
        return mean + ops.exp(0.5 * logvar) * noise.astype(mean.dtype)

    def encode_to_latents(self, x: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Scaled latents of images ``x``: ``scaling_factor * mean`` (the posterior mode) when ``noise``
        is None, else ``scaling_factor * (mean + exp(logvar / 2) * noise)`` with standard-normal ``noise``
        of the latents' shape (a posterior sample, as used in training)."""
        mean, logvar = self.encode(x)
        return self._sample(mean, logvar, noise) * self.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images from the diffusion model's (scaled) latents: ``decode(latents / scaling_factor)``."""
        self._check_latents(latents, "decode_latents")
        return self.decode(latents / self.scaling_factor)

    def construct(self, x: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Reconstruction of ``x``: decode the posterior mode, or a posterior sample given ``noise``."""
        mean, logvar = self.encode(x)
        return self.decode(self._sample(mean, logvar, noise))
