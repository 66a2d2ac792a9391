"""Device-aware primitives shared by every network in the package.

Each primitive is chosen ONCE, when the cell is built, from the MindSpore device target:

* on Ascend the fast kernels: ``mint`` ops and ``ops.flash_attention_score`` (fp16/bf16, head size a
  multiple of 16 up to 512, no mask);
* elsewhere (CPU) ops that have CPU kernels in MindSpore 2.9/2.10: ``ops.conv2d``, ``ops.group_norm``,
  the ``ops.LayerNorm`` primitive, ``ops.gelu``, ``mint.nn.functional.linear``, ``ops.bmm``, ...; and for
  GroupNorm(+SiLU)/LayerNorm/GEGLU in cells that are not training, our own C++ kernels
  (models/cpu_kernels.py), 3-16x faster than MindSpore's CPU ones.

Both paths hold the same parameters under the same names - MindSpore's own ``nn`` naming, which the
released PanGu-Draw checkpoints use (``weight``/``bias`` for Dense and Conv2d, ``gamma``/``beta`` for
norms, ``embedding_table`` for embeddings) - and compute the same function.

Mixed precision: weights are stored float32; matmuls and convs run in the cell's compute ``dtype``
(float16 on Ascend by default, float32 on CPU); normalisations, softmax and the timestep embedding run in
float32 and cast back. MindSpore defaults that silently break parity are never relied on: GELU is the
exact (erf) form unless asked, LayerNorm eps is explicit, convolutions pad explicitly and carry a bias.
"""
from __future__ import annotations

import math
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, mint, nn, ops
from mindspore.common.initializer import HeUniform, Normal, One, Uniform, Zero, initializer

from pangu_draw_ms.models import cpu_kernels

_DTYPES = {"fp32": ms.float32, "float32": ms.float32, "fp16": ms.float16, "float16": ms.float16,
           "bf16": ms.bfloat16, "bfloat16": ms.bfloat16}


def ascend_kernels() -> bool:
    """True when the current MindSpore device target is Ascend (fast kernels available)."""
    return ms.get_context("device_target") == "Ascend"


def default_precision() -> str:
    """fp16 on Ascend; fp32 elsewhere (fp16 is slower on CPU and bf16 mostly has no CPU kernel)."""
    return "fp16" if ascend_kernels() else "fp32"


def compute_dtype(precision: Optional[str] = None) -> ms.dtype:
    """Map ``fp32``/``fp16``/``bf16`` (or ``None`` = device default) to a MindSpore dtype."""
    precision = precision or default_precision()
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; valid: fp32, fp16, bf16")
    return _DTYPES[precision]


def as_dtype(x, dtype):
    """``x`` in ``dtype``, without a Cast node where it already is: the check folds while a graph compiles, so a
    float32 network's graph holds none of the layers' same-dtype casts (thousands in the released UNet)."""
    return x if x.dtype == dtype else x.astype(dtype)


def _fan_in_uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return Uniform(bound)


