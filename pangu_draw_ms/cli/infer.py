"""Generate images with PanGu-Draw: time-decoupled sampling at any resolution bucket.

    python tools/infer.py --prompt "一个红色的圆形"                       # the embedded default model
    python tools/infer.py --model-dir converted/ --prompt "a cat" --ratio 16:9 --num-images 4
    python tools/infer.py --structure-ckpt pangu_high_timestamp-c6344411.ckpt \\
        --texture-ckpt pangu_low_timestamp-127da122.ckpt --device Ascend --prompt "..."

Every image is saved as a PNG whose text metadata holds the prompt and all settings; several images
also give a grid. Defaults (steps, sampler, guidance, style scales, switch rule) come from the model
config's ``sampling`` section.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .model_args import add_model_arguments, build_pipeline, run_with_clear_errors

# Default batch: images per UNet call such that the batched guidance branches hold at most this many latent
# pixels - one 1024 x 1024 image (128 x 128 latents) with classifier-free guidance.
BATCH_LATENT_PIXELS = 2 * 128 * 128
MAX_AUTO_BATCH = 8


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to draw")
    what.add_argument("--prompt", action="append", help="a prompt (Chinese, English or both); repeatable")
    what.add_argument("--prompts-file", help="a text file with one prompt per line")
    what.add_argument("--negative-prompt", default=None, help="the unconditional branch (default: config, usually '')")
    what.add_argument("--num-images", type=int, default=1, help="images per prompt")
    what.add_argument("--seed", type=int, default=0)
    what.add_argument("--noise", help="a .npy of initial noise (B, C, h, w) instead of drawing it from --seed")
    what.add_argument("--init-image", help="image-to-image: the starting image")
    what.add_argument("--strength", type=float, default=0.8, help="image-to-image: share of the schedule to run")

    size = p.add_argument_group("size (a resolution bucket of the model)")
    size.add_argument("--height", type=int)
    size.add_argument("--width", type=int)
    size.add_argument("--ratio", help="aspect ratio W:H, e.g. 16:9 (nearest bucket)")
    size.add_argument("--snap", action="store_true", help="snap --height/--width to the nearest bucket")
    size.add_argument("--list-buckets", action="store_true", help="print the model's buckets and exit")

    sampling = p.add_argument_group("sampling (defaults: the config's sampling section)")
    sampling.add_argument("--steps", type=int)
    sampling.add_argument("--sampler", help="euler, heun, euler_ancestral, ddim, dpmpp_2m")
    sampling.add_argument("--spacing", help="timestep spacing: release, leading, trailing, linspace")
    sampling.add_argument("--eta", type=float, help="DDIM / Euler-ancestral eta")
    sampling.add_argument("--guidance-scale", type=float)
    sampling.add_argument("--aesthetic-scale", type=float)
    sampling.add_argument("--anime-scale", type=float)
    sampling.add_argument("--photography-scale", type=float)
    sampling.add_argument("--guidance-rescale", type=float, default=0.0)
    sampling.add_argument("--t-struct", type=int, help="structure generator for t >= this (default: config)")
    sampling.add_argument("--switch-rule", choices=["exact", "release"])
    sampling.add_argument("--single-model", choices=["structure", "texture"],
                          help="one UNet for every timestep (baseline for the time split)")

    model = add_model_arguments(p)
    model.add_argument("--recipe", help="a Coop-Diffusion recipe YAML: partner models fused with the main model "
                                        "(and/or a low-resolution model up to T_low); see configs/recipes/")

    out = p.add_argument_group("output")
    out.add_argument("--out", default="outputs", help="a directory, or a .png file name (numbered when several)")
    out.add_argument("--save-latents", action="store_true", help="also save the final latents as .npy")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    out.add_argument("--verbose", action="store_true", help="MindSpore's and our info logs")

    speed = p.add_argument_group("speed")
    speed.add_argument("--batch-size", type=int,
                       help="images per pipeline call (default: as many as fit a budget of "
                            f"{BATCH_LATENT_PIXELS} latent pixels per UNet call, at most {MAX_AUTO_BATCH})")
    speed.add_argument("--host-loop", action="store_true",
                       help="run the sampling loop step by step on the host instead of one compiled graph per step")
    speed.add_argument("--compile-cache", metavar="DIR",
                       help="where compiled graphs are kept for later runs with the same settings, or 'off' "
                            "(default: $PANGU_DRAW_COMPILE_CACHE, else ~/.cache/pangu_draw_ms/compile)")
    return p.parse_args(argv)


def read_prompts(args) -> List[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit("error: give --prompt (repeatable) or --prompts-file")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise SystemExit(f"error: prompt {empty[0] + 1} is empty")
    return prompts


# Arguments that change no compiled graph (texts are tokenised to a fixed length; seeds and noise are data).
_NOT_IN_COMPILE_KEY = ("prompt", "prompts_file", "negative_prompt", "seed", "noise", "out", "quiet", "verbose",
                       "save_latents", "compile_cache", "list_buckets")


def compile_key(args, num_images: int, batch_size: int) -> dict:
    """What decides which graphs a run compiles and in which order (see runtime.enable_compile_cache)."""
    import mindspore as ms

    key = {k: v for k, v in vars(args).items() if k not in _NOT_IN_COMPILE_KEY}
    for name in ("model_dir", "config", "recipe", "structure_ckpt", "texture_ckpt", "conditioner_ckpt", "vae_ckpt"):
        if key.get(name) and os.path.exists(key[name]):
            key[name] = os.path.abspath(key[name])
    key.update(num_images=num_images, batch_size=batch_size, mindspore=ms.__version__)
    return key


def default_batch_size(pipe, settings, num_images: int) -> int:
    """Images per pipeline call: as many as keep one UNet call (every guidance branch) within
    ``BATCH_LATENT_PIXELS`` latent pixels, at most ``MAX_AUTO_BATCH`` and the number of images."""
    run = pipe.plan("size", **{k: v for k, v in settings.items() if k != "compiled"})
    per_image = len(run.guidance_weights) * run.latent_shape[2] * run.latent_shape[3]
    return max(1, min(num_images, MAX_AUTO_BATCH, BATCH_LATENT_PIXELS // per_image))


def output_location(args):
    """(directory, file stem, whether --out names one file) of the run's PNGs."""
    as_file = args.out.lower().endswith(".png")
    directory = os.path.dirname(os.path.abspath(args.out)) if as_file else args.out
    stem = os.path.splitext(os.path.basename(args.out))[0] if as_file else "pangu"
    return directory, stem, as_file


