"""GroupNorm (with an optional fused SiLU), LayerNorm, GEGLU, the stride-1 convolution, the dense layer and
attention as hand-written CPU kernels (``kernels/cpu_kernels.cc``), for models/layers.py.

Why: MindSpore 2.9's own CPU kernels for the two normalisations take 6-19x torch's time, 3-16x ours
(``bench/cpu_kernels.py``), and were about a third of a tiny UNet forward here (leaving the norms out took
it from 100 to 65 ms; bench/README.md); its exact GELU is five kernels (div, erf, add, mul, mul), its Erf
alone 0.3 ms on a tiny UNet's feed-forward. Its convolutions and matmuls run oneDNN under the package's AVX2
cap (runtime.py: uncapped, oneDNN's NCHW 3x3 convolution takes a reference path). The convolution here is a
direct AVX-512 one (no im2col): 1.5-4x MindSpore's capped speed on a tiny UNet's 3x3 convolutions, within 1.12x
of torch's; the dense layer calls oneDNN's GEMM from a second, uncapped instance of MindSpore's library
(:func:`_onednn_gemm`), the bias in the same op; attention is one kernel instead of a head split, two batched
matmuls, a softmax and a head merge; the UNet's transformer block is one op made of these (:func:`transformer_block`:
one graph node instead of 25 cells, which took most of the released UNet's compile time), so are the UNet's ResBlock
and the VAE's ResnetBlock (:func:`res_block`) and a SpatialTransformer's way in and out (:func:`tokens_in`,
:func:`tokens_out`). The C++ source is
compiled once per machine with the system's C++ compiler (``$CXX``, else ``g++``/``c++``) into
``$XDG_CACHE_HOME/pangu_draw_ms/kernels/<hash>/`` and loaded with ``ops.Custom(func_type="aot")``, which runs in
GRAPH_MODE and PYNATIVE_MODE alike. The convolution, dense, attention and block kernels need AVX-512F
(:func:`avx512`; elsewhere the layers keep MindSpore's) and share their work among :func:`runtime.cpu_threads`
threads.

Gradients: each op carries a bprop written with MindSpore ops (the normalisation's standard backward, the
convolution's and matmul's transposes, attention's softmax backward; the block's as MindSpore differentiates it
written with its ops), so gradients flow through cells that use it. The layers use the kernels only in cells
that are not training (``set_train(False)``: inference, and frozen networks that gradients pass through), so a
trained cell's forward and backward stay MindSpore's own kernels.

Off switch: ``PANGU_DRAW_CPU_KERNELS=0``. Without a compiler, or if the build fails, the layers use
MindSpore's kernels (one log line says why). Exported MindIR graphs never contain these ops
(:func:`portable`): a graph for another machine cannot point at a library in this one's cache.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from mindspore import nn, ops
from mindspore.ops.operations._grad_ops import Conv2DBackpropFilter

from pangu_draw_ms.runtime import cache_home, on_cpu_threads, onednn_cap_is_the_packages

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "cpu_kernels.cc")
# No -march (the library may sit on a shared home; cpu_kernels.cc clones its loops per CPU instead); no trapping
# math: lets the compiler vectorise the branch-free exp of the fused SiLU (results unchanged: no FP traps are on).
COMPILE_FLAGS = ("-O3", "-std=c++14", "-fno-trapping-math", "-shared", "-fPIC", "-pthread")
_log = logging.getLogger(__name__)


def enabled(environ=os.environ) -> bool:
    """False when ``PANGU_DRAW_CPU_KERNELS=0`` turns the kernels off."""
    return environ.get("PANGU_DRAW_CPU_KERNELS", "1") != "0"


def _create_atomically(path: str, make: Callable[[str], object]) -> None:
    """Make the library ``path`` by ``make(partial)`` on a temporary name beside it, then rename: concurrent
    processes (msrun workers, test workers) each make their own and the last rename wins; no process ever loads a
    half-written library."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        make(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@functools.lru_cache(maxsize=None)