class Dense(nn.Cell):
    """y = x W^T + b, weight (out, in) as in ``nn.Dense``; runs in ``dtype``.

    On the CPU, in float32 and when not training, an AVX-512 kernel (models/cpu_kernels.py) computes the product
    and the bias in one pass; MindSpore's MatMul runs oneDNN's AVX2 GEMM under the package's ISA cap, and a
    separate Add for the bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=ms.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        # PyTorch's default init (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))).
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_features, in_features), ms.float32),
                                name="weight")
        self.has_bias = bias
        self.bias = Parameter(initializer(_fan_in_uniform(in_features), (out_features,), ms.float32),
                              name="bias") if bias else None
        self.cpu_kernel = cpu_kernels.dense() if not ascend_kernels() and dtype == ms.float32 else None
        self.use_cpu_kernel = self.cpu_kernel is not None
        self.no_bias = None if bias else Tensor(np.zeros(out_features, np.float32))  # the kernel's bias operand

    def construct(self, x):
        x = as_dtype(x, self.dtype)
        weight = as_dtype(self.weight, self.dtype)  # parameters may be stored in fp16 (``weights_dtype``)
        bias = as_dtype(self.bias, self.dtype) if self.has_bias else None
        if self.use_cpu_kernel and not self.training:
            return self.cpu_kernel(x, weight, bias if self.has_bias else self.no_bias)
        return mint.nn.functional.linear(x, weight, bias)


class Conv2d(nn.Cell):
    """2-D convolution with explicit symmetric zero padding and a bias (weight (out, in, k, k)).

    On the CPU, in float32, with stride 1 and when not training, a direct AVX-512 kernel (models/cpu_kernels.py)
    replaces MindSpore's convolution, which oneDNN runs as im2col + an AVX2 GEMM under the package's ISA cap
    (runtime.py); strided convolutions and training keep MindSpore's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, dtype=ms.float32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.fast = ascend_kernels()
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = Parameter(
            initializer(HeUniform(math.sqrt(5)), (out_channels, in_channels, kernel_size, kernel_size), ms.float32),
            name="weight")
        self.has_bias = bias
        self.bias = Parameter(initializer(_fan_in_uniform(fan_in), (out_channels,), ms.float32),
                              name="bias") if bias else None
        self.cpu_kernel = (cpu_kernels.conv2d(kernel_size, padding)
                           if not self.fast and stride == 1 and dtype == ms.float32 else None)
        self.use_cpu_kernel = self.cpu_kernel is not None
        self.cpu_kernel_config = Tensor(np.array([padding], np.float32))
        self.no_bias = None if bias else Tensor(np.zeros(out_channels, np.float32))  # the kernel's bias operand

    def construct(self, x):
        weight = as_dtype(self.weight, self.dtype)
        bias = as_dtype(self.bias, self.dtype) if self.has_bias else None
        x = as_dtype(x, self.dtype)
        if self.use_cpu_kernel and not self.training:
            return self.cpu_kernel(x, weight, bias if self.has_bias else self.no_bias, self.cpu_kernel_config)
        if self.fast:
            return mint.nn.functional.conv2d(x, weight, bias, self.stride, self.padding)
        return ops.conv2d(x, weight, bias, stride=self.stride, pad_mode="pad", padding=self.padding)


