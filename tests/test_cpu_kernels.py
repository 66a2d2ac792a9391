"""The CPU kernels (models/kernels/cpu_kernels.cc through models/cpu_kernels.py): the values and gradients of
MindSpore's own GroupNorm/LayerNorm kernels (and of GroupNorm then SiLU for the fused kernel, of split +
GELU + product for GEGLU, of Conv2D + bias for the convolution and of MatMul + bias for the dense layer), used
only by cells that are not training, built once per cache folder, and a fallback to MindSpore's kernels when
turned off or when the build fails."""
import ctypes
import math
import os
import stat

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from pangu_draw_ms import runtime
from pangu_draw_ms.config import load_config
from pangu_draw_ms.io.layouts import build_component
from pangu_draw_ms.models import cpu_kernels
from pangu_draw_ms.models.layers import GEGLU, Conv2d, Dense, GroupNorm, LayerNorm, ScaledDotProductAttention
from pangu_draw_ms.models.lora import add_lora_adapters
from pangu_draw_ms.models.unet import BasicTransformerBlock, ResBlock, SpatialTransformer
from pangu_draw_ms.models.vae import ResnetBlock

needs_library = pytest.mark.skipif(cpu_kernels.library() is None,
                                   reason="no C++ compiler here: the layers use MindSpore's kernels")
needs_avx512 = pytest.mark.skipif(not cpu_kernels.avx512(),
                                  reason="no AVX-512 (or no library) here: Conv2d and Dense use MindSpore's kernels")

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
    np.testing.assert_allclose(ours, _Call(cell)(x).asnumpy(), rtol=1e-5, atol=2e-5)


