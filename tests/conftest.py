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

from helpers import make_torchvision_importable

# PYNATIVE_MODE by default: with blocking launch (pangu_draw_ms.runtime) a tiny network runs a few calls
# eagerly in less time than GRAPH_MODE takes to compile it. Every network's graph is still compiled and
# checked by its parity test (``ms_mode``), and the tests of compiled paths ask for GRAPH_MODE (``graph_mode``).
ms.set_context(device_target="CPU", mode=ms.PYNATIVE_MODE)
# Kernel threads: the cores shared among pytest-xdist's workers. MindSpore's default, a thread per core in every
# worker, oversubscribes them, and its idle threads spin: an eager training test took 2.3x longer beside one busy
# process with two threads, 1.15x with one.
# The package's own CPU kernels (models/cpu_kernels.py) take the same count.
from pangu_draw_ms import runtime  # noqa: E402

runtime.set_cpu_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

make_torchvision_importable()

# torch's bundled oneDNN reads the ISA cap that importing the package sets (pangu_draw_ms.runtime) and runs its 3x3
# convolutions 1.8x slower under it: lifted once MindSpore's oneDNN has read it, so torch's reference models run at
# their own speed. Child processes (CLI tools, msrun) import the package and set it again.
runtime.lift_onednn_cap()


# The slowest test files, slowest first (their share of a full run, 2026-11-29: training 250 s, the demo 120 s,
# Coop 110 s, evaluation and export 80 s each, ...). pytest-xdist's --dist loadfile hands whole files to the
# workers in collection order, so these go first and the short files fill in at the end: both workers finish
# together instead of one running the last long file alone (xdist's own order, by number of tests, put the
# export tests last). Refresh from ``--durations=0`` when a file's cost changes a lot.
SLOWEST_FILES = ("test_training.py", "test_demo.py", "test_coop_pipeline.py", "test_evaluate.py", "test_export.py",
                 "test_pipeline.py", "test_infer_cli.py", "test_ablation_options.py", "test_controlnet.py",
                 "test_unet.py", "test_lora_training.py", "test_configs.py", "test_prompting.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """The slowest files first (in SLOWEST_FILES' order), then the rest in their own order; tests keep their order
    within a file."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="module")
def frozen_heap():
    """What is alive when a test file starts (the imports: torch, diffusers, transformers, MindSpore; module
    fixtures come after) frozen out of the garbage collector's walks (runtime.freeze_heap): MindSpore collects
    before every graph compile, and in a worker with torch loaded that walk took 0.3 s per graph."""
    runtime.freeze_heap()


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


# ---- the training tests' data and model (test_training, test_ablation_options) ----------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """64 tiny demo images (every aspect ratio, 30 % low resolution) and a manifest of the square ones."""
    import json

    from pangu_draw_ms.demo.shapes import write_dataset

    directory = str(tmp_path_factory.mktemp("data"))
    write_dataset(directory, 64, seed=0, low_res_fraction=0.3, scale=0.35)
    with open(os.path.join(directory, "train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    # One bucket (24x24 structure, 16x16 texture) keeps the number of compiled step graphs at one.
    with open(os.path.join(directory, "square.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            if 0.8 < row["height"] / row["width"] < 1.25:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return directory


@pytest.fixture(scope="module")
def weights(tmp_path_factory, dataset):
    """A model directory: the tiny_train architecture with a SentencePiece + jieba tokenizer trained on the
    captions (an 80-piece vocabulary keeps the text encoders small), seeded random VAE and conditioner."""
    from pangu_draw_ms.config import PanGuDrawConfig, from_dict, to_dict
    from pangu_draw_ms.io.model_dir import load_model_config, save_component, write_model_config
    from pangu_draw_ms.io.state import cell_state
    from pangu_draw_ms.models.conditioner import Conditioner
    from pangu_draw_ms.models.vae import AutoencoderKL
    from pangu_draw_ms.tokenizers import train as train_tokenizer
    from pangu_draw_ms.training.data import read_manifest

    directory = str(tmp_path_factory.mktemp("model"))
    samples, _ = read_manifest(os.path.join(dataset, "train.jsonl"))
    vocab = train_tokenizer([t for s in samples for t in (s.caption_en, s.caption_zh)],
                            os.path.join(directory, "captions"), 80, jieba=True, model_type="bpe")
    data = to_dict(load_model_config("tiny_train"))
    for encoder in data["conditioner"]["encoders"]:
        encoder.update(vocab_size=80, eot_token_id=3, max_position_embeddings=40,
                       tokenizer={"kind": "sentencepiece", "vocab": vocab, "max_length": 40, "jieba": True})
    model = from_dict(PanGuDrawConfig, data)
    write_model_config(directory, model)
    ms.set_seed(123)
    save_component(directory, "vae", cell_state(AutoencoderKL(model.vae)), model)
    save_component(directory, "conditioner", cell_state(Conditioner(model.conditioner)), model)
    paths = {name: os.path.join(directory, f"{name}.safetensors") for name in ("vae", "conditioner")}
    return dict(paths, model=directory)
