"""Measure prompt enhancement on the demo world (the paper's Fig. 8 in miniature): the held-out short prompts
(6 colour-shape pairs no training pair rewrites, English and Chinese) drawn as they are (``raw``) and after each
enhancer's greedy rewrite, with the same seeds; reward, demo aesthetic score, demo CLIP-score against the SHORT
prompt and the demo judge's colour-and-shape agreement, mean and std over the seeds.

    python tools/eval_enhancer.py --enhancer sft=outputs/demo/prompt_sft_enhancer \\
        --enhancer raft=outputs/demo/prompt_raft_enhancer --out outputs/demo/eval_enhancer \\
        --grid docs/images/prompt_enhancement.png

Writes OUT/report.json (every value and every rewrite) and OUT/report.md (the table); --grid: one row per
held-out prompt, one column per arm (seed 0), cells shown at twice their size.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enhancer", action="append", default=[], metavar="NAME=DIR",
                        help="an arm: the enhancer in DIR (repeatable; default: the shipped demo enhancer as 'demo')")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--aesthetic-weight", type=float, default=1.0, help="the reward's weights (RAFT's)")
    parser.add_argument("--clip-weight", type=float, default=0.1)
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--grid", help="also write the picture grid (seed 0) here")
    args = parser.parse_args(argv)
    arms = dict(item.split("=", 1) for item in args.enhancer) if args.enhancer else {}
    if any(not name or not path for name, path in arms.items()):
        parser.error("--enhancer takes NAME=DIR")

    from pangu_draw_ms.runtime import quiet_mindspore

    quiet_mindspore()
    import mindspore as ms

    from pangu_draw_ms.cli.model_args import DEMO_DIR
    from pangu_draw_ms.demo.judge import ShapeClassifier
    from pangu_draw_ms.evaluation.aesthetic import DEMO_AESTHETIC_DIR, load_aesthetic
    from pangu_draw_ms.evaluation.demo import load_demo_clip
    from pangu_draw_ms.evaluation.enhancement import measure_arm, summary_rows
    from pangu_draw_ms.images import image_grid
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline
    from pangu_draw_ms.prompting.demo_pairs import heldout_prompt_rows
    from pangu_draw_ms.prompting.enhancer import DEMO_ENHANCER_DIR, PromptEnhancer

    ms.set_context(mode=ms.GRAPH_MODE)
    arms = arms or {"demo": DEMO_ENHANCER_DIR}
    seeds = [int(s) for s in args.seeds.split(",")]
    prompts = heldout_prompt_rows()
    drawn = {"raw": [p["short"] for p in prompts]}
    for name, directory in arms.items():
        drawn[name] = [c[0] or p["short"] for p, c in zip(prompts, PromptEnhancer.from_dir(directory).enhance(
            [p["short"] for p in prompts]))]
    pipe = PanGuDrawPipeline.from_pretrained(DEMO_DIR)
    clip, aesthetic = load_demo_clip(), load_aesthetic(DEMO_AESTHETIC_DIR)
    classifier = ShapeClassifier.trained_on_renders()
    settings = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    started = time.time()
    results = {arm: measure_arm(pipe, clip, aesthetic, prompts, texts, seeds, settings, args.aesthetic_weight,
                                args.clip_weight, classifier) for arm, texts in drawn.items()}
    rows = summary_rows(results)
    os.makedirs(args.out, exist_ok=True)
    report = {"seeds": seeds, "steps": args.steps, "guidance_scale": args.guidance_scale,
              "reward": {"aesthetic_weight": args.aesthetic_weight, "clip_weight": args.clip_weight},
              "enhancers": arms, "prompts": prompts, "drawn": drawn, "rows": rows,
              "seconds": round(time.time() - started, 1)}
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    lines = ["| metric | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for metric in results["raw"]["per_seed"]:
        cells = [f"{r['mean']:.2f} ± {r['std']:.2f}" for r in rows if r["metric"] == metric]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.grid:
        from PIL import Image

        cells = [Image.fromarray(results[arm]["images"][0][i]) for i in range(len(prompts)) for arm in results]
        cells = [cell.resize((2 * cell.width, 2 * cell.height), Image.NEAREST) for cell in cells]  # 64 px is small
        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
        image_grid(cells, columns=len(results)).save(args.grid)
        print(args.grid)
    return report


if __name__ == "__main__":
    main()
