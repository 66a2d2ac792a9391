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

import mindspore as ms
import numpy as np
import pytest

ms.set_context(device_target="CPU", mode=ms.GRAPH_MODE)


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
