"""The demo model as a user meets it: a warm image, a batch, and tools/infer.py from process start to PNG.

    python bench/demo_speed.py                 # every measurement below
    python bench/demo_speed.py --skip-cli      # only the in-process ones

1. One prompt, 40 Euler steps, warm (graphs compiled): each step one compiled graph vs the host loop,
   interleaved, medians and ratio.
2. A batch of 4 prompts in one call vs one prompt (warm, interleaved): the batch's cost in single images.
3. ``tools/infer.py`` wall time from process start to the PNG: without MindSpore's compile cache, with a
   cold cache (first run fills it), and with the cache warm (a second run reads it).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = "一个红色的圆形"
BATCH = ["一个红色的圆形", "a blue square on the left", "一个绿色的三角形", "a big yellow cross"]


def in_process(steps: int, repeats: int) -> None:
    import mindspore as ms

    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    from timing import interleaved_medians, report

    ms.set_context(mode=ms.GRAPH_MODE)
    pipe = PanGuDrawPipeline.from_pretrained(os.path.join(ROOT, "pangu_draw_ms", "demo"), show_progress=False)
    settings = dict(num_inference_steps=steps, sampler="euler", seed=0)
    started = time.perf_counter()
    pipe(PROMPT, **settings)
    print(f"first call in this process (compiles text encoders, both step graphs, VAE): "
          f"{time.perf_counter() - started:.2f} s")
    pipe(PROMPT, compiled=False, **settings)
    pipe(BATCH, **settings)
    one = interleaved_medians({"compiled step": lambda: pipe(PROMPT, **settings),
                               "host loop": lambda: pipe(PROMPT, compiled=False, **settings)}, 0, repeats)
    print(f"1 image, {steps} Euler steps, warm: {report(one)}")
    batch = interleaved_medians({"1 prompt": lambda: pipe(PROMPT, **settings),
                                 f"{len(BATCH)} prompts": lambda: pipe(BATCH, **settings)}, 0, repeats)
    print(f"batch: {report(batch)}")


def cli_seconds(out_dir: str, extra) -> float:
    command = [sys.executable, os.path.join(ROOT, "tools", "infer.py"), "--prompt", PROMPT, "--steps", "40",
               "--quiet", "--out", out_dir] + list(extra)
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def cli() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        rows = [("no compile cache", cli_seconds(os.path.join(tmp, "a"), ["--compile-cache", "off"])),
                ("compile cache, cold", cli_seconds(os.path.join(tmp, "b"), ["--compile-cache", cache])),
                ("compile cache, warm", cli_seconds(os.path.join(tmp, "c"), ["--compile-cache", cache])),
                ("no compile cache, again", cli_seconds(os.path.join(tmp, "d"), ["--compile-cache", "off"]))]
    for label, seconds in rows:
        print(f"tools/infer.py, process start to PNG, {label}: {seconds:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-cli", action="store_true")
    args = parser.parse_args()
    in_process(args.steps, args.repeats)
    if not args.skip_cli:
        cli()


if __name__ == "__main__":
    main()
