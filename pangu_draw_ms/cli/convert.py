"""Convert checkpoints into pangu_draw_ms files (our parameter names, one component per file).

Released PanGu-Draw 3.0 pair -> structure_unet, texture_unet, vae, conditioner + the config YAML:

    python tools/convert.py released --structure pangu_high_timestamp-c6344411.ckpt \\
        --texture pangu_low_timestamp-127da122.ckpt --out weights/ --dtype fp16

diffusers / transformers weights -> our layout (a pipeline folder converts unet/, vae/, text_encoder/,
text_encoder_2/ and controlnet/; a model folder or a single file converts one component, whose
architecture comes from the config.json beside it or from --config, a YAML of the component's config):

    python tools/convert.py diffusers stable-diffusion-xl-base-1.0/ --out sdxl/
    python tools/convert.py diffusers controlnet-canny/diffusion_pytorch_model.safetensors --out cn/
    python tools/convert.py diffusers open_clip_model.safetensors --component text_encoder \\
        --config bigg_text.yaml --out text/

The FID Inception-v3 weights (pytorch-fid's file) -> a .safetensors that tools/evaluate.py reads without torch:

    python tools/convert.py inception pt_inception-2015-12-05-6726825d.pth --out weights/

A transformers LLaMA folder (config.json, model.safetensors) and its SentencePiece tokenizer -> a prompt enhancer
directory (config.yaml, enhancer.safetensors in mindformers names, tokenizer.model) for --enhancer-dir:

    python tools/convert.py llama my-llama/ --tokenizer my-llama/tokenizer.model --out enhancer/

LAION's improved aesthetic predictor (an MLP on CLIP ViT-L/14 image embeddings) -> a scorer folder (config.yaml,
aesthetic.safetensors) for RAFT's reward:

    python tools/convert.py aesthetic sac+logos+ava1-l14-linearMSE.pth --out aesthetic/

Every output is written atomically (an existing file survives a failed run) and the run ends with a
summary: tensors, parameters, bytes, and the entries left out.
"""
from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from pangu_draw_ms.runtime import quiet_mindspore

quiet_mindspore()  # before the io modules below import MindSpore: it reads its log level once

from pangu_draw_ms.config import PanGuDrawConfig, load_config  # noqa: E402
from pangu_draw_ms.io.checkpoint import resolve_checkpoint_path  # noqa: E402
from pangu_draw_ms.io.diffusers_controlnet import controlnet_config_from_diffusers  # noqa: E402
from pangu_draw_ms.io.diffusers_folder import config_beside, model_config, model_path, models_present  # noqa: E402
from pangu_draw_ms.io.diffusers_unet import unet_config_from_diffusers  # noqa: E402
from pangu_draw_ms.io.diffusers_vae import vae_config_from_diffusers  # noqa: E402
from pangu_draw_ms.io.layouts import COMPONENTS, convert_component, group_names  # noqa: E402
from pangu_draw_ms.io.model_dir import COMPONENT_FILES, CONFIG_FILE, write_config  # noqa: E402
from pangu_draw_ms.io.released import convert_released  # noqa: E402
from pangu_draw_ms.io.transformers_clip import text_encoder_config_from_transformers  # noqa: E402

# diffusers pipeline subfolder -> component
PIPELINE_FOLDERS = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder",
                    "controlnet": "controlnet"}
# diffusers _class_name / transformers architecture -> component
CLASS_COMPONENTS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "ControlNetModel": "controlnet",
                    "CLIPTextModel": "text_encoder", "CLIPTextModelWithProjection": "text_encoder"}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_summary(results) -> None:
    print("\nconverted:")
    for name, (report, summary) in results.items():
        print(f"  {summary.path}: {summary.tensors} tensors, {summary.parameters:,} parameters, "
              f"{_size(summary.bytes)} (from {os.path.basename(report.path)}, {report.layout} layout)")
        if report.skipped:
            print(f"    {len(report.skipped)} entries of other components skipped unread: "
                  f"{group_names(report.skipped)}")
        if report.ignored:
            print(f"    {len(report.ignored)} entries ignored (not weights of this component): "
                  f"{', '.join(report.ignored[:5])}{' ...' if len(report.ignored) > 5 else ''}")


def _progress(desc: str):
    return tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def check_output(args, inputs, outputs) -> None:
    """A conversion never writes into its source: the output folder must not be an input nor lie inside an
    input folder (``--allow-inside-source`` allows the latter), and no output file may be an input file."""
    out = os.path.realpath(args.out)
    for source in map(os.path.realpath, filter(None, inputs)):
        if out == source or (os.path.isdir(source) and out.startswith(source + os.sep)
                             and not args.allow_inside_source):
            raise ValueError(f"--out {args.out} is {'the input' if out == source else 'inside the input'} "
                             f"{source}: a conversion does not write into its source; give another folder"
                             + ("" if out == source else " (or --allow-inside-source)"))
        overwritten = [path for path in outputs if os.path.realpath(path) == source]
        if overwritten:
            raise ValueError(f"--out {args.out}: the output {overwritten[0]} would overwrite the input {source}; "
                             "give another folder")


