"""Prompt following of a demo model: over held-out captions and several seeds, the fraction of generated
images whose colour and shape match the prompt, separately for English and Chinese prompts.

    python tools/eval_demo.py --model pangu_draw_ms/demo/model --heldout outputs/demo/data/heldout.jsonl \
        --seeds 0 1 2 --out outputs/demo/eval/decoupled

Colour: the median foreground colour named by the nearest palette colour; shape: a small classifier trained
on masks of images drawn by the dataset generator (pangu_draw_ms.demo.judge). Writes OUT/results.json and
OUT/samples.png (one row per prompt and language, one column per seed).

Images come from PanGuDrawPipeline.from_pretrained(--model): time-decoupled Euler sampling with
classifier-free guidance against the empty prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Sequence

import numpy as np

from pangu_draw_ms.cli.model_args import add_lora_arguments
from pangu_draw_ms.demo.shapes import NEW_SHAPES


def load_pipeline(model_dir: str, args=None):
    """``generate(prompts, seed, height, width, steps, guidance) -> uint8 (N, H, W, 3)`` over a model directory
    (with the LoRAs of ``args``' --lora flags merged in)."""
    from pangu_draw_ms.cli.model_args import with_loras
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    pipe = PanGuDrawPipeline.from_pretrained(model_dir)
    if args is not None:
        with_loras(args, pipe)

    def generate(prompts, seed, height, width, steps, guidance):
        out = pipe(list(prompts), negative_prompt="", height=height, width=width, num_inference_steps=steps,
                   sampler="euler", guidance_scale=guidance, seed=seed, num_images_per_prompt=1)
        return np.stack([np.asarray(image.convert("RGB")) for image in out.images])

    return generate


def evaluate(generate, rows: List[dict], seeds: Sequence[int], height: int, width: int, steps: int,
             guidance: float, classifier) -> Dict:
    """Generate every (row, language, seed) and judge it; returns per-language scores and the images."""
    from pangu_draw_ms.demo.judge import judge

    results = {"per_language": {}, "images": {}}
    for language in ("en", "zh"):
        prompts = [row[f"caption_{language}"] for row in rows]
        hits = {"color": [], "shape": [], "both": []}
        for seed in seeds:
            images = generate(prompts, seed, height, width, steps, guidance)
            colors, shapes = judge(images, classifier)
            for row, color, shape in zip(rows, colors, shapes):
                hits["color"].append(color == row["color"])
                hits["shape"].append(shape == row["shape"])
                hits["both"].append(color == row["color"] and shape == row["shape"])
            results["images"][(language, seed)] = images
        results["per_language"][language] = {k: float(np.mean(v)) for k, v in hits.items()}
        results["per_language"][language]["images"] = len(hits["color"])
    return results


def save_grid(path: str, results: Dict, rows: List[dict], seeds: Sequence[int]) -> None:
    """Rows: prompt x language; columns: seeds."""
    from pangu_draw_ms.images import image_grid

    cells = [results["images"][(language, seed)][r] for r in range(len(rows)) for language in ("en", "zh")
             for seed in seeds]
    image_grid(cells, columns=len(seeds)).save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--heldout", required=True, help="heldout.jsonl written by tools/make_demo_data.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", required=True, help="output folder for results.json and samples.png")
    parser.add_argument("--recognise-shapes", nargs="+", default=[], choices=sorted(NEW_SHAPES),
                        help="shapes the judge also tells apart besides the world's and the prompts' (e.g. star, to "
                             "see whether a LoRA that teaches it draws it where it was not asked for)")
    add_lora_arguments(parser)
    args = parser.parse_args(argv)

    from pangu_draw_ms.runtime import quiet_mindspore

    quiet_mindspore()  # before MindSpore is imported: it reads its log level once
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    from pangu_draw_ms.demo.judge import ShapeClassifier, write_report
    from pangu_draw_ms.demo.shapes import SHAPES

    with open(args.heldout, "r", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    start = time.time()
    # The world's shapes and any other a row asks for (the demo LoRA's star), so that it can be recognised.
    shapes = tuple(SHAPES) + tuple(sorted(({row["shape"] for row in rows} | set(args.recognise_shapes)) - set(SHAPES)))
    classifier = ShapeClassifier.trained_on_renders(shapes=shapes)
    generate = load_pipeline(args.model, args)
    results = evaluate(generate, rows, args.seeds, args.height, args.width, args.steps, args.guidance, classifier)
    os.makedirs(args.out, exist_ok=True)
    save_grid(os.path.join(args.out, "samples.png"), results, rows, args.seeds)
    report = {"model": args.model, "loras": args.lora + args.lora_structure + args.lora_texture,
              "judged_shapes": list(shapes), "prompts": len(rows), "seeds": args.seeds, "height": args.height,
              "width": args.width, "steps": args.steps, "guidance": args.guidance,
              "seconds": round(time.time() - start, 1), **results["per_language"]}
    return write_report(args.out, report)


if __name__ == "__main__":
    main()