def save_images(args, images, infos, latents, total: int) -> List[str]:
    """Write the PNGs of one batch (named by their image index in the run) as soon as it is decoded."""
    from PIL import PngImagePlugin

    directory, stem, as_file = output_location(args)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for image, info, latent in zip(images, infos, latents):
        name = f"{stem}.png" if as_file and total == 1 else f"{stem}_{info['image_index']:03d}.png"
        meta = PngImagePlugin.PngInfo()
        meta.add_text("prompt", info["prompt"])
        meta.add_text("parameters", json.dumps(info, ensure_ascii=False))
        path = os.path.join(directory, name)
        image.save(path, pnginfo=meta)
        paths.append(path)
        if args.save_latents:
            import numpy as np

            np.save(os.path.splitext(path)[0] + ".npy", latent)
    return paths


def save_grid(args, images) -> List[str]:
    """A grid of every image of the run, when there are several."""
    from pangu_draw_ms.images import image_grid

    if len(images) < 2:
        return []
    directory, stem, _ = output_location(args)
    grid_path = os.path.join(directory, f"{stem}_grid.png")
    image_grid(images).save(grid_path)
    return [grid_path]


def main(argv: Optional[List[str]] = None) -> List[str]:
    return run_with_clear_errors(run, parse_args(argv))


