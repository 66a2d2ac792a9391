"""Generate images with PanGu-Draw: time-decoupled sampling at any resolution bucket.

    python tools/infer.py --prompt "一个红色的圆形"                       # the embedded default model
    python tools/infer.py --model-dir converted/ --prompt "a cat" --ratio 16:9 --num-images 4
    python tools/infer.py --structure-ckpt pangu_high_timestamp-c6344411.ckpt \\
        --texture-ckpt pangu_low_timestamp-127da122.ckpt --device Ascend --prompt "..."

Every image is saved as a PNG whose text metadata holds the prompt and all settings, as soon as its batch
is decoded; several images also give a grid. The request and the output location are checked before any
model is loaded; numbered names continue after the files of earlier runs in the folder. Defaults (steps,
sampler, guidance, style scales, switch rule) come from the model config's ``sampling`` section.

Batch generation (``--skip-existing``, and always under msrun): image i of the run is ``<stem>_<i>.png``
whatever ran before; images already in the folder are kept and not drawn again (a stopped run resumes), the
workers of an msrun job each draw one contiguous slice of the images, and when all are done the first writes
``index.jsonl`` (file, prompt, seed, image index and settings of every image):

    msrun --worker_num=8 --local_worker_num=8 --master_port=8121 --join=True tools/infer.py \
        --model-dir pangu_v3/ --device Ascend --prompts-file prompts.txt --num-images 4 --out generated/
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import List, Optional

from .model_args import add_model_arguments, build_pipeline, run_with_clear_errors, uses_demo_model, with_recipe
from .prompt_enhancement import add_enhancer_arguments, check_enhancer_arguments, enhance_prompts

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

    add_model_arguments(p)
    add_enhancer_arguments(p)

    out = p.add_argument_group("output")
    out.add_argument("--out", default="outputs",
                     help="a directory, or a .png file name (numbered when several); numbered names "
                          "(pangu_000.png, ...) continue after the highest index already in the folder, so an "
                          "earlier run's images are never replaced")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --out FILE.png")
    out.add_argument("--save-latents", action="store_true", help="also save the final latents as .npy")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    out.add_argument("--skip-existing", action="store_true",
                     help="batch generation: image i is <stem>_<i>.png, images already there are not drawn again, "
                          "index.jsonl lists every image (always on under msrun)")
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


# The CLI's flag of each request argument, so that a refused value is named as the user typed it.
FLAGS = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "height": "--height", "width": "--width",
         "ratio": "--ratio", "num_inference_steps": "--steps", "sampler": "--sampler", "spacing": "--spacing",
         "guidance_scale": "--guidance-scale", "guidance_rescale": "--guidance-rescale", "t_struct": "--t-struct",
         "seed": "--seed", "num_images_per_prompt": "--num-images", "strength": "--strength",
         "init_image": "--init-image", "noise": "--noise", "sampler_options['eta']": "--eta",
         **{f"style_scales[{style!r}]": f"--{style}-scale" for style in ("aesthetic", "anime", "photography")}}


def read_prompts(args) -> List[str]:
    """--prompt values, then the lines of --prompts-file (blank lines skipped); errors name the file."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = args.prompts_file
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as error:
            raise SystemExit(f"error: --prompts-file {path} is not UTF-8 text (byte {error.start}: "
                             f"{error.reason}); give a text file with one prompt per line") from None
        except OSError as error:
            raise SystemExit(f"error: cannot read --prompts-file {path}: {error.strerror}") from None
        if "\x00" in text:
            raise SystemExit(f"error: --prompts-file {path} holds NUL bytes: it is not a text file of prompts")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise SystemExit(f"error: --prompts-file {path} holds no prompt (one prompt per line)")
        prompts += lines
    if not prompts:
        raise SystemExit("error: give --prompt (repeatable) or --prompts-file")
    return prompts


def style_overrides(args) -> dict:
    """The style scales given on the command line (the config supplies the others)."""
    styles = {style: getattr(args, f"{style}_scale") for style in ("aesthetic", "anime", "photography")}
    return {style: scale for style, scale in styles.items() if scale is not None}