def library() -> Optional[str]:
    """Path of the compiled kernel library (built on first use, then read from the cache), or None when
    turned off, when no C++ compiler is found, or when the build fails."""
    if not enabled():
        return None
    compiler = next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++") if c)), None)
    if compiler is None:
        _log.info("no C++ compiler found: GroupNorm/LayerNorm use MindSpore's CPU kernels")
        return None
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(COMPILE_FLAGS).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    path = os.path.join(cache_home(), "pangu_draw_ms", "kernels", key, "cpu_kernels.so")
    if os.path.isfile(path):
        return path
    try:
        _create_atomically(path, lambda partial: subprocess.run(
            [compiler, *COMPILE_FLAGS, "-o", partial, SOURCE], check=True, capture_output=True, timeout=300))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        _log.warning("building the CPU kernels failed (%s%s); using MindSpore's kernels",
                     error, (": " + detail.decode(errors="replace")[-500:]) if detail else "")
        return None
    return path


@functools.lru_cache(maxsize=None)
def _loaded(path: str) -> ctypes.CDLL:
    """The library loaded in this process (MindSpore's aot loader opens the same file: the same instance), its
    thread count kept equal to :func:`runtime.cpu_threads`."""
    loaded = ctypes.CDLL(path)
    on_cpu_threads(loaded.SetThreads)
    return loaded


def _op(function: str, out_shape: Callable, bprop: Callable, configuration: tuple = ()) -> ops.Custom:
    """The library's ``function`` as a float32 aot op whose bprop closes over ``configuration``. That is one of the
    op's attributes: in GRAPH_MODE MindSpore 2.9 gives every op with the same attributes the bprop of the first one
    it differentiates (the input gradient through a GroupNorm without SiLU and one with, in one graph, was off by up to
    half its largest value; a 1x1 and a 3x3 convolution failed to compile)."""
    op = ops.Custom(f"{library()}:{function}", out_shape=out_shape, out_dtype=_same_as_x, func_type="aot", bprop=bprop)
    if configuration:
        op.add_prim_attr("bprop_configuration", repr(configuration))
    return op


def _conv2d_bprop(kernel_size: int, padding: int) -> Callable:
    def bprop(x, weight, bias, config, out, dout):
        out_channels = weight.shape[0]
        pads = (padding,) * 4
        dx = ops.Conv2DBackpropInput(out_channels, kernel_size, pad_mode="pad", pad=pads, pad_list=pads)(
            dout, weight, x.shape)
        dw = Conv2DBackpropFilter(out_channels, kernel_size, pad_mode="pad", pad=pads, pad_list=pads)(
            dout, x, weight.shape)
        return dx, dw, dout.sum((0, 2, 3)), ops.zeros_like(config)
    return bprop


def avx512() -> bool:
    """Whether the library is available and this CPU runs its convolution, dense and attention kernels
    (AVX-512F)."""
    path = library()
    return path is not None and bool(_loaded(path).Avx512Supported())


def conv2d(kernel_size: int, padding: int) -> Optional[ops.Custom]:
    """A stride-1 convolution ``(x, weight, bias, config) -> y`` with ``config = [padding]`` (float32; NCHW), or
    None without :func:`avx512`."""
    if not avx512():
        return None

    def out_shape(x, weight, *_):
        return [x[0], weight[0], x[2] + 2 * padding - kernel_size + 1, x[3] + 2 * padding - kernel_size + 1]

    return _op("Conv2dForward", out_shape, _conv2d_bprop(kernel_size, padding), (kernel_size, padding))


def _onednn_copy() -> Optional[str]:
    """A copy of MindSpore's oneDNN library in the kernel cache (made once; None where MindSpore has none). Loaded
    as a file of its own it is a second oneDNN instance, whose ISA is set apart from the process's cap."""
    import mindspore

    found = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(mindspore.__file__)), "lib", "libdnnl.so*")))
    if not found:
        return None
    source = os.stat(found[0])
    key = hashlib.sha256(f"{found[0]}:{source.st_size}:{source.st_mtime_ns}".encode()).hexdigest()[:16]
    path = os.path.join(cache_home(), "pangu_draw_ms", "onednn", key, "libdnnl.so")
    if not os.path.isfile(path):
        _create_atomically(path, lambda partial: shutil.copyfile(found[0], partial))
    return path


