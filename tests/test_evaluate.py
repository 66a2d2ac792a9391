"""tools/evaluate.py and its parts: prompt files, resumable and sharded drawing, the report, and the demo
evaluators run end to end on the shipped demo model."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from pangu_draw_ms.evaluation.generation import (
    batches,
    check_run_settings,
    draw_missing,
    image_jobs,
    shard,
)
from pangu_draw_ms.evaluation.prompts import EvalPrompt, language_of, load_prompts, sample_prompts
from pangu_draw_ms.evaluation.report import collect, markdown


def test_prompt_files_of_every_format(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n一个蓝色的正方形\n", encoding="utf-8")
    assert [(p.text, p.lang, p.key) for p in load_prompts(str(text))] == [
        ("a red circle", "en", "1"), ("一个蓝色的正方形", "zh", "3")]
    assert {p.lang for p in load_prompts(str(text), lang="zh")} == {"zh"}
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "id": "c1"}\n{"caption": "一只猫", "lang": "zh"}\n', encoding="utf-8")
    assert [(p.text, p.lang, p.key) for p in load_prompts(str(jsonl))] == [("a cat", "en", "c1"),
                                                                           ("一只猫", "zh", "2")]
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [], "annotations": [{"image_id": 42, "id": 7, "caption": " A dog. "}]}))
    assert [(p.text, p.lang, p.key) for p in load_prompts(str(coco))] == [("A dog.", "en", "42#7")]
    coco_cn = tmp_path / "coco-cn_val.txt"
    coco_cn.write_text("COCO_val2014_000000000042#0\t一只狗在草地上\nCOCO_val2014_000000000042#1\t草地上的狗\n",
                       encoding="utf-8")
    prompts = load_prompts(str(coco_cn))
    assert [(p.text, p.lang, p.key) for p in prompts][0] == ("一只狗在草地上", "zh", "COCO_val2014_000000000042#0")
    assert language_of("PanGu 画一只猫") == "zh" and language_of("a cat") == "en"


def test_bad_prompt_files_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(str(empty))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="binary.txt is not UTF-8"):
        load_prompts(str(binary))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not JSON"):
        load_prompts(str(broken))
    no_prompt = tmp_path / "noprompt.jsonl"
    no_prompt.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="'prompt'"):
        load_prompts(str(no_prompt))
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[1, 2]")
    with pytest.raises(ValueError, match="'annotations' list"):
        load_prompts(str(not_coco))
    wrong_lang = tmp_path / "lang.jsonl"
    wrong_lang.write_text('{"prompt": "x", "lang": "fr"}\n')
    with pytest.raises(ValueError, match="'fr' is not one of en, zh"):
        load_prompts(str(wrong_lang))


def test_a_prompt_sample_is_seeded_and_keeps_the_source_order():
    prompts = [EvalPrompt(f"p{i}", "en", str(i)) for i in range(100)]
    first, again = sample_prompts(prompts, 10, seed=3), sample_prompts(prompts, 10, seed=3)
    assert first == again and len(set(first)) == 10
    assert [int(p.key) for p in first] == sorted(int(p.key) for p in first)
    assert sample_prompts(prompts, 10, seed=4) != first
    assert sample_prompts(prompts, None) == prompts and sample_prompts(prompts, 500) == prompts
    with pytest.raises(ValueError, match=">= 1"):
        sample_prompts(prompts, 0)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_the_workers_shards_cover_every_image_exactly_once(tmp_path, world):
    prompts = [EvalPrompt(f"p{i}", "en", str(i)) for i in range(7)]
    jobs = image_jobs(prompts, [0, 5], str(tmp_path))
    shards = [shard(jobs, rank, world) for rank in range(world)]
    assert sorted((j.seed, j.index) for s in shards for j in s) == sorted((j.seed, j.index) for j in jobs)
    for mine in shards:  # each worker's prompts are one contiguous slice, the same for every seed
        indices = sorted({j.index for j in mine})
        assert indices == list(range(indices[0], indices[-1] + 1)) if indices else True
    with pytest.raises(ValueError, match="distinct"):
        image_jobs(prompts, [1, 1], str(tmp_path))


def test_batches_hold_one_seed_and_consecutive_indices(tmp_path):
    prompts = [EvalPrompt(f"p{i}", "en", str(i)) for i in range(6)]
    jobs = [j for j in image_jobs(prompts, [0, 1], str(tmp_path)) if j.index != 2]
    groups = [[(j.seed, j.index) for j in b] for b in batches(jobs, 3)]
    assert groups == [[(0, 0), (0, 1)], [(0, 3), (0, 4), (0, 5)], [(1, 0), (1, 1)], [(1, 3), (1, 4), (1, 5)]]


def test_drawing_resumes_with_the_missing_images_only_and_refuses_another_runs_folder(tmp_path):
    prompts = [EvalPrompt(f"p{i}", "en", str(i)) for i in range(7)]
    jobs = image_jobs(prompts, [0], str(tmp_path))
    calls = []

    def draw(texts, seed, first):
        calls.append((tuple(texts), seed, first))
        return [Image.new("RGB", (8, 8), (first + k, seed, len(calls))) for k in range(len(texts))]

    assert draw_missing(draw, jobs, batch_size=3) == 7
    assert not [f for f in os.listdir(tmp_path / "seed_0") if f.startswith(".")]  # no partial files left
    for job in (jobs[1], jobs[4], jobs[5]):  # "killed": one image lost from the first batch, the second batch's last
        os.remove(job.path)
    os.remove(jobs[6].path)
    calls.clear()
    assert draw_missing(draw, jobs, batch_size=3) == 4
    # Batches with a missing image are drawn whole, as the first run drew them (image i keeps its index: the same
    # noise); only the missing PNGs are written: image 0 is still the first run's (its call number, 1).
    assert calls == [(("p0", "p1", "p2"), 0, 0), (("p3", "p4", "p5"), 0, 3), (("p6",), 0, 6)]
    with Image.open(jobs[0].path) as kept, Image.open(jobs[1].path) as redrawn:
        assert kept.getpixel((0, 0)) == (0, 0, 1) and redrawn.getpixel((0, 0)) == (1, 0, 1)
    assert draw_missing(draw, jobs, batch_size=3) == 0 and len(calls) == 3  # nothing left to draw
    with Image.open(jobs[4].path) as image:
        assert image.getpixel((0, 0)) == (4, 0, 2)
        assert json.loads(image.text["parameters"])["image_index"] == 4
    check_run_settings(str(tmp_path), {"steps": 4, "seed": [0]}, write=True)
    check_run_settings(str(tmp_path), {"steps": 4, "seed": [0]}, write=True)  # the same run: resumes
    with pytest.raises(ValueError, match="other settings \\(steps differ\\)"):
        check_run_settings(str(tmp_path), {"steps": 8, "seed": [0]}, write=True)


def test_the_report_gives_each_seed_and_their_mean_and_spread():
    per_seed = [{"democlip": {"en": 30.0, "zh": 20.0}}, {"democlip": {"en": 32.0, "zh": 22.0}}]
    metrics = collect(per_seed)
    assert metrics["democlip"]["en"] == {"mean": 31.0, "std": 1.0, "per_seed": [30.0, 32.0]}
    report = {"model": "m", "settings": {"steps": 4}, "prompts": {"source": "s", "count": 2,
                                                                  "languages": {"en": 1, "zh": 1}},
              "seeds": [0, 1], "images": 4, "metrics": metrics, "seconds": {"generate": 1.0, "metrics": 2.0}}
    text = markdown(report)
    assert "| demo CLIP-score (demo CLIP, not OpenAI CLIP) | en | 31.000 | 1.000 | 30.000, 32.000 |" in text


def test_metric_inputs_are_checked_before_any_image_is_drawn(tmp_path):
    from pangu_draw_ms.cli import evaluate

    out = tmp_path / "eval"
    with pytest.raises(SystemExit, match="metric fid needs --fid-reference"):
        evaluate.main(["--metrics", "fid", "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main(["--metrics", "is", "--inception", str(tmp_path / "none.pth"), "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit, match="unknown metric fidd"):
        evaluate.main(["--metrics", "fidd", "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit, match="give --metrics"):
        evaluate.main(["--config", "tiny", "--prompts", "x.txt", "--out", str(out), "--quiet"])
    assert not out.exists()


# ---- tools/evaluate.py on the shipped demo model ----------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_RUN = ["--prompt-seed", "1", "--num-prompts", "6", "--seeds", "0", "1", "--steps", "3", "--mode", "pynative",
            "--quiet"]


def _metric_values(report):
    return {(metric, group): summary["per_seed"] for metric, groups in report["metrics"].items()
            for group, summary in groups.items()}


def test_the_demo_evaluation_runs_end_to_end_and_a_killed_run_resumes_to_the_same_report(tmp_path):
    from pangu_draw_ms.cli import evaluate

    out = tmp_path / "eval"
    report = evaluate.main(DEMO_RUN + ["--out", str(out)])
    assert report["images"] == 12 and set(report["metrics"]) == {"democlip", "fd_democlip", "is_democlip",
                                                                 "judge"}
    assert set(report["metrics"]["democlip"]) == set(report["prompts"]["languages"])
    assert all(0.0 <= v <= 100.0 for v in report["metrics"]["democlip"]["en"]["per_seed"])
    assert (out / "report.json").is_file() and "FD-demoCLIP" in (out / "report.md").read_text(encoding="utf-8")
    images = sorted((out / "seed_1").iterdir())
    kept = {p.name: p.read_bytes() for p in images}
    for path in images[2:5]:  # the run was killed before these were written
        path.unlink()
    (out / "report.json").unlink()
    resumed = evaluate.main(DEMO_RUN + ["--out", str(out)])
    assert {p.name: p.read_bytes() for p in sorted((out / "seed_1").iterdir())} == kept
    for key, values in _metric_values(report).items():
        np.testing.assert_allclose(_metric_values(resumed)[key], values, rtol=1e-6, err_msg=str(key))
    with pytest.raises(SystemExit, match="holds the images of a run with other settings \\(steps differ\\)"):
        evaluate.main(DEMO_RUN[:-3] + ["--steps", "4", "--quiet", "--out", str(out)])


def test_a_coop_recipe_is_evaluated_like_a_model(tmp_path):
    """--recipe: the images are drawn by Coop-Diffusion (here the demo's resolution bridge, the demo model at its
    32x32 texture bucket first); the recipe is part of the run's settings, so another recipe is another run."""
    from pangu_draw_ms.cli import evaluate

    run = ["--prompt-seed", "1", "--num-prompts", "2", "--seeds", "0", "--steps", "3", "--mode", "pynative",
           "--quiet", "--metrics", "judge", "--out", str(tmp_path / "eval")]
    recipes = os.path.join(REPO, "configs", "recipes")
    report = evaluate.main(run + ["--recipe", os.path.join(recipes, "demo_resolution_bridge.yaml")])
    assert "fused with low (recipe" in report["model"] and report["images"] == 2
    with pytest.raises(SystemExit, match="recipe differ"):
        evaluate.main(run + ["--recipe", os.path.join(recipes, "demo_resolution_bridge_latent.yaml")])


