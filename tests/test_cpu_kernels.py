"""The CPU kernels (models/kernels/cpu_kernels.cc through models/cpu_kernels.py): the values and gradients of
MindSpore's own GroupNorm/LayerNorm kernels (and of GroupNorm then SiLU for the fused kernel, and of split +
GELU + product for GEGLU), used only by cells that are not training, built once per cache
folder, and a fallback to MindSpore's kernels when turned off or when the build fails."""
import math
import os
import stat

import numpy as np
import pytest
from mindspore import ParameterTuple, Tensor, nn, ops

from pangu_draw_ms.models import cpu_kernels
from pangu_draw_ms.models.layers import GEGLU, GroupNorm, LayerNorm

needs_library = pytest.mark.skipif(cpu_kernels.library() is None,
                                   reason="no C++ compiler here: the layers use MindSpore's kernels")

# (cell, input shape): 3-D to 5-D inputs, group and row lengths that are not multiples of the kernel's 16
# accumulator lanes, and a group longer than its 2048-element summation block.
CASES = [
    (lambda: GroupNorm(32, 64), (2, 64, 8, 8)),
    (lambda: GroupNorm(32, 320, eps=1e-6), (2, 320, 5, 7)),
    (lambda: GroupNorm(4, 8), (3, 8, 17)),
    (lambda: GroupNorm(2, 4), (1, 4, 3, 3, 3)),
    (lambda: GroupNorm(1, 16), (1, 16, 24, 24)),
    (lambda: GroupNorm(32, 64, activation="silu"), (2, 64, 8, 8)),
    (lambda: GroupNorm(4, 8, eps=1e-6, activation="silu"), (3, 8, 17)),
    (lambda: LayerNorm(64, 1e-5), (2, 10, 64)),
    (lambda: LayerNorm(77, 1e-6), (3, 77)),
    (lambda: LayerNorm(1280, 1e-5), (1, 5, 1280)),
]


def _case_id(case):
    cell = case[0]()
    return f"{cell.__class__.__name__}{'+SiLU' if getattr(cell, 'silu', False) else ''}{case[1]}"


def _cell_and_input(case, rng):
    build, shape = case
    cell = build()
    width = cell.gamma.shape[0]
    cell.gamma.set_data(Tensor(1.0 + 0.3 * rng.standard_normal(width).astype(np.float32)))
    cell.beta.set_data(Tensor(0.3 * rng.standard_normal(width).astype(np.float32)))
    # Far from zero mean: the centred second pass must not lose the variance to cancellation.
    x = (100.0 + 3.0 * rng.standard_normal(shape)).astype(np.float32)
    return cell, Tensor(x)


@needs_library
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_values_are_mindspores_kernels(case, ms_mode):
    cell, x = _cell_and_input(case, np.random.default_rng(0))
    assert cell.use_cpu_kernel and not cell.training
    ours = cell(x).asnumpy()
    cell.use_cpu_kernel = False
    np.testing.assert_allclose(ours, cell(x).asnumpy(), rtol=1e-5, atol=2e-5)


class _Loss(nn.Cell):
    def __init__(self, norm, weight):
        super().__init__()
        self.norm = norm
        self.weight = Tensor(weight)

    def construct(self, x):
        return (self.norm(x) * self.weight).sum()