@functools.lru_cache(maxsize=None)
def _onednn_gemm() -> bool:
    """Hand oneDNN's sgemm from :func:`_onednn_copy` to the library; False where that fails (a log line says why).
    Under the package's own cap the copy runs at the CPU's full ISA (``dnnl_set_max_cpu_isa`` before its first use:
    the cap is there for MindSpore's 3x3 convolutions, which the copy never runs); under a user's cap, the user's."""
    try:
        copy = _onednn_copy()
        if copy is None:
            raise OSError("no libdnnl in MindSpore's lib folder")
        onednn = ctypes.CDLL(copy)
        if onednn_cap_is_the_packages() and onednn.dnnl_set_max_cpu_isa(0) != 0:  # 0: dnnl_cpu_isa_default
            raise OSError("dnnl_set_max_cpu_isa failed")
        _loaded(library()).SetGemm(ctypes.cast(onednn.dnnl_sgemm, ctypes.c_void_p))
    except (OSError, AttributeError) as error:
        _log.info("oneDNN's GEMM is not available to the dense kernel (%s): Dense uses MindSpore's MatMul", error)
        return False
    return True


def _dense_bprop(x, weight, bias, out, dout):
    rows = dout.reshape(-1, dout.shape[-1])
    dx = ops.matmul(rows, weight).reshape(x.shape)
    return dx, ops.matmul(rows.T, x.reshape(-1, x.shape[-1])), rows.sum(0)


def _dense_out_shape(x, weight, *_):
    return list(x[:-1]) + [weight[0]]


def dense() -> Optional[ops.Custom]:
    """``(x (*, in), weight (out, in), bias (out)) -> x weight^T + bias`` (float32) by oneDNN's GEMM at the CPU's
    full ISA (:func:`_onednn_gemm`), or None without it or without :func:`avx512`."""
    if not avx512() or not _onednn_gemm():
        return None
    return _op("DenseForward", _dense_out_shape, _dense_bprop)


