"""Test session setup: CPU, offline, deterministic seeds.

No MindSpore compile cache here: it stores graphs by compile order (compile_cache_N.mindir) under one
source hash, so a run that selects other tests loads another network's graph.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
# tools/infer.py caches compiled graphs across processes by default; tests call it in-process, where the
# cache would be switched on for every later test (test_infer_cli checks the cache in child processes).
os.environ.setdefault("PANGU_DRAW_COMPILE_CACHE", "off")

import sys

import mindspore as ms
import numpy as np
import pytest

# PYNATIVE_MODE by default: with blocking launch (pangu_draw_ms.runtime) a tiny network runs a few calls
# eagerly in less time than GRAPH_MODE takes to compile it. Every network's graph is still compiled and
# checked by its parity test (``ms_mode``), and the tests of compiled paths ask for GRAPH_MODE (``graph_mode``).
ms.set_context(device_target="CPU", mode=ms.PYNATIVE_MODE)

# Keeps the torchvision operator declarations of _make_torchvision_importable alive (freed, they are dropped).
_TORCHVISION_OP_DECLARATIONS = []


def _make_torchvision_importable() -> None:
    """Let the reference packages that import torchvision (pytorch-fid's Inception, transformers' CLIP image
    processors, torchmetrics' multimodal metrics, cn_clip) import beside the CPU torch.

    The only torchvision 0.28 wheel this machine's package index has is PyPI's CUDA build: its ``_C.so`` does
    not load next to torch 2.13.0+cpu (libc10_cuda.so is missing), torchvision goes on without its C++ ops,
    but its import then registers fake kernels for ``torchvision::nms``/``qnms`` and fails on the undefined
    operators. Declaring those two schemas (no kernels) lets the pure-Python parts import; no test calls them.
    """
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError:
        return  # not installed: the tests that need it skip
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OP_DECLARATIONS.append(library)
        import torchvision  # noqa: F401


_make_torchvision_importable()


@pytest.fixture(autouse=True)
def pynative_by_default():
    """Every test starts in PYNATIVE_MODE, whatever an earlier test (or a CLI it called) left set."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture
def graph_mode():
    """Run a test in GRAPH_MODE (compiled steps, compiled training, many-step sampling)."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


@pytest.fixture(params=["graph", "pynative"])
def ms_mode(request):
    """Run a test once in GRAPH_MODE and once in PYNATIVE_MODE."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=previous)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
