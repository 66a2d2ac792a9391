"""Seconds per denoising step and per image: our pipeline vs diffusers' StableDiffusionXLPipeline with the
same UNet/VAE weights, embeddings, noise, Euler steps and guidance, both on the CPU in this one process.

    python bench/pipeline_speed.py --config tiny --size 256 256 --steps 10
    python bench/pipeline_speed.py --config mid --size 512 512 --steps 4

``mid`` is the SDXL layout at ~0.4B UNet parameters (bench/unet_speed.py's MID) with the full SDXL VAE and
two one-layer text encoders of the released widths (768 + 1280). Both sides run interleaved (one
run of each per round); prints the medians and ratios - ours with each step one compiled graph, ours with
the host loop, diffusers - and the max relative difference of the final latents (the same computation).
PyTorch timings collapse when another process is busy: run on a quiet machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def bench_config(name: str, height: int, width: int):
    from pangu_draw_ms.config import (
        ConditionerConfig,
        PanGuDrawConfig,
        TextEncoderConfig,
        TokenizerConfig,
        VAEConfig,
        load_config,
    )

    from unet_speed import MID

    if name == "mid":
        encoders = (
            TextEncoderConfig(vocab_size=21128, hidden_size=768, num_layers=1, num_heads=12, intermediate_size=3072,
                              tokenizer=TokenizerConfig(kind="wordpiece")),
            TextEncoderConfig(vocab_size=49408, hidden_size=1280, num_layers=2, num_heads=20, intermediate_size=5120,
                              hidden_act="gelu", output_layer="penultimate", projection_dim=1280),
        )
        config = PanGuDrawConfig(name="mid", unet=MID, vae=VAEConfig(),
                                 conditioner=ConditionerConfig(encoders=encoders))
    else:
        config = load_config(name)
    return dataclasses.replace(config, structure_buckets=((height, width),))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="'mid' or a bundled config name / YAML path")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import mindspore as ms
    import torch

    from helpers import make_torchvision_importable
    make_torchvision_importable()  # before diffusers: this index's torchvision does not import beside the CPU torch
    from pangu_draw_ms import runtime

    from reference_pipeline import build_pair, reference_run
    from timing import interleaved_medians, report

    torch.set_num_threads(args.threads)
    ms.set_context(mode=ms.GRAPH_MODE)
    runtime.set_cpu_threads(args.threads)
    height, width = args.size
    config = bench_config(args.config, height, width)
    ours, reference = build_pair(config, randomize=False)
    f = config.vae.downsample_factor
    shape = (1, config.unet.in_channels, height // f, width // f)
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    prompt = "一个红色的圆形 a red circle"
    common = dict(height=height, width=width, guidance_scale=args.guidance_scale, noise=noise)

    def run_ours(steps, output_type, compiled=None):
        return ours(prompt, num_inference_steps=steps, spacing="leading", sampler="euler", output_type=output_type,
                    compiled=compiled, **common)

    def run_reference(steps, output_type):
        with torch.no_grad():
            return reference_run(reference, ours, prompt, bucket_index=0, steps=steps, output_type=output_type,
                                 **common)

    run_ours(2, "pil")  # compile every graph (both experts, VAE, text encoders) before timing
    runtime.lift_onednn_cap()  # torch's oneDNN at its own default from here (MindSpore's keeps the cap)
    run_ours(2, "latent", compiled=False)
    run_reference(1, "pil")
    sampling = interleaved_medians({"ours": lambda: run_ours(args.steps, "latent"),
                                    "ours, host loop": lambda: run_ours(args.steps, "latent", compiled=False),
                                    "diffusers": lambda: run_reference(args.steps, "latent")},
                                   warmup=0, repeats=args.repeats)
    images = interleaved_medians({"ours": lambda: run_ours(args.steps, "pil"),
                                  "diffusers": lambda: run_reference(args.steps, "pil")},
                                 warmup=0, repeats=args.repeats)
    latents = run_ours(args.steps, "latent").latents
    reference_latents = run_reference(args.steps, "latent").numpy()
    diff = np.abs(latents - reference_latents).max() / np.abs(reference_latents).max()
    unet_params = sum(p.size for p in ours.components.get("structure_unet").get_parameters())
    print(f"config={args.config} unet_params={unet_params:,} size={height}x{width} steps={args.steps} "
          f"guidance={args.guidance_scale} threads={args.threads}")
    print(f"per step (sampling only): {report({k: v / args.steps for k, v in sampling.items()})}")
    print(f"per image ({args.steps} steps + text encoders + decode): {report(images)}")
    print(f"latents max rel diff ours vs diffusers {diff:.2e}")


if __name__ == "__main__":
    main()
