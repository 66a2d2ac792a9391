"""Peak host memory of a full-size PanGu-Draw run (two 2.57B UNets, both text encoders, the VAE) in each
memory mode, each in its own process (peak RSS from getrusage).

    python bench/pipeline_memory.py                       # all modes, 1024x1024, 2 steps
    python bench/pipeline_memory.py --modes sequential:fp16 --steps 2

A mode is ``<memory>:<weights dtype>``: ``resident`` keeps every network, ``sequential`` only the one
in use. Weights are seeded random (memory does not depend on their values); the run is real: text
encoding, 1 structure + 1 texture step at 2 steps, VAE decode. Resident fp32 (about 24 GB of weights)
does not fit a 24 GB machine and is skipped unless named.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODES = ("sequential:fp32", "sequential:fp16", "resident:fp16")


def child(mode: str, size, steps: int, config_name: str) -> dict:
    sys.path.insert(0, ROOT)
    import mindspore as ms

    from pangu_draw_ms.config import load_config
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    ms.set_context(mode=ms.GRAPH_MODE)
    memory, weights_dtype = mode.split(":")
    built = []
    pipe = PanGuDrawPipeline.from_config(load_config(config_name), memory=memory, weights_dtype=weights_dtype)
    pipe.components.on_build = lambda name: built.append(
        (name, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20))
    start = time.perf_counter()
    out = pipe("一只戴着墨镜的猫 a cat wearing sunglasses", height=size[0], width=size[1], num_inference_steps=steps,
               switch_rule="exact")
    return {"mode": mode, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "seconds": time.perf_counter() - start, "image": list(out.images[0].size),
            "experts": [name for _, name in out.info["expert_trace"]],
            "peak_after_build_gib": {name: round(rss, 2) for name, rss in built}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES))
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--config", default="pangu_draw_v3")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.size, args.steps, args.config)))
        return
    for mode in args.modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--size", *map(str, args.size),
               "--steps", str(args.steps), "--config", args.config]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{mode}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] }")
            continue
        r = json.loads(lines[0][7:])
        print(f"{mode:18s} peak RSS {r['peak_rss_gib']:.2f} GiB  run {r['seconds']:.0f} s  image {r['image']}  "
              f"peak after each build {r['peak_after_build_gib']}")


if __name__ == "__main__":
    main()