def test_msrun_workers_draw_the_same_images_as_one_process(tmp_path):
    """Two msrun workers, each its contiguous slice of the prompts, draw exactly the single process's images."""
    import socket
    import subprocess
    import sys

    from pangu_draw_ms.cli import evaluate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # One image per pipeline call in both runs: a batch's size changes float rounding (a pixel level here and
    # there), not which images are drawn.
    run = ["--prompt-seed", "1", "--num-prompts", "4", "--seeds", "0", "--steps", "3", "--mode", "pynative",
           "--metrics", "judge", "--batch-size", "1", "--quiet"]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="1", GLOG_v="3")
    launch = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", "--join=True",
              f"--log_dir={tmp_path}/logs", os.path.join(REPO, "tools", "evaluate.py")]
    done = subprocess.run(launch + run + ["--out", str(tmp_path / "two")], cwd=REPO, env=env, timeout=900,
                          capture_output=True, text=True)
    logs = "".join(open(os.path.join(tmp_path, "logs", f), encoding="utf-8", errors="replace").read()
                   for f in sorted(os.listdir(tmp_path / "logs")) if f.startswith("worker"))
    assert done.returncode == 0, logs[-3000:]
    evaluate.main(run + ["--out", str(tmp_path / "one")])  # the single process: this one
    two = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / "two" / "seed_0").iterdir())}
    one = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / "one" / "seed_0").iterdir())}
    assert sorted(two) == sorted(one) and len(one) == 4
    for name in one:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)
    with open(tmp_path / "two" / "report.json", encoding="utf-8") as f:
        assert json.load(f)["workers"] == 2


