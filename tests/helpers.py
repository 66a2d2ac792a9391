"""Shared helpers for parity tests: re-randomise reference weights, compare outputs."""
from __future__ import annotations

import sys

import numpy as np

from pangu_draw_ms.config import UNetConfig
from pangu_draw_ms.io.diffusers_unet import diffusers_unet_kwargs
from pangu_draw_ms.runtime import eager


def randomize_torch_module(module, seed: int = 0, scale: float = 0.2) -> None:
    """Overwrite EVERY floating parameter and buffer of a torch module with seeded random values.

    Zero-initialised convolutions and unit norms hide wrong weight mappings; after this no two
    parameters of the same shape hold the same values. Norm scales stay near 1 so activations stay
    in a sane range through deep stacks.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name.lower() or "ln_" in name or ".ln" in name
            if is_norm and leaf == "weight":
                p.copy_(1.0 + 0.1 * noise)
            elif leaf == "bias" or p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise * min(scale, 1.0 / np.sqrt(fan_in)))


def torch_state_numpy(module) -> dict:
    """On-disk style state dict of a torch module as float32 numpy arrays (persistent entries only)."""
    return {k: v.detach().float().numpy().copy() for k, v in module.state_dict().items()}


def max_relative_error(ours, reference) -> float:
    """max |ours - reference| divided by max |reference| (the output's scale)."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, f"shape {ours.shape} != reference {reference.shape}"
    scale = max(np.abs(reference).max(), 1e-12)
    return float(np.abs(ours - reference).max() / scale)


def assert_close(ours, reference, rel: float = 1e-4, what: str = "output") -> float:
    """Assert max abs difference <= rel x output scale; returns and prints the relative error."""
    err = max_relative_error(ours, reference)
    print(f"{what}: max |diff| / max |ref| = {err:.3e}")
    assert err <= rel, f"{what}: relative max difference {err:.3e} exceeds {rel:.1e}"
    return err


# ---- tiny reference UNets ------------------------------------------------------------------------
POOLED, BUCKET_DIM, CONTEXT = 8, 16, 24

# Three levels, attention at levels 2 and 3 with different depths, two res blocks per level: every
# index rule of the layout (skip convs, downsample/upsample positions, stage with/without attention).
SDXL_LIKE = UNetConfig(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2, transformer_depth=(0, 1, 2),
                       transformer_depth_middle=2, num_head_channels=16, context_dim=CONTEXT,
                       adm_in_channels=POOLED + BUCKET_DIM, norm_num_groups=8)
# SD1.5 family: fixed head count, 1x1-conv projections, attention from the first level, no vector.
SD15_LIKE = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0),
                       transformer_depth_middle=1, num_head_channels=None, num_heads=2, context_dim=CONTEXT,
                       adm_in_channels=None, use_linear_in_transformer=False, norm_num_groups=8)


def diffusers_unet(config: UNetConfig):
    """A diffusers UNet2DConditionModel of the same architecture, every weight re-randomised (seeded)."""
    import diffusers

    model = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(config, addition_time_embed_dim=BUCKET_DIM)).eval()
    randomize_torch_module(model, seed=1)
    return model


def tiny_config(tmp_path, dataset, weights, *overrides):
    """The tiny training config on the ``dataset`` and ``weights`` fixtures' square images (conftest.py)."""
    from pangu_draw_ms.training.config import load_train_config

    return load_train_config("train/tiny", (
        f"model={weights['model']}", f"output_dir={tmp_path}/run", f"data.manifest={dataset}/square.jsonl",
        f"init.vae={weights['vae']}", "data.batch_size=2", "save_every=0", "optim.warmup_steps=0",
        "log_every=100") + overrides)


def in_pynative(call, *args, **kwargs):
    """``call(*args, **kwargs)`` in PYNATIVE_MODE, the mode restored after: the eager reference of a compiled
    path (it shares no compiled code with the graph), or a check that needs no graph of its own."""
    with eager():
        return call(*args, **kwargs)


# Keeps the torchvision operator declarations of make_torchvision_importable alive (freed, they are dropped).
_TORCHVISION_OP_DECLARATIONS = []


def make_torchvision_importable() -> None:
    """Let the reference packages that import torchvision (pytorch-fid's Inception, transformers' CLIP image
    processors, torchmetrics' multimodal metrics, cn_clip) import beside the CPU torch.

    The only torchvision 0.28 wheel this machine's package index has is PyPI's CUDA build: its ``_C.so`` does
    not load next to torch 2.13.0+cpu (libc10_cuda.so is missing), torchvision goes on without its C++ ops,
    but its import then registers fake kernels for ``torchvision::nms``/``qnms`` and fails on the undefined
    operators. Declaring those two schemas (no kernels) lets the pure-Python parts import; no test calls them.
    """
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError:
        return  # not installed: the tests that need it skip
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OP_DECLARATIONS.append(library)
        import torchvision  # noqa: F401