def request_settings(args) -> dict:
    """The pipeline settings of the command line (style scales: only those given)."""
    return dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width, ratio=args.ratio,
                snap_to_bucket=args.snap, num_inference_steps=args.steps, sampler=args.sampler,
                spacing=args.spacing, guidance_scale=args.guidance_scale, style_scales=style_overrides(args),
                guidance_rescale=args.guidance_rescale, t_struct=args.t_struct, switch_rule=args.switch_rule,
                single_model=args.single_model, seed=args.seed,
                sampler_options={"eta": args.eta} if args.eta is not None else None)


def check_request(args):
    """Everything about the request that needs no model, before one is loaded: (prompts, noise or None,
    init image or None, where the files go). Raises the same errors as the Python API, named by flag."""
    from pangu_draw_ms.pipelines.requests import check_noise_file, check_prompts, check_settings, load_init_image

    prompts = check_prompts(read_prompts(args), FLAGS)
    check_settings(dict(request_settings(args), num_images_per_prompt=args.num_images, strength=args.strength),
                   FLAGS)
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    if args.recipe and (args.init_image or args.noise):
        raise SystemExit("error: --init-image and --noise do not combine with --recipe")
    check_enhancer_arguments(args, uses_demo_model(args))
    total = len(prompts) * args.num_images * (args.enhance_candidates if args.enhance_prompt else 1)
    noise = None
    if args.noise:
        noise = check_noise_file(args.noise, FLAGS)
        if noise.shape[0] != total:
            raise SystemExit(f"error: --noise holds {noise.shape[0]} images' noise; this run makes {total}")
    init_image = load_init_image(args.init_image, FLAGS) if args.init_image else None
    return prompts, noise, init_image, plan_output(args, total)


# Arguments that change no compiled graph (texts are tokenised to a fixed length; seeds and noise are data).
_NOT_IN_COMPILE_KEY = ("prompt", "prompts_file", "negative_prompt", "seed", "noise", "out", "quiet", "verbose",
                       "save_latents", "compile_cache", "list_buckets")


def compile_key(args, num_images: int, batch_size: int) -> dict:
    """What decides which graphs a run compiles and in which order (see runtime.enable_compile_cache)."""
    import mindspore as ms

    from pangu_draw_ms.models import cpu_kernels

    key = {k: v for k, v in vars(args).items() if k not in _NOT_IN_COMPILE_KEY}
    for name in ("model_dir", "config", "recipe", "structure_ckpt", "texture_ckpt", "conditioner_ckpt", "vae_ckpt"):
        if key.get(name) and os.path.exists(key[name]):
            key[name] = os.path.abspath(key[name])
    # The graphs name the CPU kernels' library (or MindSpore's kernels when it is off or unavailable).
    key.update(num_images=num_images, batch_size=batch_size, mindspore=ms.__version__,
               cpu_kernels=cpu_kernels.library())
    return key