def _attention_bprop(heads: int, scale: float) -> Callable:
    def bprop(q, k, v, config, out, dout):
        # p = softmax(s), s = scale q k^T per head: dv = p^T g, dp = g v^T, ds = p (dp - rowsum(dp p)),
        # dq = scale ds k, dk = scale ds^T q (g = dout).
        b, width = q.shape[0], q.shape[-1]

        def split(x):
            return x.reshape(b, -1, heads, width // heads).transpose(0, 2, 1, 3)

        def merge(x):
            return x.transpose(0, 2, 1, 3).reshape(b, -1, width)

        qh, kh, vh, gh = split(q), split(k), split(v), split(dout)
        p = ops.softmax(ops.matmul(qh, kh.swapaxes(-1, -2)) * scale, axis=-1)
        dp = ops.matmul(gh, vh.swapaxes(-1, -2))
        ds = p * (dp - (dp * p).sum(-1, keepdims=True))
        return (merge(ops.matmul(ds, kh) * scale), merge(ops.matmul(ds.swapaxes(-1, -2), qh) * scale),
                merge(ops.matmul(p.swapaxes(-1, -2), gh)), ops.zeros_like(config))
    return bprop


def attention(heads: int, scale: float) -> Optional[ops.Custom]:
    """``(q (B, Lq, heads * dim), k, v (B, Lk, heads * dim), config = [heads, scale]) -> softmax(q k^T scale) v``
    per head, in the same layout (float32; no mask), or None without :func:`avx512`."""
    if not avx512():
        return None
    return _op("AttentionForward", _same_as_x, _attention_bprop(heads, scale), (heads, scale))


def _transformer_block_bprop(heads: int, scale: float, eps: float) -> Callable:
    """The block's gradients as MindSpore differentiates the same function written with its ops (the op is used in
    frozen networks that gradients pass through: a ControlNet's base UNet)."""
    def layer_norm(x, gamma, beta):
        centred = x - x.mean(-1, keep_dims=True)
        return centred * ops.rsqrt((centred * centred).mean(-1, keep_dims=True) + eps) * gamma + beta

    def split(x):
        return x.reshape(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(0, 2, 1, 3)

    def attend(x, source, to_q, to_k, to_v, to_out, out_bias):
        q, k, v = split(ops.matmul(x, to_q.T)), split(ops.matmul(source, to_k.T)), split(ops.matmul(source, to_v.T))
        mixed = ops.matmul(ops.softmax(ops.matmul(q, k.swapaxes(-1, -2)) * scale, axis=-1), v).transpose(0, 2, 1, 3)
        return ops.matmul(mixed.reshape(x.shape[0], -1, to_q.shape[0]), to_out.T) + out_bias

    def forward(x, context, n1_gamma, n1_beta, q1, k1, v1, out1, out1_bias, n2_gamma, n2_beta, q2, k2, v2, out2,
                out2_bias, n3_gamma, n3_beta, ff_proj, ff_proj_bias, ff_out, ff_out_bias):
        normed = layer_norm(x, n1_gamma, n1_beta)
        x = attend(normed, normed, q1, k1, v1, out1, out1_bias) + x
        x = attend(layer_norm(x, n2_gamma, n2_beta), context, q2, k2, v2, out2, out2_bias) + x
        h, gate = ops.chunk(ops.matmul(layer_norm(x, n3_gamma, n3_beta), ff_proj.T) + ff_proj_bias, 2, axis=-1)
        return ops.matmul(h * ops.gelu(gate, approximate="none"), ff_out.T) + ff_out_bias + x

    gradients = ops.GradOperation(get_all=True, sens_param=True)(forward)

    def bprop(x, context, n1_gamma, n1_beta, q1, k1, v1, out1, out1_bias, n2_gamma, n2_beta, q2, k2, v2, out2,
              out2_bias, n3_gamma, n3_beta, ff_proj, ff_proj_bias, ff_out, ff_out_bias, config, out, dout):
        return gradients(x, context, n1_gamma, n1_beta, q1, k1, v1, out1, out1_bias, n2_gamma, n2_beta, q2, k2, v2,
                         out2, out2_bias, n3_gamma, n3_beta, ff_proj, ff_proj_bias, ff_out, ff_out_bias,
                         dout) + (ops.zeros_like(config),)
    return bprop


def transformer_block(heads: int, scale: float, eps: float) -> Optional[ops.Custom]:
    """The UNet's pre-LN transformer block (self-attention, cross-attention on ``context``, GEGLU feed-forward, each
    residual) as one op ``(x (B, N, C), context (B, M, D), the 20 parameters in the kernel's order, config =
    [heads, scale, eps]) -> y (B, N, C)`` (float32), or None without :func:`dense`'s GEMM or :func:`avx512`.
    One op instead of the 25 cells a block is made of: compile time (bench/README.md)."""
    if not avx512() or not _onednn_gemm():
        return None
    return _op("TransformerBlockForward", _same_as_x, _transformer_block_bprop(heads, scale, eps), (heads, scale, eps))


def _group_norm_with_ops(x, gamma, beta, groups: int, eps: float):
    """GroupNorm of (B, C, H, W) written with MindSpore ops, for the block ops' gradients."""
    grouped = x.reshape(x.shape[0], groups, -1)
    centred = grouped - grouped.mean(-1, keep_dims=True)
    normed = (centred * ops.rsqrt((centred * centred).mean(-1, keep_dims=True) + eps)).reshape(x.shape)
    return normed * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)


def _res_block_bprop(groups: int, eps: float, skip: bool, embedding: bool) -> Callable:
    """The ResBlock's gradients as MindSpore differentiates the same function written with its ops (frozen networks
    that gradients pass through, as for the transformer block)."""
    def conv(x, weight, bias, padding):
        return ops.conv2d(x, weight, bias, pad_mode="pad", padding=padding)

    def forward(x, *p):  # p: [emb,] norm1 gamma, beta, conv1, bias, norm2 gamma, beta, conv2, bias[, skip, bias]
        q = p[1:] if embedding else p
        h = conv(ops.silu(_group_norm_with_ops(x, q[0], q[1], groups, eps)), q[2], q[3], 1)
        if embedding:
            h = h + p[0].reshape(p[0].shape + (1, 1))
        h = conv(ops.silu(_group_norm_with_ops(h, q[4], q[5], groups, eps)), q[6], q[7], 1)
        return (conv(x, q[8], q[9], 0) if skip else x) + h

    return _bprop_with_config(ops.GradOperation(get_all=True, sens_param=True)(forward),
                              1 + embedding + 8 + 2 * skip)


def _bprop_with_config(gradients: Callable, inputs: int) -> Callable:
    """The bprop of an op of ``inputs`` tensors and a config: ``gradients`` (of a function of those tensors, the
    sensitivity last), the config's gradient zero. One per number of inputs: MindSpore's graph compiler takes no
    variadic bprop."""
    if inputs == 9:
        def bprop(a, b, c, d, e, f, g, h, i, config, out, dout):
            return gradients(a, b, c, d, e, f, g, h, i, dout) + (ops.zeros_like(config),)
    elif inputs == 10:
        def bprop(a, b, c, d, e, f, g, h, i, j, config, out, dout):
            return gradients(a, b, c, d, e, f, g, h, i, j, dout) + (ops.zeros_like(config),)
    elif inputs == 11:
        def bprop(a, b, c, d, e, f, g, h, i, j, k, config, out, dout):
            return gradients(a, b, c, d, e, f, g, h, i, j, k, dout) + (ops.zeros_like(config),)
    elif inputs == 12:
        def bprop(a, b, c, d, e, f, g, h, i, j, k, m, config, out, dout):
            return gradients(a, b, c, d, e, f, g, h, i, j, k, m, dout) + (ops.zeros_like(config),)
    else:
        raise ValueError(f"no bprop for {inputs} inputs")
    return bprop


def _res_block_out_shape(x, *operands):
    return [x[0], operands[-2][0], x[2], x[3]]  # (N, O, H, W): the operand before the config is a bias of O


def res_block(groups: int, eps: float, skip: bool, embedding: bool = True) -> Optional[ops.Custom]:
    """The UNet's ResBlock (GroupNorm-SiLU-conv3x3, + the projected embedding, GroupNorm-SiLU-conv3x3, + the input or
    its 1x1 ``skip`` convolution) as one op ``(x (N, C, H, W), emb (N, O), the 8 or 10 parameters in the kernel's
    order, config = [groups, eps]) -> y (N, O, H, W)`` (float32), or None without :func:`avx512`. Without
    ``embedding`` (the VAE's ResnetBlock) there is no ``emb`` operand."""
    if not avx512():
        return None
    return _op("ResBlockForward", _res_block_out_shape, _res_block_bprop(groups, eps, skip, embedding),
               (groups, eps, skip, embedding))


def _tokens_in_bprop(groups: int, eps: float) -> Callable:
    """The gradients of GroupNorm -> tokens -> proj_in as MindSpore differentiates them written with its ops."""
    def forward(x, gamma, beta, weight, bias):
        normed = _group_norm_with_ops(x, gamma, beta, groups, eps)
        tokens = normed.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)
        return ops.matmul(tokens, weight.T) + bias

    gradients = ops.GradOperation(get_all=True, sens_param=True)(forward)

    def bprop(x, gamma, beta, weight, bias, config, out, dout):
        return gradients(x, gamma, beta, weight, bias, dout) + (ops.zeros_like(config),)
    return bprop