class _Gradients(nn.Cell):
    """d loss / d (x, gamma, beta) through a cell that is not training (a frozen network's norm)."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss
        self.params = ParameterTuple(loss.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, x):
        return self.grad(self.loss, self.params)(x)


@needs_library
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6], CASES[8]],
                         ids=["group-4d", "group-3d", "group-3d+SiLU", "layer-2d"])
def test_gradients_are_mindspores_kernels(case, ms_mode):
    rng = np.random.default_rng(1)
    cell, x = _cell_and_input(case, rng)
    gradients = _Gradients(_Loss(cell, rng.standard_normal(x.shape).astype(np.float32)))
    (dx,), (dgamma, dbeta) = gradients(x)
    cell.use_cpu_kernel = False
    (reference_dx,), (reference_dgamma, reference_dbeta) = _Gradients(gradients.loss)(x)
    for ours, reference in ((dx, reference_dx), (dgamma, reference_dgamma), (dbeta, reference_dbeta)):
        reference = reference.asnumpy()
        np.testing.assert_allclose(ours.asnumpy(), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@needs_library
@pytest.mark.parametrize("shape", [(2, 10, 16), (3, 40)])
def test_geglu_values_and_gradients_are_mindspores(shape, ms_mode):
    rng = np.random.default_rng(5)
    geglu = GEGLU(shape[-1], 24)  # proj: PyTorch's init; inputs of std 3 put gates in GELU's negative tail too
    x = Tensor(3.0 * rng.standard_normal(shape).astype(np.float32))
    assert geglu.use_cpu_kernel and not geglu.training
    ours = geglu(x).asnumpy()
    gradients = _Gradients(_Loss(geglu, rng.standard_normal(ours.shape).astype(np.float32)))
    (dx,), (dweight, dbias) = gradients(x)
    geglu.use_cpu_kernel = False
    np.testing.assert_allclose(ours, geglu(x).asnumpy(), rtol=1e-5, atol=1e-6)
    (reference_dx,), (reference_dweight, reference_dbias) = _Gradients(gradients.loss)(x)
    for grad, reference in ((dx, reference_dx), (dweight, reference_dweight), (dbias, reference_dbias)):
        reference = reference.asnumpy()
        np.testing.assert_allclose(grad.asnumpy(), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@needs_library
def test_the_geglu_kernels_gelu_keeps_its_relative_accuracy_in_the_tail():
    """GELU(g) = g Phi(g) from g = -12.5 (values near 5e-35) to 13: the kernel's erfc keeps the relative accuracy
    that 1 + erf(g / sqrt2) loses in float: within 1e-6 from g = -3 on, 2e-5 in the far tail (where the float
    rounding of the exponent g^2 / 2 ~ 80 is the limit)."""
    gate = np.linspace(-12.5, 13.0, 1021)
    x = Tensor(np.concatenate([np.ones_like(gate), gate])[None].astype(np.float32))
    ours = cpu_kernels.geglu()(x).asnumpy()[0].astype(np.float64)
    gate = gate.astype(np.float32).astype(np.float64)
    exact = gate * np.array([0.5 * math.erfc(-g / math.sqrt(2.0)) for g in gate])
    np.testing.assert_allclose(ours, exact, rtol=2e-5, atol=1e-37)
    np.testing.assert_allclose(ours[gate >= -3], exact[gate >= -3], rtol=1e-6)


@needs_library
def test_the_fused_silu_over_its_whole_range(ms_mode):
    """SiLU after the norm uses the kernel's own exp (clamped to float's range): each channel is its own group
    with a tiny gamma, so its output is SiLU(beta + ~0) for betas from -100 to 100 (exp(-z) over- and
    underflows at the ends); they equal MindSpore's SiLU to float rounding."""
    channels = 401
    norm = GroupNorm(channels, channels, activation="silu")
    norm.gamma.set_data(Tensor(np.full(channels, 1e-3, np.float32)))
    norm.beta.set_data(Tensor(np.linspace(-100.0, 100.0, channels, dtype=np.float32)))
    x = Tensor(np.random.default_rng(4).standard_normal((2, channels, 16)).astype(np.float32))
    ours = norm(x).asnumpy()
    norm.use_cpu_kernel = False
    np.testing.assert_allclose(ours, norm(x).asnumpy(), rtol=1e-5, atol=1e-12)
    assert np.isfinite(ours).all() and ours.min() < -0.27 and ours.max() > 99.9


@needs_library
def test_a_training_cell_uses_mindspores_kernels():
    """The kernels serve cells that are not training; a trained cell's forward (and so its backward) stays
    MindSpore's GroupNorm/LayerNorm."""
    cell, x = _cell_and_input(CASES[0], np.random.default_rng(2))
    calls = []
    kernel = cell.cpu_kernel

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    cell.cpu_kernel = counted
    cell.set_train(True)
    cell(x)
    assert calls == []
    cell.set_train(False)
    cell(x)
    assert calls == [1]


@pytest.fixture
def fresh_library():
    """library() resolved anew in the test and again after it (its result is cached per process)."""
    cpu_kernels.library.cache_clear()
    yield cpu_kernels.library
    cpu_kernels.library.cache_clear()


@needs_library
def test_the_library_is_built_once_into_the_cache_folder(tmp_path, monkeypatch, fresh_library):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = fresh_library()
    assert path.startswith(str(tmp_path / "pangu_draw_ms" / "kernels")) and os.path.isfile(path)
    built = os.stat(path).st_mtime_ns
    fresh_library.cache_clear()
    assert fresh_library() == path and os.stat(path).st_mtime_ns == built  # read back, not rebuilt
    assert os.listdir(os.path.dirname(path)) == ["cpu_kernels.so"]  # no partial build left behind


def test_turned_off_or_without_a_working_compiler_the_layers_use_mindspores_kernels(tmp_path, monkeypatch,
                                                                                     fresh_library, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PANGU_DRAW_CPU_KERNELS", "0")
    assert fresh_library() is None
    norm = GroupNorm(2, 4)
    assert norm.cpu_kernel is None and not norm.use_cpu_kernel
    x = Tensor(np.random.default_rng(3).standard_normal((1, 4, 3, 3)).astype(np.float32))
    np.testing.assert_allclose(norm(x).asnumpy(), ops.group_norm(x, 2, norm.gamma, norm.beta, 1e-5).asnumpy())

    monkeypatch.delenv("PANGU_DRAW_CPU_KERNELS")
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'this compiler is broken' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(broken))
    fresh_library.cache_clear()
    assert fresh_library() is None and LayerNorm(8, 1e-5).cpu_kernel is None
    assert "this compiler is broken" in caplog.text
    folder = tmp_path / "pangu_draw_ms" / "kernels"
    assert not [f for _, _, files in os.walk(folder) for f in files]  # the failed build left nothing

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    fresh_library.cache_clear()
    assert fresh_library() is None
