"""What the command-line tools that draw images share (tools/infer.py, tools/evaluate.py): the model arguments
(the embedded demo model, a model directory, the released checkpoint pair, or a config with random weights),
building the pipeline they name, and one-line errors."""
from __future__ import annotations

import argparse
import os
import sys

# The demo model shipped inside the package: the default when no weights are given.
DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")


def add_model_arguments(parser: argparse.ArgumentParser):
    """The "model and weights" argument group (returned, for tool-specific additions)."""
    model = parser.add_argument_group("model and weights")
    model.add_argument("--config", help="config name or YAML (default: the model directory's, else the demo/tiny)")
    model.add_argument("--model-dir", help="a directory with config.yaml and per-component weights")
    model.add_argument("--structure-ckpt",
                       help="structure (high-timestep) UNet weights, e.g. pangu_high_timestamp-*.ckpt")
    model.add_argument("--texture-ckpt", help="texture (low-timestep) UNet weights; a released file also supplies "
                                              "the text encoders and the VAE")
    model.add_argument("--conditioner-ckpt", help="text encoder weights (default: from --texture-ckpt)")
    model.add_argument("--vae-ckpt", help="VAE weights (default: from --texture-ckpt)")
    model.add_argument("--allow-swapped", action="store_true",
                       help="accept a structure/texture pair whose recorded roles say it is swapped")
    model.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                       help="compute dtype (default: fp16 on Ascend, fp32 on CPU)")
    model.add_argument("--weights-dtype", choices=["fp32", "fp16"], default="fp32", help="parameter storage dtype")
    model.add_argument("--memory", choices=["resident", "sequential"], default="resident",
                       help="sequential: only the active network in memory (two 5B UNets need it on 32 GB)")
    model.add_argument("--device", choices=["CPU", "Ascend"], default="CPU")
    model.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    add_lora_arguments(model)
    model.add_argument("--recipe", help="a Coop-Diffusion recipe YAML: partner models fused with the main model "
                                        "(and/or another model for part of the schedule); see configs/recipes/")
    return model


def add_lora_arguments(group) -> None:
    """--lora, --lora-structure, --lora-texture (read by :func:`with_loras`)."""
    group.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="a UNet LoRA (diffusers/PEFT or kohya safetensors) merged into both generators, or a "
                            "folder of <generator>_lora.safetensors (stage lora), each into its own; repeatable")
    group.add_argument("--lora-structure", action="append", default=[], metavar="FILE[:SCALE]",
                       help="a LoRA for the structure generator only (t >= t_struct)")
    group.add_argument("--lora-texture", action="append", default=[], metavar="FILE[:SCALE]",
                       help="a LoRA for the texture generator only")


def with_recipe(args, pipe, source: str):
    """(what generates: ``pipe``, or a CoopPipeline of ``--recipe`` around it; the source's description)."""
    if not args.recipe:
        return pipe, source
    from pangu_draw_ms.config import CoopRecipe, load_config
    from pangu_draw_ms.pipelines.coop import CoopPipeline

    recipe = load_config(args.recipe, CoopRecipe)
    return CoopPipeline(pipe, recipe), f"{source}, fused with {', '.join(p.name for p in recipe.partners)} " \
                                       f"(recipe {args.recipe})"


# Exit statuses: a usage error (as argparse's), an interrupt (128 + SIGINT, as a shell reports it).
USAGE_ERROR, INTERRUPTED = 2, 130


def exit_with(message: str, status: int) -> SystemExit:
    """A SystemExit that prints ``message`` to stderr and exits with ``status`` (``SystemExit("...")`` alone
    exits 1); ``str()`` of it is still the message."""
    print(message, file=sys.stderr)
    exit_ = SystemExit(message)
    exit_.code = status
    return exit_


