"""MindIR export: each graph loaded back (mindspore.load + nn.GraphCell) computes what its cell computes, and a
whole 40-step demo image drawn from the exported graphs and the manifest alone is the pipeline's image.

One export (tools/export.py's, at the demo's 2:1 bucket) serves every test but the release switch rule's: an
export compiles four graphs, each several seconds on a CPU."""
import json
import os

import mindspore as ms
import numpy as np
import pytest

from pangu_draw_ms.demo import DEMO_MODEL_DIR
from pangu_draw_ms.pipelines.mindir import ConditionerGraph, DecoderGraph, MindIRPipeline, export_pipeline
from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

PROMPT = "a big red circle in the center on a white background"
HEIGHT, WIDTH = 48, 96  # the bucket --ratio 2:1 picks (not the demo's default 64x64)
LATENT = (1, 4, HEIGHT // 4, WIDTH // 4)
# Images from the graphs against the pipeline's: the graphs run MindSpore's kernels, the pipeline the package's CPU
# kernels (models/cpu_kernels.py), whose float rounding differs (~1e-7 per op); over a sampling loop that drifts to
# ~1e-5 in pixel values (measured: 1.01e-5 at most, one pixel in 13,824, over 10 steps).
IMAGE_ATOL = 3e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The CLI's export of the embedded demo model (40 steps: not the config's default 30), and a pipeline of
    the same model for the images the graphs must reproduce."""
    from pangu_draw_ms.cli import export

    directory = str(tmp_path_factory.mktemp("exported") / "demo")
    manifest = export.main(["--out", directory, "--steps", "40", "--ratio", "2:1", "--quiet"])
    return PanGuDrawPipeline.from_pretrained(DEMO_MODEL_DIR), directory, manifest


def test_a_40_step_image_from_the_exported_graphs_alone_is_the_pipelines(exported, graph_mode):
    pipe, directory, manifest = exported
    noise = np.random.default_rng(3).standard_normal(LATENT, dtype=np.float32)
    expected = pipe.decode(pipe(PROMPT, noise=noise, height=HEIGHT, width=WIDTH, num_inference_steps=40,
                                output_type="latent").latents)
    runner = MindIRPipeline(directory)
    np.testing.assert_allclose(runner([PROMPT], noise), expected, rtol=0, atol=IMAGE_ATOL)
    assert len(manifest["steps"]) == 40
    assert {s["expert"] for s in manifest["steps"] if s["t"] >= manifest["t_struct"]} == {"structure"}
    assert {s["expert"] for s in manifest["steps"] if s["t"] < manifest["t_struct"]} == {"texture"}
    # The guidance weights are an input: another guidance scale needs no other export.
    weights = [1 - 2.0 if b["name"] == "uncond" else 2.0 for b in manifest["branches"]]
    other = pipe.decode(pipe(PROMPT, noise=noise, height=HEIGHT, width=WIDTH, num_inference_steps=40,
                             guidance_scale=2.0, output_type="latent").latents)
    np.testing.assert_allclose(runner([PROMPT], noise, branch_weights=weights), other, rtol=0, atol=IMAGE_ATOL)


def test_each_graph_loaded_back_computes_what_its_cell_computes(exported):
    """The cells run eagerly (PYNATIVE: no second compile of them), the loaded graphs as graphs."""
    pipe, directory, manifest = exported
    rng = np.random.default_rng(0)
    graphs = {name: ms.nn.GraphCell(ms.load(os.path.join(directory, entry["file"])))
              for name, entry in manifest["graphs"].items()}
    for name, cell in (("conditioner", ConditionerGraph(pipe.components.get("conditioner"))),
                       ("vae_decoder", DecoderGraph(pipe.components.get("vae")))):
        inputs = []
        for spec in manifest["graphs"][name]["inputs"]:
            if "int" in spec["dtype"]:
                inputs.append(ms.Tensor(rng.integers(0, 5 if spec["name"] == "buckets" else 200, spec["shape"],
                                                     dtype=np.int32)))
            else:
                inputs.append(ms.Tensor(rng.standard_normal(spec["shape"]).astype(np.float32)))
        ours, loaded = cell(*inputs), graphs[name](*inputs)
        ours = ours if isinstance(ours, tuple) else (ours,)
        loaded = loaded if isinstance(loaded, (tuple, list)) else (loaded,)
        assert len(loaded) == len(ours) == len(manifest["graphs"][name]["outputs"]), name
        for a, b, spec in zip(ours, loaded, manifest["graphs"][name]["outputs"]):
            assert list(b.shape) == spec["shape"] and str(b.dtype).lower() == spec["dtype"], (name, spec)
            np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["graphs"]["step_structure"]["inputs"][0] == {"name": "z", "shape": list(LATENT),
                                                                         "dtype": "float32"}


def test_export_cli_writes_the_graphs_and_refuses_what_it_cannot_export(exported, tmp_path, capsys):
    from pangu_draw_ms.cli import export

    _, directory, manifest = exported  # written by tools/export.py --steps 40 --ratio 2:1
    assert manifest["bucket"] == {"index": 0, "height": 48, "width": 96} and len(manifest["steps"]) == 40
    assert sorted(os.listdir(directory)) == ["conditioner.mindir", "manifest.json", "step_structure.mindir",
                                             "step_texture.mindir", "tokenizer_0.model", "tokenizer_1.model",
                                             "vae_decoder.mindir"]
    # Portable graphs: MindSpore's own kernels, never this machine's CPU kernel library (models/cpu_kernels.py).
    for entry in manifest["graphs"].values():
        with open(os.path.join(directory, entry["file"]), "rb") as f:
            graph = f.read()
        assert b"cpu_kernels.so" not in graph, entry["file"]
        assert not [name for name in (b"NormForward", b"GegluForward", b"Conv2dForward", b"DenseForward",
                                      b"AttentionForward") if name in graph], entry["file"]
    with pytest.raises(SystemExit):
        export.main(["--out", str(tmp_path / "x"), "--num-prompts", "0"])
    assert "--num-prompts must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main(["--out", str(tmp_path / "x"), "--recipe", "configs/recipes/demo_controlnet.yaml"])
    assert "Coop-Diffusion runs are not exported" in capsys.readouterr().err


def test_the_release_switch_rule_is_exported_step_by_step(exported, graph_mode, tmp_path):
    """With the released code's switch rule (one step behind t_struct) each manifest step names the generator
    the pipeline runs it with, and the image from the graphs is still the pipeline's. (The bucket of the other
    tests: the pipeline's compiled steps are reused.)"""
    pipe = exported[0]
    manifest = export_pipeline(pipe, str(tmp_path), num_prompts=1, height=HEIGHT, width=WIDTH,
                               num_inference_steps=10, switch_rule="release")
    noise = np.zeros(LATENT, np.float32) + 0.5
    out = pipe(PROMPT, noise=noise, height=HEIGHT, width=WIDTH, num_inference_steps=10, switch_rule="release",
               output_type="latent")
    assert [[s["t"], s["expert"]] for s in manifest["steps"]] == [list(e) for e in out.info["expert_trace"]]
    assert any(s["t"] < manifest["t_struct"] and s["expert"] == "structure" for s in manifest["steps"])
    images = MindIRPipeline(str(tmp_path))([PROMPT], noise)
    np.testing.assert_allclose(images, pipe.decode(out.latents), rtol=0, atol=IMAGE_ATOL)
