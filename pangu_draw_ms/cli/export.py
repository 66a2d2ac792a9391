"""Export a model as MindIR graphs for MindSpore Lite (or any runtime that follows the manifest).

    python tools/export.py --out exported/demo                          # the demo model, its square bucket
    python tools/export.py --model-dir pangu_v3/ --height 1024 --width 1024 --num-prompts 2 --out exported/v3

Writes conditioner.mindir (both text encoders + the bucket embedding), step_structure.mindir and
step_texture.mindir (one Euler step of each generator with every guidance branch batched), vae_decoder.mindir,
the tokenizer files and manifest.json (shapes, dtypes, the bucket, the schedule and each step's expert and
coefficients, how the guidance rows are built); see pangu_draw_ms/pipelines/mindir.py. ``python -c "from
pangu_draw_ms.pipelines.mindir import MindIRPipeline"`` runs an export with its graphs alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from .model_args import add_model_arguments, build_pipeline, run_with_clear_errors


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the graphs and the manifest")
    what = p.add_argument_group("what the graphs are built for (defaults: the model config's sampling section)")
    what.add_argument("--height", type=int)
    what.add_argument("--width", type=int)
    what.add_argument("--ratio", help="W:H, the nearest bucket")
    what.add_argument("--num-prompts", type=int, default=1, help="prompts per call (one image each)")
    what.add_argument("--steps", type=int, help="steps of the manifest's schedule")
    what.add_argument("--guidance-scale", type=float, help="the manifest's default branch weights (an input)")
    what.add_argument("--negative-prompt")
    add_model_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="MindSpore's and our info logs")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    return run_with_clear_errors(run, parse_args(argv))


def run(args) -> dict:
    import mindspore as ms

    from pangu_draw_ms.pipelines.mindir import export_pipeline

    if args.recipe:
        raise ValueError("--recipe: Coop-Diffusion runs are not exported (their steps hold every partner's networks "
                         "and bridges); export the main model")
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if ms.get_context("device_target") != args.device:
        ms.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE)  # export traces graphs; --mode does not apply
    pipe, source = build_pipeline(args)
    started = time.time()
    settings = {k: v for k, v in dict(height=args.height, width=args.width, ratio=args.ratio,
                                      num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                      negative_prompt=args.negative_prompt).items() if v is not None}
    manifest = export_pipeline(pipe, args.out, args.num_prompts, **settings)
    bucket = manifest["bucket"]
    print(f"exported {source} at {bucket['height']}x{bucket['width']}, {args.num_prompts} prompt(s) per call, "
          f"into {args.out} in {time.time() - started:.0f} s:", file=sys.stderr)
    for entry in manifest["graphs"].values():
        print(f"  {entry['file']}")
    return manifest
