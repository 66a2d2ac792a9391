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
import logging
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pangu_draw_ms", "demo")


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

    model = p.add_argument_group("model and weights")
    model.add_argument("--recipe", help="a Coop-Diffusion recipe YAML: partner models fused with the main model "
                                        "(and/or a low-resolution model up to T_low); see configs/recipes/")
    model.add_argument("--config", help="config name or YAML (default: the model directory's, else the demo/tiny)")
    model.add_argument("--model-dir", help="a directory with config.yaml and per-component weights")
    model.add_argument("--structure-ckpt", help="structure (high-timestep) UNet weights, e.g. pangu_high_timestamp-*.ckpt")
    model.add_argument("--texture-ckpt", help="texture (low-timestep) UNet weights; a released file also supplies "
                                              "the text encoders and the VAE")
    model.add_argument("--conditioner-ckpt", help="text encoder weights (default: from --texture-ckpt)")
    model.add_argument("--vae-ckpt", help="VAE weights (default: from --texture-ckpt)")
    model.add_argument("--allow-swapped", action="store_true",
                       help="accept a structure/texture pair whose recorded roles say it is swapped")
    model.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="compute dtype (default: fp16 on Ascend, fp32 on CPU)")
    model.add_argument("--weights-dtype", choices=["fp32", "fp16"], default="fp32", help="parameter storage dtype")
    model.add_argument("--memory", choices=["resident", "sequential"], default="resident",
                       help="sequential: only the active network in memory (two 5B UNets need it on 32 GB)")
    model.add_argument("--device", choices=["CPU", "Ascend"], default="CPU")
    model.add_argument("--mode", choices=["graph", "pynative"], default="graph")

    out = p.add_argument_group("output")
    out.add_argument("--out", default="outputs", help="a directory, or a .png file name (numbered when several)")
    out.add_argument("--save-latents", action="store_true", help="also save the final latents as .npy")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
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


def build_pipeline(args):
    from pangu_draw_ms.config import load_config
    from pangu_draw_ms.pipelines.components import find_component_files
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    options = dict(precision=args.precision, weights_dtype=args.weights_dtype, memory=args.memory,
                   allow_swapped=args.allow_swapped, show_progress=not args.quiet)
    if args.model_dir or (not args.structure_ckpt and not args.texture_ckpt and not args.config
                          and os.path.isfile(os.path.join(DEMO_DIR, "config.yaml"))):
        model_dir = args.model_dir or DEMO_DIR
        config = load_config(args.config or os.path.join(model_dir, "config.yaml"))
        files = find_component_files(model_dir)
        source = f"model directory {model_dir}" if args.model_dir else "the embedded demo model"
    elif args.structure_ckpt or args.texture_ckpt:
        if not (args.structure_ckpt and args.texture_ckpt):
            raise SystemExit("error: give both --structure-ckpt and --texture-ckpt")
        for path in (args.structure_ckpt, args.texture_ckpt, args.conditioner_ckpt, args.vae_ckpt):
            if path and not os.path.isfile(path):
                raise SystemExit(f"error: checkpoint {path!r} does not exist")
        config = load_config(args.config or "pangu_draw_v3")
        files = {"structure_unet": args.structure_ckpt, "texture_unet": args.texture_ckpt,
                 "conditioner": args.conditioner_ckpt or args.texture_ckpt, "vae": args.vae_ckpt or args.texture_ckpt}
        source = f"checkpoints {args.structure_ckpt} (structure) and {args.texture_ckpt} (texture)"
    else:
        config = load_config(args.config or "tiny")
        files = {}
        source = f"config {config.name!r} with SEEDED RANDOM WEIGHTS (no checkpoint given): the images are noise"
    return PanGuDrawPipeline.from_config(config, files, **options), source


def save_outputs(args, images, infos, latents) -> List[str]:
    from PIL import PngImagePlugin

    from pangu_draw_ms.pipelines.grid import image_grid

    as_file = args.out.lower().endswith(".png")
    directory = os.path.dirname(os.path.abspath(args.out)) if as_file else args.out
    os.makedirs(directory, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.out))[0] if as_file else "pangu"
    paths = []
    for i, (image, info) in enumerate(zip(images, infos)):
        name = f"{stem}.png" if as_file and len(images) == 1 else f"{stem}_{i:03d}.png"
        meta = PngImagePlugin.PngInfo()
        meta.add_text("prompt", info["prompt"])
        meta.add_text("parameters", json.dumps(info, ensure_ascii=False))
        path = os.path.join(directory, name)
        image.save(path, pnginfo=meta)
        paths.append(path)
        if args.save_latents:
            import numpy as np

            np.save(os.path.splitext(path)[0] + ".npy", latents[i])
    if len(images) > 1:
        grid_path = os.path.join(directory, f"{stem}_grid.png")
        image_grid(images).save(grid_path)
        paths.append(grid_path)
    return paths


def main(argv: Optional[List[str]] = None) -> List[str]:
    from pangu_draw_ms.buckets import BucketError
    from pangu_draw_ms.config import ConfigError
    from pangu_draw_ms.io.state import StateDictError

    try:
        return run(parse_args(argv))
    except (ValueError, BucketError, ConfigError, StateDictError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


def run(args: argparse.Namespace) -> List[str]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import numpy as np
    import mindspore as ms
    from tqdm import tqdm

    ms.set_context(device_target=args.device, mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
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
    images, infos, latents = [], [], []
    index = 0
    for prompt in prompts:
        for _ in range(args.num_images):
            bar = None if args.quiet else tqdm(total=0, desc=f"image {index + 1}/{len(prompts) * args.num_images}",
                                                unit="step", file=sys.stderr)

            def progress(i, n, t, expert, bar=bar):
                if bar is not None:
                    bar.total = n
                    bar.set_postfix_str(f"t={t} {expert}")
                    bar.update(1)

            settings = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                            ratio=args.ratio, snap_to_bucket=args.snap, num_inference_steps=args.steps,
                            sampler=args.sampler, spacing=args.spacing, guidance_scale=args.guidance_scale,
                            style_scales=styles, guidance_rescale=args.guidance_rescale, t_struct=args.t_struct,
                            switch_rule=args.switch_rule, single_model=args.single_model, seed=args.seed,
                            first_image_index=index, sampler_options=sampler_options, progress=progress)
            if not args.recipe:
                settings.update(noise=None if noise is None else noise[index:index + 1], init_image=args.init_image,
                                strength=args.strength)
            out = generate(prompt, **settings)
            if bar is not None:
                bar.close()
            info = {k: v for k, v in out.info.items() if k not in ("prompts", "expert_trace", "coop_trace", "seconds")}
            info.update(prompt=prompt, image_index=index, source=source)
            if "expert_trace" in out.info:
                info["experts"] = {name: sum(1 for _, n in out.info["expert_trace"] if n == name)
                                   for name in ("structure", "texture")}
            images += out.images
            infos.append(info)
            latents.append(out.latents[0])
            index += 1
    paths = save_outputs(args, images, infos, latents)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
