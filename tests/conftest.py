"""Test session setup: CPU, offline, compile cache, deterministic seeds."""
import glob
import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

import mindspore as ms
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _source_digest() -> str:
    """Hash of the package and test sources.

    MindSpore invalidates its compile cache only when the entry script, or a file it imports from
    outside sys.path, changes; under pytest that covers none of our files, so a cached graph would
    outlive an edit of the cell it was compiled from (measured: a mutated cell still passed in
    GRAPH_MODE). Keying the cache folder on the sources makes every edit recompile.
    """
    digest = hashlib.sha256()
    for folder in ("pangu_draw_ms", "tests"):
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)):
            digest.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


ms.set_context(device_target="CPU", mode=ms.GRAPH_MODE)
# Graph compilation dominates test time; the cache makes reruns (and CI's second run) fast.
ms.set_context(enable_compile_cache=True, compile_cache_path=os.path.join(
    os.environ.get("PANGU_MS_COMPILE_CACHE", os.path.join(ROOT, ".ms_compile_cache")), _source_digest()))


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
