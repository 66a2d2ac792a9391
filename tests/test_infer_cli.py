"""tools/infer.py: PNGs with metadata and a grid, and clear errors."""
import json
import os
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from pangu_draw_ms.cli import infer
from pangu_draw_ms.config import resolve_config_path

from helpers import assert_close


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    with open(resolve_config_path("tiny"), encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data["structure_buckets"] = [[64, 128], [96, 96], [128, 64]]
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_cli_writes_pngs_with_metadata_and_a_grid(small_config, tmp_path, capsys):
    paths = infer.main(["--config", small_config, "--prompt", "一个红色的圆形", "--prompt", "a blue square",
                        "--num-images", "2", "--steps", "2", "--ratio", "2:1", "--seed", "4",
                        "--out", str(tmp_path), "--quiet", "--save-latents", "--mode", "pynative"])
    pngs = sorted(p for p in paths if "_grid_" not in p)
    assert len(pngs) == 4 and os.path.exists(str(tmp_path / "pangu_grid_000-003.png"))
    assert "SEEDED RANDOM WEIGHTS" in capsys.readouterr().err
    with Image.open(pngs[2]) as image:
        assert image.size == (128, 64)
        params = json.loads(image.text["parameters"])
        assert image.text["prompt"] == "a blue square"
    assert params["seed"] == 4 and params["num_inference_steps"] == 2 and params["bucket_index"] == 0
    assert params["image_index"] == 2 and params["experts"] == {"structure": 1, "texture": 1}
    assert os.path.exists(pngs[0][:-4] + ".npy")


@pytest.mark.parametrize("argv, message", [
    (["--prompt", " "], "prompt 1 is empty"),
    (["--prompt", "a cat", "--sampler", "plms"], "--sampler must be one of ddim,"),
    (["--prompt", "a cat", "--height", "100", "--width", "100"], "valid sizes"),
    (["--prompt", "a cat", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--prompt", "a cat", "--guidance-scale", "-1"], "--guidance-scale must be a finite number >= 0, got -1.0"),
    (["--prompt", "a cat", "--anime-scale", "-3"], "--anime-scale must be a finite number >= 0, got -3.0"),
    (["--prompt", "a cat", "--structure-ckpt", "/nonexistent/high.ckpt", "--texture-ckpt", "/nonexistent/low.ckpt"],
     "does not exist"),
    (["--prompt", "a cat", "--structure-ckpt", "/nonexistent/high.ckpt"], "both --structure-ckpt and --texture-ckpt"),
])
def test_cli_errors_are_clear(small_config, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--config", small_config, "--out", str(tmp_path), "--quiet"] + argv)
    assert message in str(exit_info.value)


def test_released_pair_and_its_conversion_draw_the_same_image(small_config, tmp_path, capsys):
    """--structure-ckpt/--texture-ckpt on files in the released layout; the swapped guard; and the model
    directory tools/convert.py makes from them gives bit-identical latents."""
    import numpy as np

    from pangu_draw_ms.config import load_config
    from pangu_draw_ms.io.checkpoint import save_checkpoint
    from pangu_draw_ms.io.released import convert_released

    from released_layout import released_state, tiny_cells

    high, low = str(tmp_path / "pangu_high_timestamp-1.ckpt"), str(tmp_path / "pangu_low_timestamp-2.ckpt")
    save_checkpoint(released_state(*tiny_cells(20)), high)
    save_checkpoint(released_state(*tiny_cells(30)), low)
    common = ["--config", small_config, "--prompt", "一个红色的圆形", "--steps", "2", "--height", "96", "--width", "96",
              "--quiet", "--save-latents", "--mode", "pynative"]
    direct = infer.main(common + ["--structure-ckpt", high, "--texture-ckpt", low, "--out", str(tmp_path / "a.png")])
    assert "checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="look swapped.*--allow-swapped"):
        infer.main(common + ["--structure-ckpt", low, "--texture-ckpt", high, "--out", str(tmp_path / "b.png")])

    model_dir = tmp_path / "converted"
    model_dir.mkdir()
    convert_released(str(model_dir), load_config(small_config), structure=high, texture=low)
    converted = infer.main(common + ["--model-dir", str(model_dir), "--out", str(tmp_path / "c.png")])
    latents = [np.load(p[:-4] + ".npy") for p in (direct[0], converted[0])]
    assert np.array_equal(latents[0], latents[1])


def test_batches_equal_one_image_at_a_time(tmp_path):
    """--batch-size groups images into pipeline calls; every image equals its one-at-a-time version (its
    noise comes from (seed, image index)), and each PNG is written under its image index. (PyNative: the
    batching is host logic, and three batch sizes would compile three sets of graphs; the demo model: the
    smallest UNet, the fastest steps.)"""
    import numpy as np

    common = ["--prompt", "一个红色的圆形", "--prompt", "a blue square", "--num-images", "2", "--steps", "2",
              "--height", "64", "--width", "64", "--seed", "3", "--quiet", "--save-latents", "--mode", "pynative"]
    batched = infer.main(common + ["--batch-size", "3", "--out", str(tmp_path / "batched")])
    single = infer.main(common + ["--batch-size", "1", "--out", str(tmp_path / "single")])
    assert [os.path.basename(p) for p in batched] == [f"pangu_00{i}.png" for i in range(4)] + ["pangu_grid_000-003.png"]
    for a, b in zip(batched[:4], single[:4]):
        with Image.open(a) as image:
            assert json.loads(image.text["parameters"])["image_index"] == int(a[-5])
        assert_close(np.load(a[:-4] + ".npy"), np.load(b[:-4] + ".npy"), rel=1e-5, what="batched vs alone")
    with pytest.raises(SystemExit, match="--batch-size must be >= 1"):
        infer.main(common + ["--batch-size", "0", "--out", str(tmp_path / "none")])


def test_compile_cache_key_holds_what_decides_the_graphs(small_config):
    """MindSpore's compile cache names graphs by compile order: runs that compile other graphs (another batch
    layout, size, sampler, model) get another folder; texts, seeds and output names do not change a graph."""
    def key(argv, num_images=1, batch_size=1):
        return infer.compile_key(infer.parse_args(["--config", small_config] + argv), num_images, batch_size)

    base = key(["--prompt", "a red circle", "--seed", "1", "--out", "a"])
    assert key(["--prompt", "一个蓝色的方块", "--seed", "2", "--out", "b", "--negative-prompt", "x"]) == base
    assert key(["--prompt", "a red circle"], num_images=2, batch_size=2) != base
    assert key(["--prompt", "a red circle", "--height", "96", "--width", "96"]) != base
    assert key(["--prompt", "a red circle", "--sampler", "heun"]) != base


def test_compile_cache_reads_back_the_same_graphs(tmp_path):
    """A second process with the same settings reads the graphs the first one cached and draws the same
    latents (child processes: the cache is process-wide); neither logs a warning. Two steps: both generators'
    step graphs (one architecture, the same input shapes) are cached and must be read back in order. The
    demo model: its graphs compile fastest."""
    import subprocess

    import numpy as np

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "infer.py")
    cache = tmp_path / "cache"

    def draw(out):
        argv = ["--steps", "2", "--height", "64", "--width", "64", "--quiet",
                "--save-latents", "--compile-cache", str(cache), "--out", str(tmp_path / out),
                "--prompt", "a red circle", "--prompt", "一个蓝色的方块"]
        done = subprocess.run([sys.executable, script] + argv, check=True, capture_output=True, text=True)
        # A normal run logs no warnings (MindSpore's log level, no deprecated calls of ours).
        assert not [line for line in done.stderr.splitlines() if "WARN" in line or "DEBUG" in line], done.stderr
        return [np.load(tmp_path / out / f"pangu_00{i}.npy") for i in range(2)]

    cold = draw("cold")
    (folder,) = os.listdir(cache)
    assert os.listdir(cache / folder)  # the graphs were written
    warm = draw("warm")
    assert os.listdir(cache) == [folder] and all(np.array_equal(a, b) for a, b in zip(cold, warm))


def _folder_state(folder):
    """Every file under ``folder`` with its content, to show that a refused run changed nothing."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def _refused(argv, monkeypatch, folder):
    """The SystemExit of ``infer.main(argv)``, checking that it came before any model was built and that
    ``folder`` is unchanged."""
    def no_model(args):
        raise AssertionError("a model was built for a request that had to be refused first")

    monkeypatch.setattr(infer, "build_pipeline", no_model)
    before = _folder_state(folder)
    with pytest.raises(SystemExit) as exit_info:
        infer.main(argv)
    assert _folder_state(folder) == before
    assert exit_info.value.code == 2
    return str(exit_info.value)


@pytest.mark.parametrize("argv, message", [
    (["--guidance-scale", "nan"], "error: --guidance-scale must be a finite number >= 0, got nan"),
    (["--guidance-scale", "inf"], "error: --guidance-scale must be a finite number >= 0, got inf"),
    (["--num-images", "0"], "error: --num-images must be an integer >= 1, got 0"),
    (["--num-images", "-1"], "error: --num-images must be an integer >= 1, got -1"),
    (["--seed", "-1"], "error: --seed must be an integer >= 0, got -1"),
    (["--eta", "nan"], "error: --eta must be a finite number, got nan"),
    (["--strength", "2"], "error: --strength must be a finite number in (0, 1], got 2.0"),
    (["--guidance-rescale", "1.5"], "error: --guidance-rescale must be a finite number in [0, 1], got 1.5"),
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
])
def test_bad_values_are_refused_before_the_model_is_built(small_config, tmp_path, monkeypatch, argv, message):
    message_seen = _refused(["--config", small_config, "--prompt", "a cat", "--out", str(tmp_path), "--quiet",
                             "--mode", "pynative"] + argv, monkeypatch, tmp_path)
    assert message_seen == message


@pytest.mark.parametrize("content, message", [
    (b"", "error: --prompts-file {path} holds no prompt (one prompt per line)"),
    (b"\n  \n", "error: --prompts-file {path} holds no prompt (one prompt per line)"),
    (b"\xff\xfe\x00garbage\x80", "error: --prompts-file {path} is not UTF-8 text (byte 0: invalid start byte)"),
    (b"a cat\x00\x01", "error: --prompts-file {path} holds NUL bytes: it is not a text file of prompts"),
])
def test_prompts_files_that_hold_no_prompts_are_named(small_config, tmp_path, monkeypatch, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    seen = _refused(["--config", small_config, "--prompts-file", str(path), "--out", str(tmp_path / "out"),
                     "--quiet"], monkeypatch, tmp_path)
    assert seen.startswith(message.format(path=path))


def test_model_dependent_refusals_name_the_flag(small_config, tmp_path):
    """t_struct's upper bound and the latent shape of --noise depend on the model, so they are checked once it
    is loaded - still before any step, and named by the flag the user typed, not the API argument."""
    common = ["--config", small_config, "--prompt", "a cat", "--quiet", "--mode", "pynative", "--height", "96",
              "--width", "96", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        infer.main(common + ["--t-struct", "5000"])
    assert (exit_info.value.code, str(exit_info.value)) == (2, "error: --t-struct must lie in [0, 1000], got 5000")
    noise = tmp_path / "noise.npy"
    np.save(noise, np.zeros((1, 4, 5, 5), np.float32))
    with pytest.raises(SystemExit) as exit_info:
        infer.main(common + ["--noise", str(noise)])
    assert exit_info.value.code == 2
    assert str(exit_info.value).startswith("error: --noise has shape (1, 4, 5, 5); this run needs (1, 4, ")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_bad_inputs_and_output_locations_are_refused_first(small_config, tmp_path, monkeypatch):
    common = ["--config", small_config, "--prompt", "a cat", "--quiet"]
    not_image = tmp_path / "photo.png"
    not_image.write_bytes(b"not a png")
    assert _refused(common + ["--init-image", str(not_image), "--out", str(tmp_path / "o")], monkeypatch,
                    tmp_path) == f"error: --init-image: {str(not_image)!r} is not an image: PIL recognises no " \
                                 "image format in it"
    assert _refused(common + ["--noise", str(not_image), "--out", str(tmp_path / "o")], monkeypatch,
                    tmp_path).startswith(f"error: --noise {str(not_image)!r} is not a numpy .npy array")
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    assert _refused(common + ["--out", str(a_file)], monkeypatch, tmp_path) == \
        f"error: --out {a_file}: {a_file} is a file, where a folder is needed for the images"
    assert _refused(common + ["--out", str(a_file / "x.png")], monkeypatch, tmp_path).endswith(
        f"{a_file} is a file, where a folder is needed for the images")
    assert _refused(common + ["--out", str(not_image)], monkeypatch, tmp_path) == \
        f"error: --out {not_image} exists; pass --overwrite to replace it, or give another name"


def test_a_read_only_output_folder_is_refused_first(small_config, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write into a read-only folder: deny it the way a read-only mount would
        allowed = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: (not str(path).startswith(str(locked))
                                                             and allowed(path, mode)))
    try:
        message = _refused(["--config", small_config, "--prompt", "a cat", "--quiet", "--out", str(locked / "new")],
                           monkeypatch, tmp_path)
    finally:
        locked.chmod(0o755)
    assert message == f"error: --out {locked / 'new'}: cannot write in {locked} (permission denied)"


def test_later_runs_continue_the_numbering_and_files_need_overwrite(tmp_path):
    common = ["--prompt", "a cat", "--steps", "1", "--height", "64", "--width", "64", "--quiet", "--mode", "pynative"]
    first = infer.main(common + ["--num-images", "2", "--out", str(tmp_path)])
    second = infer.main(common + ["--num-images", "2", "--out", str(tmp_path)])
    assert [os.path.basename(p) for p in first + second] == [
        "pangu_000.png", "pangu_001.png", "pangu_grid_000-001.png",
        "pangu_002.png", "pangu_003.png", "pangu_grid_002-003.png"]
    one = str(tmp_path / "one.png")
    assert infer.main(common + ["--out", one]) == [one]
    with pytest.raises(SystemExit, match="one.png exists; pass --overwrite"):
        infer.main(common + ["--out", one, "--seed", "1"])
    assert infer.main(common + ["--out", one, "--seed", "1", "--overwrite"]) == [one]
    with Image.open(one) as image:
        assert json.loads(image.text["parameters"])["seed"] == 1
    assert not [name for name in os.listdir(tmp_path) if "partial" in name or name.startswith(".")]


def test_ctrl_c_keeps_the_finished_images_and_exits_130(tmp_path, monkeypatch, capsys):
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    draw = PanGuDrawPipeline.__call__

    def interrupted_at_second_batch(self, prompt, **settings):
        if settings["first_image_index"] == 1:
            raise KeyboardInterrupt
        return draw(self, prompt, **settings)

    monkeypatch.setattr(PanGuDrawPipeline, "__call__", interrupted_at_second_batch)
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--prompt", "a cat", "--num-images", "3", "--batch-size", "1", "--steps", "1", "--height", "64",
                    "--width", "64", "--quiet", "--mode", "pynative", "--out", str(tmp_path)])
    assert exit_info.value.code == 130
    assert sorted(os.listdir(tmp_path)) == ["pangu_000.png"]
    saved = str(tmp_path / "pangu_000.png")
    assert f"interrupted: 1 of 3 images were finished and saved\n  {saved}" in capsys.readouterr().err


def test_overflowing_latents_stop_the_run_without_an_image(small_config, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--config", small_config, "--prompt", "a cat", "--steps", "2", "--ratio", "2:1",
                    "--guidance-scale", "3e38", "--quiet", "--mode", "pynative", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert str(exit_info.value).startswith("error: the latents became non-finite (")
    assert "at step 1/2 (timestep 999)" in str(exit_info.value) and "guidance_scale 3e+38" in str(exit_info.value)
    assert not os.path.exists(tmp_path / "o")


# ---- batch generation (--skip-existing, msrun) -----------------------------------------------------

def test_worker_slices_and_consecutive_batches():
    for total in (0, 1, 5, 7):
        for world in (1, 2, 3):
            covered = [i for rank in range(world) for i in infer.worker_slice(total, rank, world)]
            assert covered == list(range(total))
    assert infer.consecutive_batches([0, 1, 2, 4, 5, 9], 2) == [range(0, 2), range(2, 3), range(4, 6), range(9, 10)]


DEMO_BATCH = ["--steps", "3", "--mode", "pynative", "--batch-size", "1", "--quiet", "--skip-existing"]


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    """(prompts file, folder): one process's batch generation of three demo images (and index.jsonl), which
    both the resume test and the msrun test start from."""
    folder = tmp_path_factory.mktemp("batch")
    prompts = folder / "prompts.txt"
    prompts.write_text("a big red circle in the center\n一个蓝色的正方形\na small green triangle\n", encoding="utf-8")
    infer.main(["--prompts-file", str(prompts), "--out", str(folder / "one")] + DEMO_BATCH)
    return str(prompts), folder / "one"


def test_skip_existing_resumes_a_stopped_run_and_writes_an_index(batch_run, tmp_path):
    import shutil

    prompts, done = batch_run
    out = tmp_path / "generated"
    shutil.copytree(done, out)  # the first run's folder (test_msrun_workers_draw_the_single_process_images reads it)
    args = ["--prompts-file", prompts, "--out", str(out)] + DEMO_BATCH
    names = sorted(os.listdir(out))
    assert names == ["index.jsonl", "pangu_000.png", "pangu_001.png", "pangu_002.png"]
    first = {n: (out / n).read_bytes() for n in names}
    (out / "pangu_001.png").unlink()  # as if the run had stopped before it
    stamps = {n: os.stat(out / n).st_mtime_ns for n in ("pangu_000.png", "pangu_002.png")}
    drawn = infer.main(args)
    assert [os.path.basename(p) for p in drawn] == ["pangu_001.png", "index.jsonl"]
    assert {n: (out / n).read_bytes() for n in names} == first
    assert {n: os.stat(out / n).st_mtime_ns for n in stamps} == stamps  # the others were not drawn again
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["file"], r["prompt"], r["image_index"], r["seed"]) for r in rows] == [
        ("pangu_000.png", "a big red circle in the center", 0, 0), ("pangu_001.png", "一个蓝色的正方形", 1, 0),
        ("pangu_002.png", "a small green triangle", 2, 0)]
    assert rows[0]["settings"]["num_inference_steps"] == 3


def test_msrun_workers_draw_the_single_process_images(batch_run, tmp_path):
    """Two msrun workers, each its contiguous slice of the images: the single process's PNGs, byte for byte,
    and its index."""
    import socket
    import subprocess

    prompts, one_folder = batch_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="1", GLOG_v="3")
    subprocess.run(["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", "--join=True",
                    f"--log_dir={tmp_path}/logs", os.path.join(repo, "tools", "infer.py"), "--prompts-file", prompts,
                    "--out", str(tmp_path / "two")] + DEMO_BATCH, cwd=repo, env=env, check=True, timeout=900,
                   capture_output=True)
    one, two = sorted(os.listdir(one_folder)), sorted(os.listdir(tmp_path / "two"))
    assert one == two == ["index.jsonl", "pangu_000.png", "pangu_001.png", "pangu_002.png"]
    for name in one:
        assert (one_folder / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