def test_is_democlip_rewards_images_that_are_varied_and_recognisable():
    """IS-demoCLIP: renders of the 24 held-out scenes (every colour x shape once) score highest; noise images
    (their colours vary, their shapes are none) lower; one scene rendered 24 times 1 (recognisable, not varied).
    Measured: 6.3, 3.4, 1.0 (the demo CLIP's zero-shot probabilities are soft: 24 would be the ceiling)."""
    from pangu_draw_ms.evaluation.demo import heldout_prompts, load_demo_clip, reference_renders, zero_shot_logits
    from pangu_draw_ms.evaluation.inception_score import inception_score_from_logits

    clip = load_demo_clip()
    english = [p for p in heldout_prompts() if p.lang == "en"]
    renders = list(reference_renders(english, 64, 64, per_prompt=1, seed=5))
    noise = list(np.random.default_rng(0).integers(0, 256, (24, 64, 64, 3), dtype=np.uint8))

    def score(images):
        return inception_score_from_logits(zero_shot_logits(clip, images), splits=1).mean

    varied, repeated, random = score(renders), score([renders[0]] * 24), score(noise)
    print(f"IS-demoCLIP: varied {varied:.2f}, repeated {repeated:.2f}, noise {random:.2f}")
    assert varied > 1.5 * random and random > 1.5 * repeated and repeated < 1.01, (varied, repeated, random)


