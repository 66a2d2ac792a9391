"""Training compute in FLOPs, for comparisons at equal compute (the paper's Table 4: a Resolution Boost model
of the pair's combined size against two generators trained half the steps each).

FLOPs are counted, not estimated from a formula of the architecture: one forward pass of the network in
PyNative mode with a hook on every dense layer, convolution and attention product, each adding
2 x its multiply-adds (normalisations, activations and additions are left out: a few percent of a UNet's
work). A training step costs 3 forwards (the backward pass is about twice the forward: Kaplan et al.
2020, sec. 2.1). The text encoders and the VAE are frozen and cached in the generator stages, so the
UNet is what a stage's compute counts.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from mindspore import Tensor, nn

from ..config import PanGuDrawConfig, UNetConfig
from ..models import cpu_kernels
from ..models import layers as L
from ..runtime import eager

#: A training step's FLOPs per forward FLOP (forward + a backward of about twice the forward).
TRAIN_FLOPS_PER_FORWARD = 3


def _dense(cell, inputs, output) -> int:
    x = inputs[0]
    return 2 * int(np.prod(x.shape[:-1])) * cell.weight.shape[1] * cell.weight.shape[0]


def _conv(cell, inputs, output) -> int:
    out_channels, in_per_group, kh, kw = cell.weight.shape
    batch, _, height, width = output.shape
    return 2 * batch * out_channels * height * width * in_per_group * kh * kw


def _attention(cell, inputs, output) -> int:
    q, k = inputs[0], inputs[1]
    # q (B, Lq, heads x d), k (B, Lk, heads x d): q k^T and the weighted sum of v, each Lq x Lk x heads x d.
    return 2 * 2 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]


_COUNTERS = ((L.Dense, _dense), (L.Conv2d, _conv), (L.ScaledDotProductAttention, _attention))


def forward_flops(cell: nn.Cell, *inputs) -> int:
    """FLOPs (2 per multiply-add) of the dense layers, convolutions and attention products of one forward pass
    of ``cell`` on ``inputs`` (run once in PyNative mode, whatever the current mode)."""
    counts = []
    handles = []
    for _, sub in cell.cells_and_names():
        for kind, count in _COUNTERS:
            if isinstance(sub, kind):
                handles.append(sub.register_forward_hook(
                    lambda c, args, out, count=count: counts.append(count(c, args, out))))
    try:
        with eager(), cpu_kernels.portable(cell):  # every layer on its own: a block run as one kernel runs no hook
            cell(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return int(sum(counts))


def unet_forward_flops(unet: UNetConfig, latent_size: Tuple[int, int], context_length: int) -> int:
    """FLOPs of one UNet forward for one sample at latent (h, w), attending to ``context_length`` tokens."""
    from ..models.unet import UNetModel

    model = UNetModel(unet)
    h, w = latent_size
    y = Tensor(np.zeros((1, unet.adm_in_channels), np.float32)) if unet.adm_in_channels else None
    return forward_flops(model, Tensor(np.zeros((1, unet.in_channels, h, w), np.float32)),
                         Tensor(np.array([500.0], np.float32)),
                         Tensor(np.zeros((1, context_length, unet.context_dim), np.float32)), y)


def generator_training_flops(model: PanGuDrawConfig, buckets: Sequence[Tuple[int, int]], batch_size: int,
                             steps: int) -> float:
    """FLOPs of ``steps`` generator training steps of ``batch_size`` samples, the samples spread evenly over
    the image-size ``buckets`` (a bucket list's sizes have about one pixel count, so the spread matters
    little)."""
    factor = model.vae.downsample_factor
    context = max(encoder.max_position_embeddings for encoder in model.conditioner.encoders)
    per_sample = np.mean([unet_forward_flops(model.unet, (h // factor, w // factor), context) for h, w in buckets])
    return float(TRAIN_FLOPS_PER_FORWARD * per_sample * batch_size * steps)