def run(args: argparse.Namespace) -> List[str]:
    import mindspore as ms
    import numpy as np
    from tqdm import tqdm

    from pangu_draw_ms.runtime import compile_cache_root, enable_compile_cache

    if ms.get_context("device_target") != args.device:  # set once per process; a second set_device fails
        ms.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    pipe, source = build_pipeline(args)
    generate = pipe
    if args.recipe:
        from pangu_draw_ms.config import CoopRecipe, load_config
        from pangu_draw_ms.pipelines.coop import CoopPipeline

        if args.init_image or args.noise:
            raise SystemExit("error: --init-image and --noise do not combine with --recipe")
        recipe = load_config(args.recipe, CoopRecipe)
        source += f", fused with {', '.join(p.name for p in recipe.partners)} (recipe {args.recipe})"
        generate = CoopPipeline(pipe, recipe)
    if args.list_buckets:
        print(pipe.buckets.describe())
        return []
    prompts = read_prompts(args)
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {args.steps}")
    print(f"pangu_draw_ms: {source}", file=sys.stderr)

    styles = dict(pipe.config.sampling.style_scales)
    for style in styles:
        value = getattr(args, f"{style}_scale")
        if value is not None:
            styles[style] = value
    noise = None
    if args.noise:
        noise = np.load(args.noise).astype(np.float32)
        noise = noise[None] if noise.ndim == 3 else noise
        if noise.shape[0] != len(prompts) * args.num_images:
            raise SystemExit(f"error: --noise holds {noise.shape[0]} images' noise; this run makes "
                             f"{len(prompts) * args.num_images}")
    sampler_options = {"eta": args.eta} if args.eta is not None else None
    settings = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width, ratio=args.ratio,
                    snap_to_bucket=args.snap, num_inference_steps=args.steps, sampler=args.sampler,
                    spacing=args.spacing, guidance_scale=args.guidance_scale, style_scales=styles,
                    guidance_rescale=args.guidance_rescale, t_struct=args.t_struct, switch_rule=args.switch_rule,
                    single_model=args.single_model, seed=args.seed, sampler_options=sampler_options,
                    compiled=False if args.host_loop else None)
    # Image i of the run is prompt i // num_images; its noise comes from (seed, i) whatever batch it is in.
    jobs = [prompt for prompt in prompts for _ in range(args.num_images)]
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    batch_size = args.batch_size or default_batch_size(pipe, settings, len(jobs))
    cache_root = compile_cache_root(args.compile_cache) if args.mode == "graph" else None
    if cache_root is not None:
        enable_compile_cache(cache_root, compile_key(args, len(jobs), batch_size))
    images, paths = [], []
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first:first + batch_size]
        bar = None if args.quiet else tqdm(total=0, desc=f"images {first + 1}-{first + len(batch)}/{len(jobs)}",
                                            unit="step", file=sys.stderr)

        def progress(i, n, t, expert, bar=bar):
            if bar is not None:
                bar.total = n
                bar.set_postfix_str(f"t={t} {expert}")
                bar.update(1)

        call = dict(settings, first_image_index=first, progress=progress)
        if not args.recipe:
            call.update(noise=None if noise is None else noise[first:first + len(batch)], init_image=args.init_image,
                        strength=args.strength)
        out = generate(batch, **call)
        if bar is not None:
            bar.close()
        shared = {k: v for k, v in out.info.items() if k not in ("prompts", "expert_trace", "coop_trace", "seconds")}
        if "expert_trace" in out.info:
            shared["experts"] = {name: sum(1 for _, n in out.info["expert_trace"] if n == name)
                                 for name in ("structure", "texture")}
        infos = [dict(shared, prompt=prompt, image_index=first + k, source=source) for k, prompt in enumerate(batch)]
        paths += save_images(args, out.images, infos, out.latents, len(jobs))
        images += out.images
    paths += save_grid(args, images)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
