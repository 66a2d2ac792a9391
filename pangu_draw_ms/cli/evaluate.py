"""Evaluate a PanGu-Draw model as the paper does: draw images for a prompt set, then measure them.

    python tools/evaluate.py                                    # the demo model, demo evaluators, en + zh
    python tools/evaluate.py --model-dir converted/ --prompts captions_val2014.json --num-prompts 30000 \\
        --metrics fid,clip --fid-reference coco_val2014.npz --inception pt_inception-2015-12-05-6726825d.pth \\
        --clip-model clip-vit-large-patch14/ --out eval/coco30k
    msrun --worker_num=8 --local_worker_num=8 tools/evaluate.py ...   # each worker draws its slice

Images go to OUT/seed_<s>/<i>.png; a run that is stopped and started again keeps the images on disk and
draws only the missing ones (the same images: noise comes from (seed, image index)). Then rank 0 measures
every seed's images and writes OUT/report.json and OUT/report.md (model, settings, prompts, seeds, each
metric's per-seed values, mean and std, time taken).

Metrics (``--metrics``, comma-separated):

* ``fid``: FID against ``--fid-reference`` (a folder of images or a pytorch-fid ``.npz`` of mu/sigma) with
  the FID Inception weights ``--inception`` (pytorch-fid's ``pt_inception-2015-12-05`` file);
* ``is``: Inception Score (10 splits) with the same network;
* ``clip``: CLIP-score with ``--clip-model`` (a transformers CLIPModel folder), English prompts;
* ``cnclip``: CN-CLIP-score with ``--cn-clip-model`` (a Chinese-CLIP checkpoint), Chinese prompts;
* ``democlip``, ``fd_democlip``, ``is_democlip``, ``judge``: the demo world's evaluators (the default for the
  demo model): CLIP-score with the shipped demo CLIP, Fréchet distance in its image features against renders
  of the prompts' scenes, the IS formula over its zero-shot colour x shape class probabilities, and the
  colour/shape judge.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from .model_args import add_model_arguments, build_pipeline, run_with_clear_errors, uses_demo_model, with_recipe

METRICS = ("fid", "is", "clip", "cnclip", "democlip", "fd_democlip", "is_democlip", "judge")
DEMO_METRICS = ("democlip", "fd_democlip", "is_democlip", "judge")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prompts = p.add_argument_group("prompts (default for the demo model: its held-out captions, en + zh)")
    prompts.add_argument("--prompts", help="prompts file: .txt (one per line), .jsonl (prompt, lang), COCO captions "
                                           ".json, or a COCO-CN caption file")
    prompts.add_argument("--lang", choices=["en", "zh"], help="the prompts' language (default: from each prompt)")
    prompts.add_argument("--num-prompts", type=int, help="draw this many prompts from the file (seeded)")
    prompts.add_argument("--prompt-seed", type=int, default=0, help="seed of that draw")

    sampling = p.add_argument_group("sampling (defaults: the model config's sampling section)")
    sampling.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds: one image set each")
    sampling.add_argument("--steps", type=int)
    sampling.add_argument("--sampler")
    sampling.add_argument("--guidance-scale", type=float)
    sampling.add_argument("--height", type=int)
    sampling.add_argument("--width", type=int)
    sampling.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")

    add_model_arguments(p)

    metrics = p.add_argument_group("metrics")
    metrics.add_argument("--metrics", help=f"comma-separated, of {', '.join(METRICS)} (default: the demo "
                                           "evaluators for the demo model; otherwise required)")
    metrics.add_argument("--fid-reference", help="fid: a folder of reference images or a pytorch-fid .npz (mu, sigma)")
    metrics.add_argument("--inception", help="fid/is: the FID Inception weights (pt_inception-2015-12-05-*.pth, or "
                                             "converted with tools/convert.py)")
    metrics.add_argument("--clip-model", help="clip: a transformers CLIPModel folder (config.json + weights)")
    metrics.add_argument("--cn-clip-model", help="cnclip: a Chinese-CLIP checkpoint (.pt of the cn_clip package)")
    metrics.add_argument("--cn-clip-arch", default="ViT-B-16:RoBERTa-wwm-ext-base-chinese",
                         help="cnclip: vision:text architecture names of the cn_clip package")
    metrics.add_argument("--demo-clip", help="democlip/fd_democlip: the demo CLIP folder (default: the shipped one)")

    out = p.add_argument_group("output")
    out.add_argument("--out", default="outputs/eval", help="folder of the images and the report")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    out.add_argument("--verbose", action="store_true", help="MindSpore's and our info logs")
    return p.parse_args(argv)


def chosen_metrics(args) -> List[str]:
    if not args.metrics:
        if uses_demo_model(args):
            return list(DEMO_METRICS)
        raise ValueError(f"give --metrics (of {', '.join(METRICS)}): the demo evaluators fit only the demo model")
    names = [name.strip() for name in args.metrics.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {', '.join(unknown) or '(none)'}; valid: {', '.join(METRICS)}")
    return names


def run_settings(args, prompts) -> dict:
    """What decides the images (recorded in run.json: a resumed run must match)."""
    return {"model": args.model_dir or args.structure_ckpt or args.config or "demo", "texture": args.texture_ckpt,
            "prompts": args.prompts or "demo held-out captions", "lang": args.lang, "num_prompts": len(prompts),
            "prompt_seed": args.prompt_seed, "steps": args.steps, "sampler": args.sampler,
            "guidance_scale": args.guidance_scale, "height": args.height, "width": args.width,
            "precision": args.precision, "recipe": _recipe_record(args.recipe),
            "prompt_keys_digest": _digest([p.key + p.text for p in prompts])}


def _recipe_record(path: Optional[str]) -> Optional[str]:
    """The recipe as run.json records it: its file's contents (another recipe in the same file draws other images)."""
    if not path:
        return None
    from pangu_draw_ms.config import resolve_config_path

    with open(resolve_config_path(path), encoding="utf-8") as f:
        return f.read()


