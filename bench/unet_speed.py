"""Time one UNet forward of ours (MindSpore, GRAPH_MODE) against diffusers on the same config and weights.

Both run on the CPU in this one process, interleaved (one forward of each per round), with the same thread
count, each oneDNN at the ISA it has on its own (the package caps MindSpore's at AVX2 through the
environment, which torch's oneDNN reads too: the cap is lifted once MindSpore's has read it). The script
prints seconds per forward (median of --repeats after --warmup) and the ratio ours / diffusers. A third
side, the same network with MindSpore's ops where the package has CPU kernels (models/cpu_kernels.py:
GroupNorm + SiLU, LayerNorm, GEGLU), shows what those are worth.
PyTorch timings collapse when another process is busy: run this on a quiet machine.

    python bench/unet_speed.py --config tiny --latent 32 32
    python bench/unet_speed.py --config mid --latent 64 64 --batch 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from pangu_draw_ms.config import UNetConfig, load_config  # noqa: E402

from timing import interleaved_medians, pin_to_cores  # noqa: E402

# A mid-size SDXL-layout UNet (~0.4B parameters): large enough that kernels, not dispatch, dominate.
MID = UNetConfig(model_channels=160, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 2, 4),
                 transformer_depth_middle=4, num_head_channels=32, context_dim=2048, adm_in_channels=1536)


def unet_config(name: str) -> UNetConfig:
    return MID if name == "mid" else load_config(name).unet


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="'mid', a bundled config name or a YAML path")
    parser.add_argument("--latent", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2, help="2 = one guided step (cond + uncond)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pin_to_cores(args.threads)  # every side on the same cores (MindSpore's MatMul would take a second one)

    import mindspore as ms
    import torch

    from helpers import make_torchvision_importable
    make_torchvision_importable()  # before diffusers: this index's torchvision does not import beside the CPU torch
    from diffusers import UNet2DConditionModel

    from pangu_draw_ms import runtime
    from pangu_draw_ms.io.diffusers_unet import diffusers_unet_kwargs, unet_from_diffusers
    from pangu_draw_ms.io.state import load_state
    from pangu_draw_ms.models import cpu_kernels
    from pangu_draw_ms.models import layers as L
    from pangu_draw_ms.models.unet import UNetModel

    torch.set_num_threads(args.threads)
    ms.set_context(mode=ms.GRAPH_MODE, runtime_num_threads=args.threads)
    runtime.set_cpu_threads(args.threads)
    config = unet_config(args.config)
    bucket_dim = 256 if config.adm_in_channels and config.adm_in_channels > 256 else 16
    reference = UNet2DConditionModel(**diffusers_unet_kwargs(config, addition_time_embed_dim=bucket_dim)).eval()
    ours = UNetModel(config)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    load_state(ours, unet_from_diffusers(state, config), what="diffusers UNet")
    mindspore_norms = UNetModel(config)
    load_state(mindspore_norms, unet_from_diffusers(state, config), what="diffusers UNet")
    for _, cell in mindspore_norms.cells_and_names():
        if hasattr(cell, "use_cpu_kernel"):
            cell.use_cpu_kernel = False

    rng = np.random.default_rng(0)
    b, (h, w) = args.batch, args.latent
    x = rng.standard_normal((b, config.in_channels, h, w)).astype(np.float32)
    t = np.full((b,), 500.0, np.float32)
    context = rng.standard_normal((b, 77, config.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((b, config.adm_in_channels - bucket_dim)).astype(np.float32)
    bucket = np.full((b,), 5.0, np.float32)
    y = np.concatenate([pooled, L.sinusoidal_embedding(ms.Tensor(bucket), bucket_dim).asnumpy()], axis=1)

    ms_inputs = [ms.Tensor(a) for a in (x, t, context, y)]
    torch_inputs = [torch.from_numpy(a) for a in (x, t, context)]
    added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(bucket[:, None])}

    def run_ours():
        return ours(*ms_inputs).asnumpy()

    def run_mindspore_norms():
        return mindspore_norms(*ms_inputs).asnumpy()

    def run_reference():
        with torch.no_grad():
            return reference(torch_inputs[0], torch_inputs[1], encoder_hidden_states=torch_inputs[2],
                             added_cond_kwargs=added).sample.numpy()

    start = time.perf_counter()
    out = run_ours()
    compile_s = time.perf_counter() - start
    runtime.lift_onednn_cap()  # torch's oneDNN at its own default from here (MindSpore's keeps the cap)
    err = np.abs(out - run_reference()).max() / np.abs(run_reference()).max()
    run_mindspore_norms()
    medians = interleaved_medians({"ours": run_ours, "diffusers": run_reference, "norms": run_mindspore_norms},
                                  args.warmup, args.repeats)
    ours_s, ref_s = medians["ours"], medians["diffusers"]
    params = L.count_parameters(ours)
    print(f"config={args.config} params={params:,} batch={b} latent={h}x{w} threads={args.threads}")
    print(f"first call (compile + run) ours: {compile_s:.2f} s; max rel diff vs diffusers {err:.2e}")
    print(f"ours (MindSpore {ms.__version__}, GRAPH): {ours_s:.4f} s/forward")
    print(f"diffusers (torch {torch.__version__}):     {ref_s:.4f} s/forward")
    print(f"ratio ours/diffusers: {ours_s / ref_s:.2f}")
    print(f"ours with MindSpore's ops for our kernels: {medians['norms']:.4f} s/forward, "
          f"{medians['norms'] / ref_s:.2f}x diffusers (cpu_kernels library: {cpu_kernels.library()})")


if __name__ == "__main__":
    main()
