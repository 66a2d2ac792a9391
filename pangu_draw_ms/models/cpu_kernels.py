"""GroupNorm (with an optional fused SiLU), LayerNorm and GEGLU as hand-written CPU kernels
(``kernels/cpu_kernels.cc``), for models/layers.py.

Why: MindSpore 2.9's own CPU kernels for the two normalisations take 6-19x torch's time, 3-16x ours
(``bench/cpu_kernels.py``), and were about a third of a tiny UNet forward here (leaving the norms out took
it from 100 to 65 ms; bench/README.md); its exact GELU is five kernels (div, erf, add, mul, mul), its Erf
alone 0.3 ms on a tiny UNet's feed-forward. The C++ source is compiled once per machine with the system's
C++ compiler (``$CXX``, else ``g++``/``c++``) into ``$XDG_CACHE_HOME/pangu_draw_ms/kernels/<hash>/`` and
loaded with ``ops.Custom(func_type="aot")``, which runs in GRAPH_MODE and PYNATIVE_MODE alike.

Gradients: each op carries a bprop written with MindSpore ops (the normalisation's standard backward), so
gradients flow through cells that use it. The layers use the kernels only in cells that are not training
(``set_train(False)``: inference, and frozen networks that gradients pass through), so a trained cell's
forward and backward stay MindSpore's own kernels.

Off switch: ``PANGU_DRAW_CPU_KERNELS=0``. Without a compiler, or if the build fails, the layers use
MindSpore's kernels (one log line says why). Exported MindIR graphs never contain these ops
(:func:`portable`): a graph for another machine cannot point at a library in this one's cache.
"""
from __future__ import annotations

import functools
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

from pangu_draw_ms.runtime import cache_home

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "cpu_kernels.cc")
# No -march (the library may sit on a shared home; cpu_kernels.cc clones its loops per CPU instead); no trapping
# math: lets the compiler vectorise the branch-free exp of the fused SiLU (results unchanged: no FP traps are on).
COMPILE_FLAGS = ("-O3", "-std=c++14", "-fno-trapping-math", "-shared", "-fPIC")
_log = logging.getLogger(__name__)


def enabled(environ=os.environ) -> bool:
    """False when ``PANGU_DRAW_CPU_KERNELS=0`` turns the kernels off."""
    return environ.get("PANGU_DRAW_CPU_KERNELS", "1") != "0"


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
    folder = os.path.join(cache_home(), "pangu_draw_ms", "kernels", key)
    path = os.path.join(folder, "cpu_kernels.so")
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        # Build beside the final name and rename: concurrent processes (msrun workers, test workers) each
        # build their own copy and the last rename wins; no process ever loads a half-written library.
        handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(handle)
        try:
            subprocess.run([compiler, *COMPILE_FLAGS, "-o", partial, SOURCE], check=True, capture_output=True,
                           timeout=300)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        _log.warning("building the CPU kernels failed (%s%s); using MindSpore's kernels",
                     error, (": " + detail.decode(errors="replace")[-500:]) if detail else "")
        return None
    return path


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
    path = library()
    if path is None:
        return None
    return ops.Custom(f"{path}:GroupNormForward", out_shape=_same_as_x, out_dtype=_same_as_x, func_type="aot",
                      bprop=_group_norm_bprop(num_groups, eps, silu))


def layer_norm(eps: float) -> Optional[ops.Custom]:
    """The kernel as an op ``(x, gamma, beta, config) -> y`` over the last axis, ``config = [eps]``."""
    path = library()
    if path is None:
        return None
    return ops.Custom(f"{path}:LayerNormForward", out_shape=_same_as_x, out_dtype=_same_as_x, func_type="aot",
                      bprop=_layer_norm_bprop(eps))


def geglu() -> Optional[ops.Custom]:
    """The kernel as an op ``x (*, 2F) -> x[..., :F] * GELU(x[..., F:])`` (exact GELU; float32)."""
    path = library()
    if path is None:
        return None
    return ops.Custom(f"{path}:GegluForward", out_shape=_half_of_last_axis, out_dtype=_same_as_x, func_type="aot",
                      bprop=_geglu_bprop)


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