class GroupNorm(nn.Cell):
    """GroupNorm over (B, C, ...) computed in float32, affine ``gamma``/``beta``; returns ``dtype``.

    ``activation="silu"`` applies SiLU to the result: the sgm/LDM "GroupNorm then SiLU" pairs (ResBlocks, the
    output heads) as one CPU kernel instead of two.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, dtype=ms.float32,
                 activation: Optional[str] = None):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
        if activation not in (None, "silu"):
            raise ValueError(f"GroupNorm: unknown activation {activation!r}; valid: None, 'silu'")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.dtype = dtype
        self.silu = activation == "silu"
        self.fast = ascend_kernels()
        self.gamma = Parameter(initializer(One(), (num_channels,), ms.float32), name="gamma")
        self.beta = Parameter(initializer(Zero(), (num_channels,), ms.float32), name="beta")
        self.cpu_kernel = None if self.fast else cpu_kernels.group_norm(num_groups, eps, self.silu)
        self.use_cpu_kernel = self.cpu_kernel is not None
        self.cpu_kernel_config = Tensor(np.array([num_groups, eps, self.silu], np.float32))

    def construct(self, x):
        x = as_dtype(x, ms.float32)
        gamma, beta = as_dtype(self.gamma, ms.float32), as_dtype(self.beta, ms.float32)
        if self.use_cpu_kernel and not self.training:
            return as_dtype(self.cpu_kernel(x, gamma, beta, self.cpu_kernel_config), self.dtype)
        if self.fast:
            y = mint.nn.functional.group_norm(x, self.num_groups, gamma, beta, self.eps)
        else:
            y = ops.group_norm(x, self.num_groups, gamma, beta, self.eps)
        if self.silu:
            y = ops.silu(y)
        return as_dtype(y, self.dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis in float32, affine ``gamma``/``beta``; returns ``dtype``.

    ``eps`` is required: ``nn.LayerNorm``'s default (1e-7) differs from PyTorch's 1e-5.
    """

    def __init__(self, normalized_shape: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.normalized_shape = (normalized_shape,)
        self.eps = eps
        self.dtype = dtype
        self.fast = ascend_kernels()
        self.gamma = Parameter(initializer(One(), (normalized_shape,), ms.float32), name="gamma")
        self.beta = Parameter(initializer(Zero(), (normalized_shape,), ms.float32), name="beta")
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.cpu_kernel = None if self.fast else cpu_kernels.layer_norm(eps)
        self.use_cpu_kernel = self.cpu_kernel is not None
        self.cpu_kernel_config = Tensor(np.array([eps], np.float32))

    def construct(self, x):
        x = as_dtype(x, ms.float32)
        gamma, beta = as_dtype(self.gamma, ms.float32), as_dtype(self.beta, ms.float32)
        if self.fast:
            y = mint.nn.functional.layer_norm(x, self.normalized_shape, gamma, beta, self.eps)
        elif self.use_cpu_kernel and not self.training:
            y = self.cpu_kernel(x, gamma, beta, self.cpu_kernel_config)
        else:
            y, _, _ = self.layer_norm(x, gamma, beta)
        return as_dtype(y, self.dtype)


class Embedding(nn.Cell):
    """Lookup table ``embedding_table`` (num, dim), N(0, 0.02) init; returns ``dtype``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=ms.float32):
        super().__init__()
        self.dtype = dtype
        self.embedding_table = Parameter(
            initializer(Normal(0.02), (num_embeddings, embedding_dim), ms.float32), name="embedding_table")

    def construct(self, ids):
        return ops.gather(self.embedding_table, ids, 0).astype(self.dtype)


def gelu(x, fast: bool):
    """Exact (erf) GELU. ``nn.GELU``'s default is the tanh approximation, which breaks parity."""
    if fast:
        return mint.nn.functional.gelu(x)
    return ops.gelu(x, approximate="none")


def quick_gelu(x):
    """CLIP's x * sigmoid(1.702 x)."""
    return x * ops.sigmoid(1.702 * x)


class GELU(nn.Cell):
    def __init__(self):
        super().__init__()
        self.fast = ascend_kernels()

    def construct(self, x):
        return gelu(x, self.fast)


class SiLU(nn.Cell):
    def construct(self, x):
        return ops.silu(x)


class Dropout(nn.Cell):
    """Dropout with probability ``p`` while training; the identity in inference or when ``p == 0``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p
        self.fast = ascend_kernels()

    def construct(self, x):
        if not self.training or self.p == 0.0:
            return x
        if self.fast:
            return mint.nn.functional.dropout(x, self.p, True)
        return ops.dropout(x, p=self.p)


class GEGLU(nn.Cell):
    """GEGLU (Shazeer 2020): ``proj`` maps dim -> 2*inner; output = h * GELU(gate).

    On the CPU, in float32 and when not training, the split and the gated GELU are one CPU kernel
    (models/cpu_kernels.py).
    """

    def __init__(self, dim_in: int, dim_out: int, dtype=ms.float32):
        super().__init__()
        self.proj = Dense(dim_in, dim_out * 2, dtype=dtype)
        self.fast = ascend_kernels()
        self.cpu_kernel = None if self.fast or dtype != ms.float32 else cpu_kernels.geglu()
        self.use_cpu_kernel = self.cpu_kernel is not None

    def construct(self, x):
        if self.use_cpu_kernel and not self.training:
            return self.cpu_kernel(self.proj(x))
        h, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return h * gelu(gate, self.fast)


class Upsample2xNearest(nn.Cell):
    """Nearest-neighbour x2 upsampling of (B, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.fast = ascend_kernels()

    def construct(self, x):
        if self.fast:
            return mint.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        h, w = x.shape[-2], x.shape[-1]
        return ops.interpolate(x, size=(h * 2, w * 2), mode="nearest")


class ScaledDotProductAttention(nn.Cell):
    """softmax(q k^T / sqrt(d) + mask) v over ``num_heads`` heads.

    Inputs are (B, L, num_heads * head_dim); ``mask`` (optional) is an additive float mask broadcastable
    to (B, num_heads, Lq, Lk). Flash attention is used on Ascend when the compute dtype is fp16/bf16,
    the head size is a multiple of 16 (<= 512) and there is no mask. On the CPU in float32, without a mask and
    when not training, an AVX-512 kernel (models/cpu_kernels.py) that reads the heads in place and holds the
    scores of 8 queries at a time. Otherwise batched matmuls with the softmax in float32, the queries
    processed in slices so that one slice's score matrix holds at most ``max_scores`` elements (a 1024x1024
    SDXL VAE attention would otherwise need a 16384^2 matrix).
    """

    def __init__(self, num_heads: int, head_dim: int, dtype=ms.float32, max_scores: int = 2 ** 26):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.scale = 1.0 / math.sqrt(head_dim)
        self.max_scores = max_scores
        self.flash = (ascend_kernels() and dtype in (ms.float16, ms.bfloat16)
                      and head_dim % 16 == 0 and head_dim <= 512)
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)  # q k^T without a Transpose kernel for k
        self.cpu_kernel = (cpu_kernels.attention(num_heads, self.scale)
                           if not ascend_kernels() and dtype == ms.float32 else None)
        self.use_cpu_kernel = self.cpu_kernel is not None
        self.cpu_kernel_config = Tensor(np.array([num_heads, self.scale], np.float32))

    def _split_heads(self, x):
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3).reshape(
            b * self.num_heads, n, self.head_dim)

    def _attend(self, qh, kh, vh, mask, b):
        lq, lk = qh.shape[1], kh.shape[1]
        scores = self.scores_matmul(qh, kh).astype(ms.float32)  # qh carries the 1/sqrt(d) scale
        if mask is not None:
            scores = (scores.reshape(b, self.num_heads, lq, lk) + mask.astype(ms.float32)).reshape(
                b * self.num_heads, lq, lk)
        probs = ops.softmax(scores, axis=-1).astype(self.dtype)
        return ops.bmm(probs, vh)

    def construct(self, q, k, v, mask: Optional[Tensor] = None):
        # The kernel's path first and alone: MindSpore parses (and partly infers) every statement of a construct for
        # each attention cell in the graph, and the other paths' statements in a separate method are never read
        # where the kernel runs (the released-layout UNet has 140 attention cells; the first call of its narrow
        # variant compiled 4-8 % faster so, bench/README.md). Inputs other than float32 take the general path,
        # which casts them.
        if (self.use_cpu_kernel and not self.training and mask is None and q.dtype == ms.float32
                and k.dtype == ms.float32 and v.dtype == ms.float32):
            return self.cpu_kernel(q, k, v, self.cpu_kernel_config)
        return self._attention(q, k, v, mask)

    def _attention(self, q, k, v, mask):
        """Flash attention (Ascend) or batched matmuls, in ``dtype``."""
        q = as_dtype(q, self.dtype)
        k = as_dtype(k, self.dtype)
        v = as_dtype(v, self.dtype)
        if self.flash and mask is None:
            return ops.flash_attention_score(q, k, v, self.num_heads, scalar_value=self.scale, input_layout="BSH")
        b, lq, _ = q.shape
        lk = k.shape[1]
        # The scale on q (Lq x d) rather than on the scores (Lq x Lk): 4-64x fewer multiplies in a UNet.
        qh = self._split_heads(q * self.scale)
        kh = self._split_heads(k)
        vh = self._split_heads(v)
        rows = max(1, self.max_scores // (b * self.num_heads * lk))
        if mask is not None or rows >= lq:
            out = self._attend(qh, kh, vh, mask, b)
        else:
            slices = ()
            for start in range(0, lq, rows):
                slices = slices + (self._attend(qh[:, start:start + rows], kh, vh, None, b),)
            out = ops.cat(slices, axis=1)
        return out.reshape(b, self.num_heads, lq, self.head_dim).transpose(0, 2, 1, 3).reshape(
            b, lq, self.num_heads * self.head_dim)


def sinusoidal_embedding(positions: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos(p f_i), sin(p f_i)] with f_i = max_period^(-i / (dim/2)), in float32.

    The DDPM/sgm ``timestep_embedding`` (cos first), used for the timestep and for the resolution-bucket
    index of the vector conditioning; equal to diffusers ``Timesteps(flip_sin_to_cos=True, shift=0)``.
    """
    half = dim // 2
    freqs = Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half).astype(np.float32))
    args = positions.astype(ms.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    emb = ops.cat((ops.cos(args), ops.sin(args)), axis=-1)
    if dim % 2:
        emb = ops.cat((emb, ops.zeros((emb.shape[0], 1), ms.float32)), axis=-1)
    return emb


def count_parameters(cell: nn.Cell) -> int:
    """Number of scalar parameters of ``cell`` (works on unmaterialised, lazily initialised cells)."""
    return int(sum(int(np.prod(p.shape)) for p in cell.get_parameters()))


class FusedBlock(nn.Cell):
    """A block whose inference on the CPU runs as few ops made of the kernels its layers use, in their order, so that
    its output is theirs (bit for bit, but for the transformer block's dense layers where a batch is shared by
    images: oneDNN's GEMM may round one image's rows otherwise, within 1e-6): the UNet's ResBlock and
    BasicTransformerBlock and the VAE's ResnetBlock as one op each, a batch shared among the kernel threads by images
    with one hand-over per block; the SpatialTransformer's norm and projections as two ops around its transformer
    blocks. The graph MindSpore compiles holds those nodes instead of the blocks' cells (the released UNet's first
    call took more than twice as long with them; bench/README.md).

    The layers run one by one where any of them would not use its own kernel (training, a LoRA adapter in place of a
    layer, parameters stored in float16, ``cpu_kernels.portable``). The parameter operands are held by the block in
    a ParameterTuple kept out of its own parameters (their names stay the layers'): a graph reaching them through
    ``self.attn1.to_out[0].weight`` and the like took 1.6-1.8x as long to compile (bench/README.md).
    ``Cell.init_parameters_data``, which may replace a parameter, also replaces it in a ParameterTuple, and
    :attr:`fused` checks that they are still the layers' own.
    """

    def hold_kernel_parameters(self) -> None:
        """Call at the end of ``__init__``, with the layers built."""
        self.__dict__["kernel_parameters"] = ParameterTuple(self._kernel_parameters())

    def _kernel_layers(self) -> tuple:
        """The layers with parameters whose work the kernel does; their parameters, in this order, are its operands."""
        raise NotImplementedError

    def _kernel_cells(self) -> tuple:
        """Every layer whose own kernel the block's kernel runs: (layer, the type it must have), the layers with
        parameters first."""
        raise NotImplementedError

    def _kernel_parameters(self) -> tuple:
        return tuple(p for layer in self._kernel_layers() for p in layer.get_parameters())

    @property
    def fused(self) -> bool:
        """Whether the block runs as its kernel: read in Python while MindSpore compiles ``construct``."""
        if not (self.use_cpu_kernel and all(type(layer) is kind and layer.use_cpu_kernel
                                            for layer, kind in self._kernel_cells())):
            return False
        current = self._kernel_parameters()
        return (len(current) == len(self.kernel_parameters) and all(p.dtype == ms.float32 for p in current)
                and all(held is now for held, now in zip(self.kernel_parameters, current)))