def _tokens_out_bprop(tokens, x, weight, bias, out, dout):
    # y = (tokens W^T + b) as (B, C, H, W) + x: the tokens' gradient is dout's tokens through W; W's and b's are
    # summed over every token.
    rows = dout.reshape(dout.shape[0], dout.shape[1], -1).transpose(0, 2, 1)  # (B, HW, C)
    flat_rows, flat_tokens = rows.reshape(-1, rows.shape[-1]), tokens.reshape(-1, tokens.shape[-1])
    return ops.matmul(rows, weight), dout, ops.matmul(flat_rows.T, flat_tokens), flat_rows.sum(0)


def _tokens_in_out_shape(x, gamma, beta, weight, *_):
    return [x[0], x[2] * x[3], weight[0]]


def _tokens_out_out_shape(tokens, x, *_):
    return x


def tokens_in(groups: int, eps: float) -> Optional[ops.Custom]:
    """A SpatialTransformer's way in as one op ``(x (B, C, H, W), norm gamma, beta (C), proj_in weight (I, C), bias (I),
    config = [groups, eps]) -> (B, H*W, I)``: the group norm, the feature map as tokens, proj_in (float32), or None
    without :func:`dense`'s GEMM or :func:`avx512`."""
    if not avx512() or not _onednn_gemm():
        return None
    return _op("TokensInForward", _tokens_in_out_shape, _tokens_in_bprop(groups, eps), (groups, eps))


def tokens_out() -> Optional[ops.Custom]:
    """A SpatialTransformer's way out as one op ``(tokens (B, H*W, I), x (B, C, H, W), proj_out weight (C, I), bias
    (C)) -> proj_out(tokens) as (B, C, H, W) + x`` (float32), or None without :func:`dense`'s GEMM or
    :func:`avx512`."""
    if not avx512() or not _onednn_gemm():
        return None
    return _op("TokensOutForward", _tokens_out_out_shape, _tokens_out_bprop)