def run_released(args) -> None:
    outputs = [f"{os.path.splitext(name)[0]}.{args.format}" for name in COMPONENT_FILES.values()] + [CONFIG_FILE]
    check_output(args, [args.structure, args.texture], [os.path.join(args.out, name) for name in outputs])
    config = load_config(args.config, PanGuDrawConfig)
    os.makedirs(args.out, exist_ok=True)
    results = convert_released(args.out, config, structure=args.structure, texture=args.texture, dtype=args.dtype,
                               file_format=args.format, allow_swapped=args.allow_swapped, progress=_progress)
    print_summary(results)
    print(f"  {os.path.join(args.out, CONFIG_FILE)}: the model config")


def component_from_json(config: dict, component, output_layer: str):
    """(component, our config) from a diffusers/transformers config.json."""
    names = [config.get("_class_name")] + list(config.get("architectures") or [])
    found = next((CLASS_COMPONENTS[n] for n in names if n in CLASS_COMPONENTS), None)
    component = component or found
    if component is None:
        raise ValueError(f"cannot tell the component from config.json (class {names}); pass --component")
    if component == "unet":
        return component, unet_config_from_diffusers(config)
    if component == "vae":
        return component, vae_config_from_diffusers(config)
    if component == "controlnet":
        return component, controlnet_config_from_diffusers(config)
    if component == "text_encoder":
        return component, text_encoder_config_from_transformers(config, output_layer)
    raise ValueError(f"component {component!r} cannot be converted from a diffusers folder; use 'released'")


def _model_jobs(args):
    """(output name, weights path, component, config) for each model to convert."""
    source = args.source
    folders = models_present(source, PIPELINE_FOLDERS)
    if folders:
        if args.config:
            raise ValueError("--config applies to one model; a pipeline folder takes each model's config.json")
        return [(folder, model_path(source, folder),
                 *component_from_json(model_config(source, folder), PIPELINE_FOLDERS[folder], args.output_layer))
                for folder in folders]
    weights = resolve_checkpoint_path(source)
    if args.config:
        if not args.component:
            raise ValueError("--config needs --component (the YAML holds that component's config)")
        component, config = args.component, load_config(args.config, COMPONENTS[args.component][1])
    else:
        diffusers_config = config_beside(weights)
        if diffusers_config is None:
            raise ValueError(f"no config.json beside {weights}: pass --component and --config (a YAML of the "
                             "component's config)")
        component, config = component_from_json(diffusers_config, args.component, args.output_layer)
    return [(args.name or component, weights, component, config)]


def run_diffusers(args) -> None:
    jobs = _model_jobs(args)
    check_output(args, [args.source] + [weights for _, weights, _, _ in jobs],
                 [os.path.join(args.out, f"{name}.{suffix}") for name, *_ in jobs for suffix in (args.format, "yaml")])
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name, weights, component, config in jobs:
        with _progress(name) as bar:
            results[name] = convert_component(weights, component, config,
                                              os.path.join(args.out, f"{name}.{args.format}"),
                                              dtype=args.dtype, progress=bar)
        write_config(config, os.path.join(args.out, f"{name}.yaml"))
    print_summary(results)


def run_inception(args) -> None:
    from pangu_draw_ms.io.checkpoint import load_tensors, save_checkpoint
    from pangu_draw_ms.io.inception import FID_WEIGHTS, fid_inception_from_torch

    path = os.path.join(args.out, f"fid_inception.{args.format}")
    check_output(args, [args.source], [path])
    state = fid_inception_from_torch(load_tensors(resolve_checkpoint_path(args.source)))
    os.makedirs(args.out, exist_ok=True)
    summary = save_checkpoint(state, path, dtype=args.dtype,
                              metadata={"component": "fid_inception", "source": FID_WEIGHTS})
    print(f"\nconverted:\n  {summary.path}: {summary.tensors} tensors, {summary.parameters:,} parameters, "
          f"{_size(summary.bytes)} (from {os.path.basename(args.source)})")