def _digest(items) -> str:
    import hashlib

    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()[:16]


def load_run_prompts(args):
    from pangu_draw_ms.evaluation.prompts import load_prompts, sample_prompts

    if args.prompts:
        prompts = load_prompts(args.prompts, args.lang)
    elif uses_demo_model(args):
        from pangu_draw_ms.evaluation.demo import heldout_prompts

        prompts = [p for p in heldout_prompts() if args.lang in (None, p.lang)]
    else:
        raise ValueError("give --prompts (the demo's held-out captions fit only the demo model)")
    return sample_prompts(prompts, args.num_prompts, args.prompt_seed)


def main(argv: Optional[List[str]] = None) -> Optional[dict]:
    return run_with_clear_errors(run, parse_args(argv))


def run(args: argparse.Namespace) -> Optional[dict]:
    import mindspore as ms
    from tqdm import tqdm

    from pangu_draw_ms.evaluation.generation import check_run_settings, draw_missing, image_jobs, shard
    from pangu_draw_ms.evaluation.measure import RunMeasures, check_metric_inputs
    from pangu_draw_ms.evaluation.report import collect, write_report
    from pangu_draw_ms.training.trainer import barrier

    metrics = chosen_metrics(args)
    check_metric_inputs(metrics, vars(args))
    prompts = load_run_prompts(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if ms.get_context("device_target") != args.device:
        ms.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    from pangu_draw_ms.runtime import msrun_rank_and_world

    rank, world = msrun_rank_and_world()
    if rank is None:
        return None  # msrun's scheduler coordinates the workers and draws nothing
    started = time.time()
    settings = run_settings(args, prompts)
    check_run_settings(args.out, settings, write=rank == 0)
    jobs = image_jobs(prompts, args.seeds, args.out)
    mine = shard(jobs, rank, world)
    pipe, source = build_pipeline(args)
    generate, source = with_recipe(args, pipe, source)
    if rank == 0:
        print(f"pangu_draw_ms: evaluating {source}: {len(prompts)} prompts x {len(args.seeds)} seeds", file=sys.stderr)

    request = dict(height=args.height, width=args.width, num_inference_steps=args.steps, sampler=args.sampler,
                   guidance_scale=args.guidance_scale)
    plan = pipe.plan(prompts[0].text, **request)  # the config's defaults filled in, for the report

    def draw(texts, seed, first):
        return generate(texts, seed=seed, first_image_index=first, **request).images

    bar = None if args.quiet else tqdm(total=len(mine), desc=f"rank {rank} images", unit="img", file=sys.stderr,
                                       initial=sum(os.path.isfile(job.path) for job in mine))
    draw_missing(draw, mine, args.batch_size, progress=None if bar is None else bar.update)
    if bar is not None:
        bar.close()
    barrier(world)
    generated = time.time()
    if rank != 0:
        return None
    measure = RunMeasures(vars(args))
    per_seed = [measure(metrics, [job for job in jobs if job.seed == seed]) for seed in args.seeds]
    sampling = {"steps": plan.num_inference_steps, "sampler": plan.sampler.name, "guidance_scale": plan.guidance_scale,
                "size": f"{plan.height}x{plan.width}"}
    report = {"model": source, "settings": sampling,
              "prompts": {"source": settings["prompts"], "count": len(prompts),
                          "languages": {lang: sum(p.lang == lang for p in prompts) for lang in ("en", "zh")
                                        if any(p.lang == lang for p in prompts)}},
              "seeds": list(args.seeds), "images": len(jobs), "workers": world, "metrics": collect(per_seed),
              "seconds": {"generate": generated - started, "metrics": time.time() - generated}}
    paths = write_report(args.out, report)
    print(open(paths["md"], encoding="utf-8").read())
    return report


if __name__ == "__main__":
    main()