def _group_norm_bprop(num_groups: int, eps: float, silu: bool) -> Callable:
    def bprop(x, gamma, beta, config, out, dout):
        shape = x.shape
        channel_shape = (1, shape[1]) + (1,) * (len(shape) - 2)
        grouped = x.reshape(shape[0], num_groups, -1)
        centred = grouped - grouped.mean(-1, keep_dims=True)
        rstd = ops.rsqrt((centred * centred).mean(-1, keep_dims=True) + eps)
        normed = centred * rstd
        if silu:  # y = z sigmoid(z), z the affine output: dy/dz = s (1 + z (1 - s)), s = sigmoid(z)
            z = normed.reshape(shape) * gamma.reshape(channel_shape) + beta.reshape(channel_shape)
            s = ops.sigmoid(z)
            dout = dout * s * (1 + z * (1 - s))
        scaled = (dout * gamma.reshape(channel_shape)).reshape(shape[0], num_groups, -1)
        dx = rstd * (scaled - scaled.mean(-1, keep_dims=True)
                     - normed * (scaled * normed).mean(-1, keep_dims=True))
        axes = (0,) + tuple(range(2, len(shape)))
        return dx.reshape(shape), (dout * normed.reshape(shape)).sum(axes), dout.sum(axes), ops.zeros_like(config)
    return bprop


def _layer_norm_bprop(eps: float) -> Callable:
    def bprop(x, gamma, beta, config, out, dout):
        centred = x - x.mean(-1, keep_dims=True)
        rstd = ops.rsqrt((centred * centred).mean(-1, keep_dims=True) + eps)
        normed = centred * rstd
        scaled = dout * gamma
        dx = rstd * (scaled - scaled.mean(-1, keep_dims=True)
                     - normed * (scaled * normed).mean(-1, keep_dims=True))
        axes = tuple(range(len(x.shape) - 1))
        return dx, (dout * normed).sum(axes), dout.sum(axes), ops.zeros_like(config)
    return bprop


def _geglu_bprop(x, out, dout):
    # y = h GELU(g): dh = dout GELU(g); dg = dout h GELU'(g), GELU'(g) = Phi(g) + g phi(g).
    h, gate = ops.chunk(x, 2, axis=-1)
    cdf = 0.5 * (1.0 + ops.erf(gate * 0.7071067811865476))
    pdf = ops.exp(-0.5 * gate * gate) * 0.3989422804014327
    return (ops.cat((dout * gate * cdf, dout * h * (cdf + gate * pdf)), axis=-1),)


def _same_as_x(x, *others):
    return x


def _half_of_last_axis(shape):
    return list(shape[:-1]) + [shape[-1] // 2]


def group_norm(num_groups: int, eps: float, silu: bool = False) -> Optional[ops.Custom]:
    """The kernel as an op ``(x, gamma, beta, config) -> y`` with ``config = [num_groups, eps, silu]``
    (float32; ``silu`` 1 applies SiLU to the output, as the op's bprop assumes), or None when
    :func:`library` is unavailable."""
    if library() is None:
        return None
    return _op("GroupNormForward", _same_as_x, _group_norm_bprop(num_groups, eps, silu), (num_groups, eps, silu))


def layer_norm(eps: float) -> Optional[ops.Custom]:
    """The kernel as an op ``(x, gamma, beta, config) -> y`` over the last axis, ``config = [eps]``."""
    if library() is None:
        return None
    return _op("LayerNormForward", _same_as_x, _layer_norm_bprop(eps), (eps,))


def geglu() -> Optional[ops.Custom]:
    """The kernel as an op ``x (*, 2F) -> x[..., :F] * GELU(x[..., F:])`` (exact GELU; float32)."""
    if library() is None:
        return None
    return _op("GegluForward", _half_of_last_axis, _geglu_bprop)


@contextmanager
def portable(*cells: nn.Cell) -> Iterator[None]:
    """Within the block, every cell under ``cells`` uses MindSpore's kernels (for a MindIR export); restored
    after."""
    users = [cell for root in cells for _, cell in root.cells_and_names() if hasattr(cell, "use_cpu_kernel")]
    saved = [cell.use_cpu_kernel for cell in users]
    for cell in users:
        cell.use_cpu_kernel = False
    try:
        yield
    finally:
        for cell, value in zip(users, saved):
            cell.use_cpu_kernel = value