def run_llama(args) -> None:
    from pangu_draw_ms.io.transformers_llama import read_transformers_llama
    from pangu_draw_ms.prompting.config import ENHANCER_WEIGHTS, enhancer_config_from_transformers
    from pangu_draw_ms.prompting.enhancer import save_enhancer
    from pangu_draw_ms.tokenizers import SentencePieceTokenizer

    check_output(args, [args.source, args.tokenizer], [os.path.join(args.out, ENHANCER_WEIGHTS)])
    hf_config, state = read_transformers_llama(args.source)
    config = enhancer_config_from_transformers(hf_config, os.path.abspath(args.tokenizer), args.max_length,
                                               jieba=not args.no_jieba)
    pieces = SentencePieceTokenizer(config.tokenizer.vocab).vocab_size
    if pieces != config.vocab_size:
        raise ValueError(f"--tokenizer {args.tokenizer} has {pieces} pieces but the LM's vocab_size is "
                         f"{config.vocab_size}: give the tokenizer the checkpoint was trained with")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    written = save_enhancer(args.out, config, state, args.dtype or "fp32")
    print(f"\nconverted:\n  {written['weights']}: {len(state)} tensors, "
          f"{sum(v.size for v in state.values()):,} parameters (from {args.source}, transformers LLaMA layout)\n"
          f"  {written['config']}, {written['tokenizer']}")


def run_aesthetic(args) -> None:
    from pangu_draw_ms.evaluation.aesthetic import AESTHETIC_WEIGHTS, aesthetic_from_torch, save_aesthetic
    from pangu_draw_ms.io.checkpoint import load_tensors

    check_output(args, [args.source], [os.path.join(args.out, AESTHETIC_WEIGHTS)])
    config, state = aesthetic_from_torch(load_tensors(resolve_checkpoint_path(args.source)))
    written = save_aesthetic(args.out, config, state)
    print(f"\nconverted:\n  {written['weights']}: {len(state)} tensors, {sum(v.size for v in state.values()):,} "
          f"parameters (from {os.path.basename(args.source)}, LAION aesthetic predictor on {config.embed_dim}-d "
          f"CLIP embeddings)\n  {written['config']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    released = commands.add_parser("released", help="split the released PanGu-Draw 3.0 .ckpt pair")
    released.add_argument("--structure", help="the structure (high-timestep) file, pangu_high_timestamp-*.ckpt")
    released.add_argument("--texture", help="the texture (low-timestep) file, pangu_low_timestamp-*.ckpt; "
                                            "its text encoders and VAE are the ones kept")
    released.add_argument("--config", default="pangu_draw_v3", help="bundled config name or YAML path")
    released.add_argument("--allow-swapped", action="store_true",
                          help="convert even when the files look swapped (a warning instead of an error)")
    diffusers = commands.add_parser("diffusers", help="convert diffusers/transformers weights")
    diffusers.add_argument("source", help="pipeline folder, model folder, or weights file")
    diffusers.add_argument("--component", choices=[c for c in COMPONENTS if c != "conditioner"])
    diffusers.add_argument("--config", help="YAML of the component's config (when there is no config.json)")
    diffusers.add_argument("--name", help="output file name without suffix (default: the component)")
    diffusers.add_argument("--output-layer", default="last", choices=["last", "penultimate"],
                           help="text encoders: which hidden states the converted config uses")
    inception = commands.add_parser("inception", help="the FID Inception-v3 weights of pytorch-fid (for FID and IS)")
    inception.add_argument("source", help="pt_inception-2015-12-05-6726825d.pth")
    llama = commands.add_parser("llama", help="a transformers LLaMA causal LM -> a prompt enhancer directory")
    llama.add_argument("source", help="folder with config.json and model.safetensors")
    llama.add_argument("--tokenizer", required=True, help="the SentencePiece .model its ids come from")
    llama.add_argument("--max-length", type=int, help="context window (default: max_position_embeddings)")
    llama.add_argument("--no-jieba", action="store_true", help="the tokenizer was trained without jieba segmentation")
    aesthetic = commands.add_parser("aesthetic", help="LAION's improved aesthetic predictor (.pth) -> a scorer folder")
    aesthetic.add_argument("source", help="e.g. sac+logos+ava1-l14-linearMSE.pth")
    for command in (released, diffusers, inception, llama, aesthetic):
        command.add_argument("--out", required=True, help="output folder")
        command.add_argument("--allow-inside-source", action="store_true",
                             help="allow an output folder inside the input folder (input files are never overwritten)")
        command.add_argument("--dtype", choices=["fp32", "fp16"], help="floating dtype of the output (default: keep)")
        command.add_argument("--format", default="safetensors", choices=["safetensors", "ckpt"])
    args = parser.parse_args(argv)
    if args.command == "released" and not (args.structure or args.texture):
        parser.error("released: give --structure, --texture or both")
    try:
        {"released": run_released, "diffusers": run_diffusers, "inception": run_inception,
         "llama": run_llama, "aesthetic": run_aesthetic}[args.command](args)
    except (ValueError, KeyError) as err:  # CheckpointError, StateDictError, ConfigError, swapped files
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