def run_with_clear_errors(run, args):
    """``run(args)`` with the tools' logging set up (before MindSpore is imported: it reads its log level
    once) and a user's error - a bad value, bucket, config or weights file, a missing file, latents that
    overflowed - as one ``error: ...`` line instead of a traceback, exit status 2; Ctrl-C exits 130 (what
    the tool saved it has said)."""
    from pangu_draw_ms.runtime import configure_logging

    configure_logging(args.verbose)
    from pangu_draw_ms.buckets import BucketError
    from pangu_draw_ms.config import ConfigError
    from pangu_draw_ms.diffusion.samplers import NonFiniteLatentsError
    from pangu_draw_ms.io.state import StateDictError

    try:
        return run(args)
    except (ValueError, BucketError, ConfigError, StateDictError, FileNotFoundError, NonFiniteLatentsError) as err:
        raise exit_with(f"error: {err}", USAGE_ERROR) from None
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # a tool's own "error: ..." line
            raise exit_with(exit_.code, USAGE_ERROR) from None
        raise
    except KeyboardInterrupt:
        raise exit_with("interrupted", INTERRUPTED) from None


def uses_demo_model(args) -> bool:
    """No weights and no config given: the embedded demo model."""
    from pangu_draw_ms.io.model_dir import CONFIG_FILE

    return not (args.model_dir or args.structure_ckpt or args.texture_ckpt or args.config) \
        and os.path.isfile(os.path.join(DEMO_DIR, CONFIG_FILE))


def build_pipeline(args):
    """The pipeline the model arguments name, and a sentence saying what it is (printed by the tools)."""
    from pangu_draw_ms.config import load_config
    from pangu_draw_ms.io.model_dir import CONFIG_FILE, find_component_files, released_pair_files
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline
    from pangu_draw_ms.runtime import freeze_heap

    options = dict(precision=args.precision, weights_dtype=args.weights_dtype, memory=args.memory,
                   allow_swapped=args.allow_swapped, show_progress=not args.quiet)
    if args.model_dir or uses_demo_model(args):
        model_dir = args.model_dir or DEMO_DIR
        config = load_config(args.config or os.path.join(model_dir, CONFIG_FILE))
        files = find_component_files(model_dir)
        source = f"model directory {model_dir}" if args.model_dir else "the embedded demo model"
    elif args.structure_ckpt or args.texture_ckpt:
        if not (args.structure_ckpt and args.texture_ckpt):
            raise SystemExit("error: give both --structure-ckpt and --texture-ckpt")
        for path in (args.structure_ckpt, args.texture_ckpt, args.conditioner_ckpt, args.vae_ckpt):
            if path and not os.path.isfile(path):
                raise SystemExit(f"error: checkpoint {path!r} does not exist")
        config = load_config(args.config or "pangu_draw_v3")
        files = released_pair_files(args.structure_ckpt, args.texture_ckpt, args.conditioner_ckpt, args.vae_ckpt)
        source = f"checkpoints {args.structure_ckpt} (structure) and {args.texture_ckpt} (texture)"
    else:
        config = load_config(args.config or "tiny")
        files = {}
        source = f"config {config.name!r} with SEEDED RANDOM WEIGHTS (no checkpoint given): the images are noise"
    pipe = PanGuDrawPipeline.from_config(config, files, **options)
    source += with_loras(args, pipe)
    freeze_heap()  # what is alive now lives as long as the tool: MindSpore's per-compile gc.collect() skips it
    return pipe, source


def with_loras(args, pipe) -> str:
    """Merge the --lora, --lora-structure and --lora-texture files into the pipeline's generators (each file
    checked now, before any image is drawn); the words the tools add to the model's description."""
    from pangu_draw_ms.io.lora import lora_files, parse_lora_argument

    added = []
    for flag, generators in (("lora", ("structure", "texture")), ("lora_structure", ("structure",)),
                             ("lora_texture", ("texture",))):
        for text in getattr(args, flag):
            path, scale = parse_lora_argument(text)
            if not os.path.exists(path):
                raise SystemExit(f"error: --{flag.replace('_', '-')} {path}: no such file or folder")
            pipe.load_lora(path, scale, generators)
            for generator, file in lora_files(path, generators).items():
                pipe.components.get(f"{generator}_unet")  # read and merged now: a bad file fails before any image
                pipe.components.done_with(f"{generator}_unet")
                added.append(f"{os.path.basename(file)} x {scale:g} ({generator})")
    return f", with LoRA {', '.join(added)}" if added else ""
