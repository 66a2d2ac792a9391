"""The Inception-v3 network that FID and the Inception Score are measured with, as a MindSpore cell.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
equilibrium") and the Inception Score (Salimans et al. 2016, "Improved techniques for training GANs") are
defined by TensorFlow's ``inception-2015-12-05`` graph, not by torchvision's ImageNet Inception-v3: numbers
are comparable across papers only when this exact network is used. pytorch-fid (``FIDInceptionV3``, weights
``pt_inception-2015-12-05-6726825d.pth``) ports it to PyTorch; this cell computes the same function as
pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True)`` plus its 1008-way classifier,
with parameter names that :mod:`pangu_draw_ms.io.inception` maps pytorch-fid's state dict onto.

How the FID graph differs from torchvision's Inception-v3 (pytorch-fid's ``FIDInception*`` blocks):

* the average pools inside the A, C and E blocks leave the zero padding out of the average
  (``count_include_pad=False``, TensorFlow's ``SAME`` average pooling);
* the last block (``Mixed_7c``) pools its pool branch with a 3x3 *max* pool;
* the classifier has 1008 outputs (1000 ImageNet classes plus 8 unused ones of the TF graph).

Input: images (B, 3, H, W), float in [0, 1], any size. They are resized to 299x299 with bilinear
interpolation without corner alignment and without antialiasing (``F.interpolate(..., mode='bilinear',
align_corners=False)``, as pytorch-fid does; torch-fidelity and torchmetrics' FID resize with a
TensorFlow-1 compatible kernel instead, which gives slightly different features for inputs that are not
299x299) and scaled to [-1, 1].

Output: ``(features, logits, logits_unbiased)``:

* ``features`` (B, 2048): the final average pool - the features FID compares;
* ``logits`` (B, 1008): the classifier output ``fc(features)``, as pytorch-fid's/torchvision's ``fc``;
* ``logits_unbiased`` (B, 1008): ``features @ fc.weight^T`` without the bias - the Inception Score's
  logits. Salimans et al.'s reference code takes the weight of the graph's ``softmax/logits/MatMul`` and
  leaves the bias out; torch-fidelity (``logits_unbiased``) and torchmetrics' ``InceptionScore`` (default
  ``feature='logits_unbiased'``) follow it, and so does :mod:`pangu_draw_ms.evaluation.inception_score`.

Everything runs in float32 (FID is sensitive to small feature differences), in GRAPH_MODE and
PYNATIVE_MODE, with ops that have CPU kernels.
"""
from __future__ import annotations

from typing import Tuple, Union

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Zero, initializer

from ..models.layers import Dense

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
BATCH_NORM_EPS = 0.001  # the TF graph's (and torchvision's BasicConv2d's); MindSpore's default is 1e-5

Pair = Union[int, Tuple[int, int]]


def to_inception_input(images):
    """Images (B, 3, H, W) in [0, 1] -> the network's input: bilinear resize to 299x299 without corner
    alignment or antialiasing (torch's ``F.interpolate(..., mode='bilinear', align_corners=False)``, which
    ``ops.interpolate`` matches on CPU), then scaled to [-1, 1] - pytorch-fid's ``resize_input=True,
    normalize_input=True``."""
    x = ops.interpolate(images.astype(ms.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                        align_corners=False)
    return 2.0 * x - 1.0


def _pair(value: Pair) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Conv2dNoBias(nn.Cell):
    """2-D convolution without bias, with rectangular kernels and paddings (the 1x7/7x1 and 1x3/3x1
    factorised convolutions of Inception-v3), weight (out, in, kh, kw) named ``weight``.

    ``models.layers.Conv2d`` takes square kernels only; this uses the same CPU-capable ``ops.conv2d``.
    Weights start at zero: the network is only meaningful with the FID weights loaded.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair, stride: int = 1, padding: Pair = 0):
        super().__init__()
        self.stride = stride
        self.padding = _pair(padding)
        self.weight = Parameter(initializer(Zero(), (out_channels, in_channels) + _pair(kernel_size), ms.float32),
                                name="weight")

    def construct(self, x):
        return ops.conv2d(x, self.weight, None, stride=self.stride, pad_mode="pad", padding=self.padding)


class BasicConv2d(nn.Cell):
    """Convolution (no bias), BatchNorm with its stored statistics (eps 0.001), ReLU: torchvision's
    ``BasicConv2d``, the unit every Inception-v3 layer is made of. Parameters: ``conv.weight``,
    ``bn.gamma``/``bn.beta``/``bn.moving_mean``/``bn.moving_variance``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair, stride: int = 1, padding: Pair = 0):
        super().__init__()
        self.conv = Conv2dNoBias(in_channels, out_channels, kernel_size, stride, padding)
        self.bn = nn.BatchNorm2d(out_channels, eps=BATCH_NORM_EPS, use_batch_statistics=False)

    def construct(self, x):
        return ops.relu(self.bn(self.conv(x)))


