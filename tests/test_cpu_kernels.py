"""The CPU norm kernels (models/kernels/norms.cc through models/cpu_kernels.py): the values and gradients of
MindSpore's own GroupNorm/LayerNorm kernels, used only by cells that are not training, built once per cache
folder, and a fallback to MindSpore's kernels when turned off or when the build fails."""
import os
import stat

import numpy as np
import pytest
from mindspore import ParameterTuple, Tensor, nn, ops

from pangu_draw_ms.models import cpu_kernels
from pangu_draw_ms.models.layers import GroupNorm, LayerNorm

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
    (lambda: LayerNorm(64, 1e-5), (2, 10, 64)),
    (lambda: LayerNorm(77, 1e-6), (3, 77)),
    (lambda: LayerNorm(1280, 1e-5), (1, 5, 1280)),
]


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
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]().__class__.__name__}{c[1]}" for c in CASES])
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
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=["group-4d", "group-3d", "layer-2d"])
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
    assert os.listdir(os.path.dirname(path)) == ["norms.so"]  # no partial build left behind


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
