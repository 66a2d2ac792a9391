"""Test session setup: CPU, offline, compile cache, deterministic seeds."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

import mindspore as ms
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ms.set_context(device_target="CPU", mode=ms.GRAPH_MODE)
# Graph compilation dominates test time; the cache makes reruns (and CI's second run) fast.
ms.set_context(enable_compile_cache=True,
               compile_cache_path=os.environ.get("PANGU_MS_COMPILE_CACHE", os.path.join(ROOT, ".ms_compile_cache")))


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