class _Call(nn.Cell):
    """A new top-level cell around ``cell``. In GRAPH_MODE a cell called again runs the graph of its first call:
    a ``use_cpu_kernel`` changed since would go unseen (checked), so each reference call compiles anew."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, *args):
        return self.cell(*args)


def _assert_the_kernel_matches_mindspores(cell, *inputs):
    """``cell`` through its CPU kernel, then through MindSpore's ops (compiled anew: ``_Call``): same shape,
    values within float rounding (1e-5 relative to the largest output)."""
    assert cell.use_cpu_kernel and not cell.training
    ours = cell(*inputs).asnumpy()
    cell.use_cpu_kernel = False
    reference = _Call(cell)(*inputs).asnumpy()
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def _count_kernel_calls(cell, name: str = "cpu_kernel") -> list:
    """Wrap ``cell``'s CPU kernel (its attribute ``name``) so that each call (each trace, in GRAPH_MODE) appends to
    the returned list."""
    calls = []
    kernel = getattr(cell, name)

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    setattr(cell, name, counted)
    return calls


class _Loss(nn.Cell):
    def __init__(self, norm, weight):
        super().__init__()
        self.norm = norm
        self.weight = Tensor(weight)

    def construct(self, x):
        return (self.norm(x) * self.weight).sum()


class _Gradients(nn.Cell):
    """d loss / d (its inputs, its parameters) through cells that are not training (a frozen network's layers)."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss
        self.params = ParameterTuple(loss.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, *inputs):
        return self.grad(self.loss, self.params)(*inputs)


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


class _TwoConfigurations(nn.Cell):
    """Two kernels of each kind with different constants: GroupNorm without and with SiLU (other eps and groups), a
    3x3 and a 1x1 convolution."""

    def __init__(self):
        super().__init__()
        self.norm = GroupNorm(2, 8, eps=1e-6)
        self.norm_silu = GroupNorm(4, 8, eps=1e-5, activation="silu")
        self.conv3x3 = Conv2d(8, 8, 3, padding=1)
        self.conv1x1 = Conv2d(8, 6, 1)

    def construct(self, x):
        return self.conv1x1(self.conv3x3(self.norm_silu(3.0 * self.norm(x))))


@needs_avx512
def test_gradients_through_kernels_of_two_configurations_in_one_graph_are_mindspores(ms_mode):
    """Each op's bprop is its own configuration's: MindSpore 2.9's GRAPH_MODE gave every op of one kernel the first
    one's bprop (the input gradient off by up to half its largest value; the convolutions did not compile)."""
    rng = np.random.default_rng(6)
    net = _TwoConfigurations()
    net.set_train(False)
    x = Tensor(rng.standard_normal((2, 8, 6, 5)).astype(np.float32))
    gradients = _Gradients(_Loss(net, rng.standard_normal((2, 6, 6, 5)).astype(np.float32)))
    ours_inputs, ours_params = gradients(x)
    for _, cell in net.cells_and_names():
        if hasattr(cell, "use_cpu_kernel"):
            cell.use_cpu_kernel = False
    reference_inputs, reference_params = _Gradients(gradients.loss)(x)
    for grad, reference in zip(ours_inputs + ours_params, reference_inputs + reference_params):
        reference = reference.asnumpy()
        np.testing.assert_allclose(grad.asnumpy(), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


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
    np.testing.assert_allclose(ours, _Call(geglu)(x).asnumpy(), rtol=1e-5, atol=1e-6)
    (reference_dx,), (reference_dweight, reference_dbias) = _Gradients(gradients.loss)(x)
    for grad, reference in ((dx, reference_dx), (dweight, reference_dweight), (dbias, reference_dbias)):
        reference = reference.asnumpy()
        np.testing.assert_allclose(grad.asnumpy(), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def kernel_threads(request):
    """The package's kernel threads for the test (the convolution and the dense layer share their blocks among
    them from 30 MFLOP), restored after."""
    saved = runtime.cpu_threads()
    runtime.set_cpu_threads(request.param)
    yield request.param
    runtime.set_cpu_threads(saved)


# (in, out, kernel, padding, input shape): 3x3 and 1x1 as in the UNet/VAE, a "valid" convolution, a 5x5; output
# channels that are not a multiple of the kernel's 8-channel blocks, widths not a multiple of its 16-float
# vectors, and 512 channels x 62 columns, whose padded input exceeds the 1 MB band: four bands of output rows
# (with 91 MFLOP, shared among threads by output channels); 5 images of 35 MFLOP, shared among threads by images.
CONV_CASES = [(16, 20, 3, 1, (2, 16, 9, 13)), (3, 5, 3, 0, (1, 3, 5, 6)), (8, 12, 1, 0, (1, 8, 7, 7)),
              (6, 4, 5, 2, (2, 6, 11, 4)), (512, 8, 3, 1, (1, 512, 20, 62)), (32, 48, 3, 1, (5, 32, 16, 16))]


@needs_avx512
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"{c[0]}-{c[1]}-k{c[2]}p{c[3]}-{c[4]}" for c in CONV_CASES])
def test_the_convolution_is_mindspores(case, kernel_threads, ms_mode):
    in_channels, out_channels, kernel, padding, shape = case
    x = Tensor(np.random.default_rng(6).standard_normal(shape).astype(np.float32))
    _assert_the_kernel_matches_mindspores(Conv2d(in_channels, out_channels, kernel, padding=padding), x)


@needs_avx512
def test_strided_and_bias_free_convolutions():
    """Stride 2 (the UNet/VAE downsamplers) stays MindSpore's convolution; one without a bias adds none."""
    assert Conv2d(4, 4, 3, stride=2, padding=1).cpu_kernel is None
    x = Tensor(np.random.default_rng(7).standard_normal((1, 4, 5, 5)).astype(np.float32))
    _assert_the_kernel_matches_mindspores(Conv2d(4, 6, 3, padding=1, bias=False), x)


# (in, out, bias, input shape): odd sizes, no bias, one input feature, and 3000 rows (75 MFLOP: shared among
# threads).
DENSE_CASES = [(37, 29, True, (3, 5, 37)), (64, 100, False, (7, 64)), (96, 130, True, (3000, 96)),
               (2, 1, True, (1, 2))]


@needs_avx512
@pytest.mark.parametrize("case", DENSE_CASES, ids=[f"{c[0]}-{c[1]}-{'bias' if c[2] else 'nobias'}-{c[3]}"
                                                   for c in DENSE_CASES])
def test_the_dense_layer_is_mindspores(case, kernel_threads, ms_mode):
    in_features, out_features, bias, shape = case
    x = Tensor(np.random.default_rng(8).standard_normal(shape).astype(np.float32))
    _assert_the_kernel_matches_mindspores(Dense(in_features, out_features, bias=bias), x)


@needs_avx512
@pytest.mark.parametrize("build, shape", [(lambda: Dense(12, 9), (2, 3, 12)),
                                          (lambda: Conv2d(5, 7, 3, padding=1), (1, 5, 6, 6)),
                                          (lambda: GroupNorm(2, 4, activation="silu"), (1, 4, 3, 3))],
                         ids=["Dense", "Conv2d", "GroupNorm"])
def test_parameters_stored_in_fp16_reach_the_kernels_as_float32(build, shape, ms_mode):
    """``weights_dtype="fp16"`` stores parameters in fp16 with float32 compute: the kernels (which read float32)
    get them cast, as MindSpore's path does."""
    cell = build()
    for param in cell.get_parameters():
        param.set_dtype(ms.float16)
    x = Tensor(np.random.default_rng(12).standard_normal(shape).astype(np.float32))
    _assert_the_kernel_matches_mindspores(cell, x)


@needs_avx512
def test_a_kernel_given_other_than_float32_refuses_instead_of_misreading_it():
    x, w, b = (Tensor(np.ones(shape, np.float16)) for shape in ((2, 3), (4, 3), (4,)))
    with pytest.raises(RuntimeError, match="DenseForward.*is 5"):
        cpu_kernels.dense()(x, w, b).asnumpy()


@needs_avx512
def test_the_dense_kernel_runs_a_second_onednn_at_the_full_isa():
    """Dense's GEMM is oneDNN's, from a copy of MindSpore's library in the kernel cache: a second instance, at the
    CPU's full ISA, while MindSpore's own oneDNN keeps the package's AVX2 cap (which its 3x3 convolutions need;
    tests/conftest.py lifted the variable only after MindSpore's first convolution had read it)."""
    import mindspore

    assert cpu_kernels.dense() is not None
    copy = cpu_kernels._onednn_copy()
    assert copy.startswith(os.path.join(runtime.cache_home(), "pangu_draw_ms", "onednn"))
    lib = os.path.join(os.path.dirname(mindspore.__file__), "lib")
    own = ctypes.CDLL(os.path.join(lib, next(f for f in sorted(os.listdir(lib)) if f.startswith("libdnnl.so"))))
    avx2 = 0x7  # dnnl_cpu_isa_avx2; the AVX-512 levels are larger bit sets
    assert own.dnnl_get_effective_cpu_isa() == avx2
    assert ctypes.CDLL(copy).dnnl_get_effective_cpu_isa() > avx2  # the same file: the instance the kernel uses


@needs_avx512
@pytest.mark.parametrize("build, shape", [(lambda: Conv2d(5, 7, 3, padding=1), (2, 5, 6, 9)),
                                          (lambda: Conv2d(4, 3, 1), (1, 4, 5, 5)),
                                          (lambda: Dense(12, 9), (2, 3, 12))],
                         ids=["conv3x3", "conv1x1", "dense"])
def test_convolution_and_dense_gradients_are_mindspores(build, shape, ms_mode):
    """Through a cell that is not training (a frozen network): d loss / d (x, weight, bias)."""
    rng = np.random.default_rng(9)
    cell = build()
    x = Tensor(rng.standard_normal(shape).astype(np.float32))
    assert cell.use_cpu_kernel
    gradients = _Gradients(_Loss(cell, rng.standard_normal(cell(x).shape).astype(np.float32)))
    (dx,), (dweight, dbias) = gradients(x)
    cell.use_cpu_kernel = False
    (reference_dx,), (reference_dweight, reference_dbias) = _Gradients(gradients.loss)(x)
    for grad, reference in ((dx, reference_dx), (dweight, reference_dweight), (dbias, reference_dbias)):
        reference = reference.asnumpy()
        np.testing.assert_allclose(grad.asnumpy(), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


class _AttentionLoss(nn.Cell):
    def __init__(self, attention, weight):
        super().__init__()
        self.attention = attention
        self.weight = Tensor(weight)

    def construct(self, q, k, v):
        return (self.attention(q, k, v) * self.weight).sum()


class _InputGradients(nn.Cell):
    def __init__(self, loss):
        super().__init__()
        self.loss = loss
        self.grad = ops.GradOperation(get_all=True)

    def construct(self, q, k, v):
        return self.grad(self.loss)(q, k, v)


# (heads, head dim, batch, queries, keys): the UNets' self- and cross-attention (77 keys), head sizes that are not
# whole 16-float vectors (40, 8) or span several 48-float tiles (112), query counts that are not whole 8-row
# blocks, one key, and 600 queries (x 600 keys: shared among threads).
ATTENTION_CASES = [(2, 16, 2, 64, 64), (4, 40, 1, 19, 77), (1, 112, 2, 13, 30), (3, 8, 1, 5, 1),
                   (2, 32, 1, 600, 600)]


@needs_avx512
@pytest.mark.parametrize("case", ATTENTION_CASES,
                         ids=[f"h{c[0]}d{c[1]}-b{c[2]}-{c[3]}x{c[4]}" for c in ATTENTION_CASES])
def test_attention_is_the_batched_matmul_softmax(case, kernel_threads, ms_mode):
    heads, dim, batch, queries, keys = case
    rng = np.random.default_rng(10)
    q, k, v = (Tensor(2.0 * rng.standard_normal((batch, length, heads * dim)).astype(np.float32))
               for length in (queries, keys, keys))
    _assert_the_kernel_matches_mindspores(ScaledDotProductAttention(heads, dim), q, k, v)


@needs_avx512
def test_attention_gradients_and_a_mask(ms_mode):
    """Gradients through a frozen attention equal MindSpore's; with a mask the layer keeps its own path."""
    rng = np.random.default_rng(11)
    attention = ScaledDotProductAttention(2, 8)
    q, k, v = (Tensor(rng.standard_normal((2, length, 16)).astype(np.float32)) for length in (5, 7, 7))
    gradients = _InputGradients(_AttentionLoss(attention, rng.standard_normal((2, 5, 16)).astype(np.float32)))
    ours = [g.asnumpy() for g in gradients(q, k, v)]
    attention.use_cpu_kernel = False
    for grad, reference in zip(ours, _InputGradients(gradients.loss)(q, k, v)):
        reference = reference.asnumpy()
        np.testing.assert_allclose(grad, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    attention.use_cpu_kernel = True
    mask = Tensor(np.where(np.arange(7) < 4, 0.0, -1e9).astype(np.float32))
    calls = _count_kernel_calls(attention)
    masked = attention(q, k, v, mask).asnumpy()
    assert calls == []
    np.testing.assert_allclose(masked, attention(q, k[:, :4], v[:, :4]).asnumpy(), rtol=1e-5, atol=1e-6)
    # float16 inputs to a float32 attention: cast by its own path (not handed to the float32-only kernel).
    calls = _count_kernel_calls(attention)
    half = attention(*(x.astype(ms.float16) for x in (q, k, v)))
    assert calls == [] and half.dtype == ms.float32
    reference = attention(*(x.astype(ms.float16).astype(ms.float32) for x in (q, k, v))).asnumpy()
    np.testing.assert_allclose(half.asnumpy(), reference, rtol=1e-5, atol=1e-6)


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
    np.testing.assert_allclose(ours, _Call(norm)(x).asnumpy(), rtol=1e-5, atol=1e-12)
    assert np.isfinite(ours).all() and ours.min() < -0.27 and ours.max() > 99.9


@needs_library
@pytest.mark.parametrize("build, shape", [
    pytest.param(lambda: GroupNorm(32, 64), (2, 64, 8, 8), id="GroupNorm"),
    pytest.param(lambda: Conv2d(3, 4, 3, padding=1), (1, 3, 4, 4), id="Conv2d", marks=needs_avx512),
    pytest.param(lambda: Dense(6, 5), (2, 6), id="Dense", marks=needs_avx512)])
def test_a_training_cell_uses_mindspores_kernels(build, shape):
    """The kernels serve cells that are not training; a trained cell's forward (and so its backward) stays
    MindSpore's own."""
    cell = build()
    x = Tensor(np.random.default_rng(2).standard_normal(shape).astype(np.float32))
    calls = _count_kernel_calls(cell)
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


def _random_parameters(block, rng):
    block.set_train(False)
    for param in block.get_parameters():
        base = 1.0 if param.name.endswith("gamma") else 0.0
        param.set_data(Tensor((base + 0.2 * rng.standard_normal(param.shape)).astype(np.float32)))
    return block


def _transformer_block(rng, dim=64, context_dim=48, heads=4):
    return _random_parameters(BasicTransformerBlock(dim, context_dim, heads, dim // heads, 4, 0.0, ms.float32), rng)


def _res_block(rng, channels, out_channels, emb_channels=40, groups=8):
    return _random_parameters(ResBlock(channels, emb_channels, out_channels, groups, 0.0, ms.float32), rng)


# A case: (id, block, input shapes, how close to its layers). A transformer block shared among threads by images gives
# oneDNN's GEMM each image's rows alone, which it may round otherwise than all the rows at once (1e-6 relative); a
# ResBlock's convolutions compute each image alike however the batch is shared.
def _transformer_case(batch, tokens, context_tokens):
    return (f"transformer-b{batch}-{tokens}x{context_tokens}", lambda rng: _transformer_block(rng),
            [(batch, tokens, 64), (batch, context_tokens, 48)], 1e-5)


def _spatial_transformer(rng, channels):
    return _random_parameters(SpatialTransformer(channels, 2, channels // 2, 1, 48, load_config("demo").unet,
                                                 ms.float32), rng)


def _spatial_case(batch, channels, height, width):
    return (f"spatial-b{batch}-{channels}-{height}x{width}", lambda rng: _spatial_transformer(rng, channels),
            [(batch, channels, height, width), (batch, 11, 48)], 1e-5)


def _vae_case(batch, channels, out_channels, height, width):
    return (f"vae-b{batch}-{channels}to{out_channels}-{height}x{width}",
            lambda rng: _random_parameters(ResnetBlock(channels, out_channels, 8, ms.float32), rng),
            [(batch, channels, height, width)], 0.0)


def _res_case(batch, channels, out_channels, height, width):
    return (f"res-b{batch}-{channels}to{out_channels}-{height}x{width}",
            lambda rng: _res_block(rng, channels, out_channels), [(batch, channels, height, width), (batch, 40)], 0.0)


# (id, block, input shapes). Transformer: token counts that are not whole 8-row blocks; one image of 600 tokens, whose
# feed-forward and attention are shared among threads (above 30 MFLOP); 3 images of 256 tokens, the block shared among
# threads by images (above 10 MFLOP). ResBlock: the input as the skip (2 images, below 10 MFLOP: one thread), a skip
# convolution on an odd-sized image, 8 and 3 images shared by images (3: unevenly), one image whose convolutions are
# shared. SpatialTransformer (its way in and out as two ops around its transformer block): 2 images, an odd-sized one,
# a batch of 8. The VAE's ResnetBlock (the ResBlock's op without an embedding): a full-size image, a batch of 4 with a
# shortcut, an odd-sized one.
BLOCK_CASES = [_transformer_case(2, 37, 11), _transformer_case(1, 16, 77), _transformer_case(1, 600, 5),
               _transformer_case(3, 256, 77), _res_case(2, 16, 16, 8, 8), _res_case(1, 16, 48, 5, 7),
               _res_case(8, 64, 32, 8, 8), _res_case(3, 32, 32, 24, 24), _res_case(1, 64, 64, 40, 40),
               _spatial_case(2, 64, 8, 8), _spatial_case(1, 32, 5, 7), _spatial_case(8, 64, 16, 16),
               _vae_case(1, 16, 16, 64, 64), _vae_case(4, 32, 16, 32, 32), _vae_case(2, 16, 32, 5, 7)]


def _count_block_kernel_calls(block) -> list:
    """The calls of a block's kernel (a SpatialTransformer's way out)."""
    return _count_kernel_calls(block, "tokens_out" if isinstance(block, SpatialTransformer) else "cpu_kernel")


def _block_and_inputs(case, rng):
    _, build, shapes, _ = case
    block = build(rng)
    return block, [Tensor(rng.standard_normal(shape).astype(np.float32)) for shape in shapes]


@needs_avx512
@pytest.mark.parametrize("case", BLOCK_CASES, ids=[c[0] for c in BLOCK_CASES])
def test_a_unet_block_is_one_kernel_equal_to_its_layers(case, kernel_threads, ms_mode):
    """The UNet's transformer block and ResBlock as one op each (what the released UNet's compile time needed): the
    kernels of their layers in their order, so the layers' floats (bit for bit where ``case`` says 0)."""
    _assert_the_block_is_its_layers(case, ms_mode)


# More threads than images: a block of 19 MFLOP shared by images, larger ones (0.3 and 0.9 GFLOP) run whole with each
# of their kernels shared by all the threads.
MANY_THREAD_CASES = [_res_case(2, 32, 32, 16, 16), _res_case(2, 64, 64, 32, 32), _transformer_case(2, 1024, 77)]


@needs_avx512
@pytest.mark.parametrize("kernel_threads", [4], indirect=True)
@pytest.mark.parametrize("case", MANY_THREAD_CASES, ids=[c[0] for c in MANY_THREAD_CASES])
def test_a_unet_block_with_more_threads_than_images_is_its_layers(case, kernel_threads, ms_mode):
    _assert_the_block_is_its_layers(case, ms_mode)


def _assert_the_block_is_its_layers(case, ms_mode):
    block, inputs = _block_and_inputs(case, np.random.default_rng(12))
    assert block.fused
    calls = _count_block_kernel_calls(block)
    ours = block(*inputs).asnumpy()
    assert calls == [1] or ms_mode == "graph"  # (GRAPH_MODE compiles the wrapper into the graph: counted eagerly only)
    block.use_cpu_kernel = False
    assert not block.fused
    reference = _Call(block)(*inputs).asnumpy()
    rtol = case[3]
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


class _BlockLoss(nn.Cell):
    def __init__(self, block, weight):
        super().__init__()
        self.block = block
        self.weight = Tensor(weight)

    def construct(self, *inputs):
        return (self.block(*inputs) * self.weight).sum()


# (case, the number of parameters): a transformer block, ResBlocks with and without a skip convolution, a
# SpatialTransformer (its norm and projections, and its transformer block's), VAE ResnetBlocks with and without a
# shortcut.
GRADIENT_CASES = [(_transformer_case(2, 9, 6), 20), (_res_case(2, 16, 24, 6, 5), 12), (_res_case(2, 16, 16, 6, 5), 10),
                  (_spatial_case(2, 32, 6, 5), 26), (_vae_case(2, 16, 24, 6, 5), 10), (_vae_case(2, 16, 16, 6, 5), 8)]


@needs_avx512
@pytest.mark.parametrize("case, parameters", GRADIENT_CASES, ids=[c[0][0] for c in GRADIENT_CASES])
def test_gradients_through_a_frozen_unet_block_are_its_layers(case, parameters, ms_mode):
    """A ControlNet trains through its frozen base UNet's blocks: the op's gradients are those of its layers (the
    ResBlock's embedding projection, outside its kernel, included)."""
    rng = np.random.default_rng(13)
    block, inputs = _block_and_inputs(case, rng)
    output_shape = _Call(block)(*inputs).shape
    gradients = _Gradients(_BlockLoss(block, rng.standard_normal(output_shape).astype(np.float32)))
    calls = _count_block_kernel_calls(block)
    ours_inputs, params = gradients(*inputs)
    assert calls or ms_mode == "graph"
    block.use_cpu_kernel = False
    reference_inputs, reference_params = _Gradients(gradients.loss)(*inputs)
    assert len(params) == parameters
    for grad, reference in zip(ours_inputs + params, reference_inputs + reference_params):
        reference = reference.asnumpy()
        np.testing.assert_allclose(grad.asnumpy(), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@needs_avx512
def test_a_transformer_block_with_a_lora_adapter_runs_its_layers():
    """A LoRA adapter in place of one of the block's dense layers: the block runs its layers one by one."""
    rng = np.random.default_rng(14)
    block, inputs = _block_and_inputs(BLOCK_CASES[0], rng)
    plain = block(*inputs).asnumpy()
    adapters = add_lora_adapters(block, ["feed_forward"], rank=4, alpha=4.0)
    adapters["ff.net.2"].lora_up.set_data(Tensor(np.full((64, 4), 0.1, np.float32)))
    assert not block.fused
    calls = _count_kernel_calls(block)
    adapted = _Call(block)(*inputs).asnumpy()
    assert calls == [] and not np.allclose(adapted, plain, atol=1e-3)


@needs_avx512
@pytest.mark.parametrize("case, norm, layer", [(BLOCK_CASES[0], "norm2", "attn2.to_k"),
                                               (BLOCK_CASES[5], "out_layers.0", "skip_connection"),
                                               (BLOCK_CASES[9], "norm", "proj_out"),
                                               (BLOCK_CASES[13], "norm2", "nin_shortcut")],
                         ids=["transformer", "res", "spatial", "vae"])
def test_a_unet_block_runs_its_layers_where_one_would_not_use_its_kernel(case, norm, layer):
    """Parameters stored in float16, a MindIR export (``portable``), a layer given a new parameter object: the block
    runs its layers one by one, and the result is theirs."""
    rng = np.random.default_rng(15)
    block, inputs = _block_and_inputs(case, rng)
    with cpu_kernels.portable(block):
        assert not block.fused
    assert block.fused
    cells = dict(block.cells_and_names())
    cells[norm].gamma.set_dtype(ms.float16)
    assert not block.fused
    # A layer given a new parameter object: the block's own tuple of operands no longer holds it.
    block, inputs = _block_and_inputs(case, rng)
    weight = dict(block.cells_and_names())[layer].weight
    dict(block.cells_and_names())[layer].weight = Parameter(Tensor(np.zeros(weight.shape, np.float32)), name="weight")
    assert not block.fused
    np.testing.assert_array_equal(block(*inputs).asnumpy(), _Call(block)(*inputs).asnumpy())


def test_lazily_built_networks_blocks_stay_fused_after_their_parameters_are_made():
    """The pipelines build their networks without parameter data, then make it (``init_parameters_data``, which may
    hand back new parameter objects: it replaces them in the blocks' tuples too)."""
    if not cpu_kernels.avx512():
        pytest.skip("no AVX-512 (or no library) here: the blocks run their layers")
    unet = build_component("unet", load_config("demo").unet, materialize=False)
    unet.init_parameters_data()
    vae = build_component("vae", load_config("demo").vae, materialize=False)
    vae.init_parameters_data()
    kinds = ((unet, BasicTransformerBlock), (unet, ResBlock), (unet, SpatialTransformer), (vae, ResnetBlock))
    for network, kind in kinds:
        blocks = [cell for _, cell in network.cells_and_names() if isinstance(cell, kind)]
        assert blocks and all(block.fused for block in blocks)


def _convolve_with_the_library(x, weight, padding):
    """The library's Conv2dForward called directly (no MindSpore: usable in a forked child)."""
    library = ctypes.CDLL(cpu_kernels.library())
    out = np.empty((x.shape[0], weight.shape[0], x.shape[2] + 2 * padding - 2, x.shape[3] + 2 * padding - 2),
                   np.float32)
    operands = [x, weight, np.zeros(weight.shape[0], np.float32), np.array([padding], np.float32), out]
    shapes = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in operands]
    status = library.Conv2dForward(
        len(operands), (ctypes.c_void_p * len(operands))(*[a.ctypes.data for a in operands]),
        (ctypes.c_int * len(operands))(*[a.ndim for a in operands]),
        (ctypes.POINTER(ctypes.c_int64) * len(operands))(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64))
                                                           for s in shapes]),
        (ctypes.c_char_p * len(operands))(*[b"float32"] * len(operands)), None, None)
    assert status == 0
    return out


def _convolve_and_compare(x, weight, expected):
    os._exit(0 if np.array_equal(_convolve_with_the_library(x, weight, 1), expected) else 1)


@needs_avx512
def test_a_process_forked_after_the_kernel_threads_started_gets_its_own():
    """The kernel threads wait between kernels; a child forked from a process whose threads have started has none of
    them (fork copies only the calling thread): it must start its own rather than wait for its parent's forever."""
    import multiprocessing

    rng = np.random.default_rng(15)
    x, weight = (rng.standard_normal(shape).astype(np.float32) for shape in ((6, 32, 16, 16), (48, 32, 3, 3)))
    saved = runtime.cpu_threads()
    runtime.set_cpu_threads(2)
    try:
        expected = _convolve_with_the_library(x, weight, 1)  # 42 MFLOP: shared, so the threads are started
        child = multiprocessing.get_context("fork").Process(target=_convolve_and_compare, args=(x, weight, expected))
        child.start()
        child.join(120)
        if child.exitcode is None:
            child.kill()
        assert child.exitcode == 0
    finally:
        runtime.set_cpu_threads(saved)