def _average_pool_3x3():
    """3x3 stride-1 average pool over the zero-padded input that averages the in-image values only
    (``count_include_pad=False``): pytorch-fid's patch that reproduces TensorFlow's SAME pooling."""
    return nn.AvgPool2d(kernel_size=3, stride=1, pad_mode="pad", padding=1, count_include_pad=False)


class InceptionA(nn.Cell):
    """35x35 block (``Mixed_5b``-``Mixed_5d``): 1x1, 5x5, double 3x3 and average-pool branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.pool = _average_pool_3x3()
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def construct(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(self.pool(x))
        return ops.cat((self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool), axis=1)


class InceptionB(nn.Cell):
    """Grid reduction 35x35 -> 17x17 (``Mixed_6a``): strided 3x3, strided double 3x3 and max-pool branches."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")

    def construct(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return ops.cat((self.branch3x3(x), branch3x3dbl, self.pool(x)), axis=1)


class InceptionC(nn.Cell):
    """17x17 block (``Mixed_6b``-``Mixed_6e``) with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.pool = _average_pool_3x3()
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def construct(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(self.pool(x))
        return ops.cat((self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool), axis=1)


class InceptionD(nn.Cell):
    """Grid reduction 17x17 -> 8x8 (``Mixed_7a``): strided 3x3, 7x7-then-strided-3x3 and max-pool branches."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")

    def construct(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        return ops.cat((branch3x3, branch7x7x3, self.pool(x)), axis=1)


class InceptionE(nn.Cell):
    """8x8 block (``Mixed_7b``, ``Mixed_7c``) with expanded 1x3/3x1 branches. ``max_pool``: the pool branch
    uses a 3x3 max pool instead of the average pool - the FID graph's ``Mixed_7c`` (pytorch-fid's
    ``FIDInceptionE_2``)."""

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.pool = (nn.MaxPool2d(kernel_size=3, stride=1, pad_mode="pad", padding=1) if max_pool
                     else _average_pool_3x3())
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def construct(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = ops.cat((self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)), axis=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = ops.cat((self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)), axis=1)
        branch_pool = self.branch_pool(self.pool(x))
        return ops.cat((self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool), axis=1)


class FIDInceptionV3(nn.Cell):
    """The FID Inception-v3 (see the module docstring): images (B, 3, H, W) in [0, 1] ->
    ``(features (B, 2048), logits (B, 1008), logits_unbiased (B, 1008))``, all float32.

    The sub-cells carry torchvision's module names (``Conv2d_1a_3x3`` ... ``Mixed_7c``, ``fc``), so a
    pytorch-fid state dict maps onto it by renaming the BatchNorm entries only
    (:func:`pangu_draw_ms.io.inception.fid_inception_from_torch`). Built with zero weights: load them with
    :func:`pangu_draw_ms.io.inception.load_fid_inception`.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        # The classifier's weight and bias under Dense's names; construct uses them directly, so that the
        # unbiased logits need no second matmul.
        self.fc = Dense(NUM_FEATURES, NUM_LOGITS)
        self.set_train(False)
        for param in self.get_parameters():  # a fixed measuring network: no optimiser may pick it up
            param.requires_grad = False

    def construct(self, images):
        x = to_inception_input(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.max_pool(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(self.max_pool(x))))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        features = x.mean(axis=(2, 3))
        logits_unbiased = ops.matmul(features, self.fc.weight.T)
        return features, logits_unbiased + self.fc.bias, logits_unbiased