def default_batch_size(pipe, settings, num_images: int) -> int:
    """Images per pipeline call: as many as keep one UNet call (every guidance branch) within
    ``BATCH_LATENT_PIXELS`` latent pixels, at most ``MAX_AUTO_BATCH`` and the number of images."""
    run = pipe.plan("size", **{k: v for k, v in settings.items() if k != "compiled"})
    per_image = len(run.guidance_weights) * run.latent_shape[2] * run.latent_shape[3]
    return max(1, min(num_images, MAX_AUTO_BATCH, BATCH_LATENT_PIXELS // per_image))


@dataclass
class Output:
    """Where a run's files go: ``directory``/``stem``.png for an explicit one-image --out FILE.png, else
    ``stem``_NNN.png numbered from ``first_number`` (after every numbered file already in the folder) and a
    grid ``stem``_grid_FIRST-LAST.png."""

    directory: str
    stem: str
    single: bool
    first_number: int

    def image_path(self, image_index: int) -> str:
        name = f"{self.stem}.png" if self.single else f"{self.stem}_{self.first_number + image_index:03d}.png"
        return os.path.join(self.directory, name)

    def grid_path(self, count: int) -> str:
        last = self.first_number + count - 1
        return os.path.join(self.directory, f"{self.stem}_grid_{self.first_number:03d}-{last:03d}.png")


def next_free_number(directory: str, stem: str) -> int:
    """1 + the highest number of ``stem``_NNN.png/.npy and of ``stem``_grid_N-NNN.png in ``directory`` (0 if none)."""
    pattern = re.compile(rf"{re.escape(stem)}_(?:grid_\d+-)?(\d+)\.(?:png|npy)")
    numbers = [int(m.group(1)) for m in map(pattern.fullmatch, os.listdir(directory)) if m] \
        if os.path.isdir(directory) else []
    return max(numbers, default=-1) + 1


def plan_output(args, total: int) -> Output:
    """The run's :class:`Output`, checked before any model is loaded: the folder exists or can be made, is a
    folder and is writable; an existing --out FILE.png (or its .npy) is replaced only with --overwrite."""
    as_file = args.out.lower().endswith(".png")
    directory = os.path.dirname(os.path.abspath(args.out)) if as_file else os.path.abspath(args.out)
    if as_file and os.path.isdir(args.out):
        raise SystemExit(f"error: --out {args.out} is a folder; give a folder without .png, or a free file name")
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"error: --out {args.out}: {existing} is a file, where a folder is needed for the images")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out {args.out}: cannot write in {existing} (permission denied)")
    stem = os.path.splitext(os.path.basename(args.out))[0] if as_file else "pangu"
    single = as_file and total == 1 and not args.skip_existing
    output = Output(directory, stem, single=single,
                    first_number=0 if single or args.skip_existing else next_free_number(directory, stem))
    if output.single and not args.overwrite:
        path = output.image_path(0)
        taken = [p for p in (path, path[:-4] + ".npy" if args.save_latents else None) if p and os.path.exists(p)]
        if taken:
            raise SystemExit(f"error: --out {taken[0]} exists; pass --overwrite to replace it, or give another name")
    return output


def write_atomically(path: str, write) -> None:
    """``write(temporary path)``, then a rename onto ``path``: a reader never sees half a file, an interrupt
    leaves none behind."""
    from pangu_draw_ms.io.checkpoint import atomic_output

    with atomic_output(path) as partial:
        write(partial)


def save_images(args, output: Output, images, infos, latents) -> List[str]:
    """Write the PNGs (and --save-latents .npy files) of one batch as soon as it is decoded."""
    import numpy as np
    from PIL import PngImagePlugin

    os.makedirs(output.directory, exist_ok=True)
    paths = []
    for image, info, latent in zip(images, infos, latents):
        meta = PngImagePlugin.PngInfo()
        meta.add_text("prompt", info["prompt"])
        if "original_prompt" in info:
            meta.add_text("original_prompt", info["original_prompt"])
        meta.add_text("parameters", json.dumps(info, ensure_ascii=False))
        path = output.image_path(info["image_index"])
        if args.save_latents:
            write_atomically(path[:-4] + ".npy", lambda partial: np.save(partial, latent))
        write_atomically(path, lambda partial: image.save(partial, format="PNG", pnginfo=meta))
        paths.append(path)
    return paths


def save_grid(output: Output, images) -> List[str]:
    """A grid of every image of the run, when there are several."""
    from pangu_draw_ms.images import image_grid

    if len(images) < 2:
        return []
    grid = image_grid(images)
    path = output.grid_path(len(images))
    write_atomically(path, lambda partial: grid.save(partial, format="PNG"))
    return [path]


def main(argv: Optional[List[str]] = None) -> List[str]:
    return run_with_clear_errors(run, parse_args(argv))


def run(args: argparse.Namespace) -> List[str]:
    """Generate as ``args`` say; a request the model refuses (t_struct beyond its schedule, --noise of another
    latent shape) is named by its flag."""
    from pangu_draw_ms.pipelines.requests import RequestError

    try:
        return generate_images(args)
    except RequestError as error:
        raise error.named(FLAGS) from None


def worker_slice(total: int, rank: int, world: int) -> range:
    """The image indices worker ``rank`` of ``world`` draws: one contiguous slice, the slices covering every
    index once."""
    return range(total * rank // world, total * (rank + 1) // world)


def consecutive_batches(indices, size: int) -> List[range]:
    """``indices`` (ascending) as batches of at most ``size`` consecutive indices (a pipeline call draws
    consecutive images: image i's noise comes from (seed, i))."""
    batches: List[range] = []
    for i in indices:
        last = batches[-1] if batches else None
        if last is not None and i == last.stop and len(last) < size:
            batches[-1] = range(last.start, i + 1)
        else:
            batches.append(range(i, i + 1))
    return batches


def write_index(args, output: "Output", jobs: List[str], settings: dict) -> str:
    """``index.jsonl`` of a batch-generation run: a line per image (file, prompt, image index, seed, settings)."""
    path = os.path.join(output.directory, "index.jsonl")
    shown = {k: v for k, v in settings.items() if k not in ("compiled",)}
    lines = [json.dumps({"file": os.path.basename(output.image_path(i)), "prompt": prompt, "image_index": i,
                         "seed": args.seed, "settings": shown}, ensure_ascii=False) for i, prompt in enumerate(jobs)]

    def write(partial):
        with open(partial, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    write_atomically(path, write)
    return path


def generate_images(args: argparse.Namespace) -> List[str]:
    import mindspore as ms
    from tqdm import tqdm

    from pangu_draw_ms.runtime import compile_cache_root, enable_compile_cache, msrun_rank_and_world
    from pangu_draw_ms.training.trainer import barrier

    if ms.get_context("device_target") != args.device:  # set once per process; a second set_device fails
        ms.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    rank, world = msrun_rank_and_world()
    if rank is None:
        return []  # msrun's scheduler process coordinates the workers and draws nothing
    args.skip_existing = args.skip_existing or world > 1
    if not args.list_buckets:  # the request and the output location, before any model is loaded
        prompts, noise, init_image, output = check_request(args)
        prompts, originals = enhance_prompts(args, prompts)
    pipe, source = build_pipeline(args)
    generate, source = with_recipe(args, pipe, source)
    if args.list_buckets:
        print(pipe.buckets.describe())
        return []
    print(f"pangu_draw_ms: {source}", file=sys.stderr)

    settings = request_settings(args)
    settings.update(style_scales=dict(pipe.config.sampling.style_scales, **settings["style_scales"]),
                    compiled=False if args.host_loop else None)
    # Image i of the run is prompt i // num_images; its noise comes from (seed, i) whatever batch it is in.
    jobs = [prompt for prompt in prompts for _ in range(args.num_images)]
    job_originals = [original for original in originals for _ in range(args.num_images)]
    batch_size = args.batch_size or default_batch_size(pipe, settings, len(jobs))
    # Workers of one job would share a cache folder whose graphs are named by compile order: one each is none.
    cache_root = compile_cache_root(args.compile_cache) if args.mode == "graph" and world == 1 else None
    if cache_root is not None:
        enable_compile_cache(cache_root, compile_key(args, len(jobs), batch_size))
    todo = worker_slice(len(jobs), rank, world)
    if args.skip_existing:
        todo = [i for i in todo if not os.path.isfile(output.image_path(i))]
    images, paths = [], []
    try:
        for indices in consecutive_batches(todo, batch_size):
            first = indices.start
            batch = jobs[first:indices.stop]
            bar = None if args.quiet else tqdm(total=0, desc=f"images {first + 1}-{first + len(batch)}/{len(jobs)}",
                                                unit="step", file=sys.stderr)

            def progress(i, n, t, expert, bar=bar):
                if bar is not None:
                    bar.total = n
                    bar.set_postfix_str(f"t={t} {expert}")
                    bar.update(1)

            call = dict(settings, first_image_index=first, progress=progress)
            if not args.recipe:
                call.update(noise=None if noise is None else noise[first:first + len(batch)], init_image=init_image,
                            strength=args.strength)
            try:
                out = generate(batch, **call)
            finally:
                if bar is not None:
                    bar.close()
            shared = {k: v for k, v in out.info.items()
                      if k not in ("prompts", "expert_trace", "coop_trace", "seconds")}
            if "expert_trace" in out.info:
                shared["experts"] = {name: sum(1 for _, n in out.info["expert_trace"] if n == name)
                                     for name in ("structure", "texture")}
            infos = [dict(shared, prompt=prompt, image_index=first + k, source=source,
                          **({"original_prompt": job_originals[first + k]} if args.enhance_prompt else {}))
                     for k, prompt in enumerate(batch)]
            for path in save_images(args, output, out.images, infos, out.latents):
                print(path, flush=True)
                paths.append(path)
            images += out.images
    except KeyboardInterrupt:
        saved = "".join(f"\n  {path}" for path in paths)
        print(f"interrupted: {len(paths)} of {len(jobs)} images were finished and saved{saved}", file=sys.stderr)
        raise
    if args.skip_existing:  # batch generation: the index instead of a grid, once every worker is done
        barrier(world)
        if rank == 0:
            paths.append(write_index(args, output, jobs, settings))
            print(paths[-1])
        return paths
    for path in save_grid(output, images):
        print(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