def test_the_demo_evaluators_measure_something():
    """The demo CLIP tells a render's own caption from another's in both languages, by a wide margin; and
    FD-demoCLIP against renders of the held-out scenes orders other renders < the shipped demo model's
    images < images of untrained UNets. Measured: own 87.8/87.9 vs shuffled 1.4/1.7 (en/zh); FD 0.17, 14.1,
    208 (5 Euler steps, 64x64: half the drawing of 10 steps, where it was 0.17, 9.7, 209; at 3 steps 26,
    204, too near the 5x margin)."""
    import tempfile

    import mindspore as ms

    from pangu_draw_ms.config import load_config
    from pangu_draw_ms.demo import DEMO_MODEL_DIR
    from pangu_draw_ms.evaluation.clip_score import clip_score
    from pangu_draw_ms.evaluation.demo import heldout_prompts, load_demo_clip, reference_renders
    from pangu_draw_ms.evaluation.fid import FeatureStatistics, frechet_distance
    from pangu_draw_ms.io.layouts import build_component
    from pangu_draw_ms.io.model_dir import find_component_files, save_component
    from pangu_draw_ms.io.state import cell_state
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    clip = load_demo_clip()
    prompts = heldout_prompts()
    for lang in ("en", "zh"):
        chosen = [p for p in prompts if p.lang == lang]
        renders = list(reference_renders(chosen, 64, 64, per_prompt=1, seed=5))
        texts = [p.text for p in chosen]
        own, shuffled = clip_score(renders, texts, clip), clip_score(renders, texts[7:] + texts[:7], clip)
        assert own > 60 and own - shuffled > 40, (lang, own, shuffled)

    english = [p for p in prompts if p.lang == "en"]
    reference = FeatureStatistics.from_features(clip.image_features(list(reference_renders(english, 64, 64, 4))))

    def distance(images):
        stats = FeatureStatistics.from_features(clip.image_features(list(images)))
        return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)

    config = load_config(os.path.join(DEMO_MODEL_DIR, "config.yaml"))
    files = find_component_files(DEMO_MODEL_DIR)
    untrained = dict(files)
    ms.set_seed(0)
    folder = tempfile.mkdtemp()
    for role in ("structure_unet", "texture_unet"):
        untrained[role] = save_component(folder, role, cell_state(build_component("unet", config.unet)), config)

    def drawn(weights):
        pipe = PanGuDrawPipeline.from_config(config, weights, show_progress=False)
        texts = [p.text for p in english]
        return [np.asarray(image) for first in range(0, len(texts), 8) for image in
                pipe(texts[first:first + 8], height=64, width=64, num_inference_steps=5, seed=0,
                     first_image_index=first).images]

    renders, shipped, noise = (distance(reference_renders(english, 64, 64, 1, seed=9)), distance(drawn(files)),
                               distance(drawn(untrained)))
    assert renders < shipped < noise and noise > 5 * shipped, (renders, shipped, noise)
