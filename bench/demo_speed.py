"""The demo model as a user meets it: a warm image, a batch, and tools/infer.py from process start to PNG.

    python bench/demo_speed.py                 # every measurement below
    python bench/demo_speed.py --skip-cli      # only the in-process ones

1. One prompt, 40 Euler steps, warm (graphs compiled): each step one compiled graph vs the host loop,
   interleaved, medians and ratio.
2. A batch of 4 prompts in one call vs one prompt (warm, interleaved): the batch's cost in single images,
   and where it goes: at 1 kernel thread and at all of them, the calls split into a fixed cost and a cost per
   image, and the batch's UNet work in GFLOP/s against this machine's matrix-multiply peak (numpy's BLAS on
   1024 x 1024 ... 2048 x 2048 in a child process): what a batch of 4 in under 2x one image would need.
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
    batch_accounting(pipe, settings, repeats)


def batch_accounting(pipe, settings, repeats: int) -> None:
    """The fixed and per-image parts of a call, T(n) = fixed + n x per_image from n = 1 and 4 (a batch of 4
    under 2x one image needs fixed > 2 x per_image), at 1 kernel thread and at all of them, and the batch's
    UNet FLOP rate against the machine's matrix-multiply peak."""
    from pangu_draw_ms import runtime
    from pangu_draw_ms.diffusion.guidance import guidance_weights
    from pangu_draw_ms.training.compute import unet_forward_flops

    from timing import interleaved_medians

    threads = runtime.cpu_threads()
    counts = sorted({1, threads})

    def call(prompts, count):
        def run():
            runtime.set_cpu_threads(count)
            return pipe(prompts, **settings)
        return run

    sides = {(n, count): call(PROMPT if n == 1 else BATCH, count) for count in counts for n in (1, len(BATCH))}
    medians = interleaved_medians(sides, 1, repeats)
    runtime.set_cpu_threads(threads)
    n = len(BATCH)
    for count in counts:
        one, many = medians[(1, count)], medians[(n, count)]
        per_image = (many - one) / (n - 1)
        print(f"kernel threads {count}: 1 prompt {one:.3f} s, {n} prompts {many:.3f} s ({many / one:.2f}x) = "
              f"fixed {one - per_image:.3f} s + {per_image:.3f} s per image")
    info = pipe(BATCH, **settings).info
    config = pipe.config
    factor = config.vae.downsample_factor
    context = max(encoder.max_position_embeddings for encoder in config.conditioner.encoders)
    branches = sum(1 for weight in guidance_weights(info["guidance_scale"], info["style_scales"]).values()
                   if weight != 0)
    forward = unet_forward_flops(config.unet, (info["height"] // factor, info["width"] // factor), context)
    flops = forward * branches * n * info["num_inference_steps"]
    peak = matmul_peak(threads)
    many, one = medians[(n, threads)], medians[(1, threads)]
    print(f"{n} prompts: UNet {flops / 1e9:.1f} GFLOP ({branches} guidance branches) in {many:.3f} s = "
          f"{flops / many / 1e9:.0f} GFLOP/s, {flops / many / peak:.0%} of this machine's matrix-multiply peak "
          f"({peak / 1e9:.0f} GFLOP/s at {threads} threads); under 2x one image needs "
          f"{flops / (2 * one) / 1e9:.0f} GFLOP/s ({flops / (2 * one) / peak:.0%})")


PEAK_PROBE = """
import time
import numpy as np
best = 0.0
for size in (1024, 1536, 2048):
    a = np.random.rand(size, size).astype(np.float32)
    a @ a
    for _ in range(3):
        started = time.perf_counter()
        a @ a
        best = max(best, 2 * size ** 3 / (time.perf_counter() - started))
print(best)
"""


def matmul_peak(threads: int) -> float:
    """FLOP/s of numpy's float32 matrix multiply at ``threads`` threads (the best of a few sizes), in a child
    process: BLAS reads its thread count when it loads."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE], check=True, capture_output=True, text=True, env=env)
    return float(result.stdout.strip().splitlines()[-1])


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
