"""Coop-Diffusion sub-module 2 (resolution bridge) against the two-pass baseline, same models, one process.

Bridge: the low-resolution model runs the steps above T_low (+1 evaluation for x0 at T_low), then the
high-resolution model runs the rest. Baseline: a full low-resolution run, decode, upsample, then an
image-to-image pass at high resolution over the same tail of the schedule. Prints UNet evaluations at
each resolution and seconds for both (the compile of every graph happens in a warm-up run first).

    python bench/coop_resolution.py --config tiny --low 256 256 --high 512 512 --steps 20 --t-low 500
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--low", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--high", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--t-low", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each path")
    args = parser.parse_args()

    import mindspore as ms

    from pangu_draw_ms.config import CoopRecipe, from_dict, load_config
    from pangu_draw_ms.pipelines.coop import CoopPipeline
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    from timing import interleaved_medians

    ms.set_context(mode=ms.GRAPH_MODE)
    config = dataclasses.replace(load_config(args.config), structure_buckets=(tuple(args.low), tuple(args.high)))
    pipe = PanGuDrawPipeline.from_config(config)
    recipe = from_dict(CoopRecipe, {"partners": [{"name": "low", "kind": "pangu", "path": "main", "height": args.low[0],
                                                  "width": args.low[1]}],
                                    "resolution_bridge": {"partner": "low", "t_low": args.t_low}})
    coop = CoopPipeline(pipe, recipe)
    prompt = "一个红色的圆形 a red circle"
    high = dict(height=args.high[0], width=args.high[1])
    low = dict(height=args.low[0], width=args.low[1])
    timesteps = pipe.schedule.timesteps(args.steps, config.sampling.spacing)
    tail = sum(int(t) <= args.t_low for t in timesteps)
    strength = tail / args.steps

    def bridge():
        return coop(prompt, num_inference_steps=args.steps, **high)

    def two_pass():
        first = pipe(prompt, num_inference_steps=args.steps, **low)
        return pipe(prompt, num_inference_steps=args.steps, init_image=first.images[0], strength=strength, **high)

    outputs = {"bridge": bridge(), "two-pass": two_pass()}  # warm-up: compile every graph of both paths
    seconds = interleaved_medians({"bridge": bridge, "two-pass": two_pass}, warmup=0, repeats=args.repeats)
    results = {name: (seconds[name], outputs[name]) for name in outputs}
    evaluations = results["bridge"][1].info["unet_evaluations"]
    print(f"config={args.config} steps={args.steps} t_low={args.t_low} low={args.low} high={args.high}")
    print(f"bridge:   {evaluations['low']} low-res + {evaluations['main']} high-res UNet steps (x guidance batch), "
          f"{results['bridge'][0]:.2f} s")
    print(f"two-pass: {args.steps} low-res + {tail} high-res UNet steps, one extra decode+encode, "
          f"{results['two-pass'][0]:.2f} s")
    print(f"ratio bridge/two-pass: {results['bridge'][0] / results['two-pass'][0]:.2f}")


if __name__ == "__main__":
    main()
