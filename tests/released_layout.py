"""Writing files in the released PanGu-Draw 3.0 layout (sgm names, MindSpore suffixes, OpenCLIP English
encoder with fused q/k/v) from our tiny cells, for tests of loading released checkpoints."""
import re

import mindspore as ms
import numpy as np

from pangu_draw_ms.config import load_config
from pangu_draw_ms.io.layouts import build_component
from pangu_draw_ms.io.state import cell_state

TINY = load_config("tiny")


def randomize_cell(cell, seed: int):
    """Every parameter seeded-random (norm scales near 1): a wrong mapping cannot hide behind equal inits."""
    rng = np.random.default_rng(seed)
    for p in cell.get_parameters():
        noise = rng.standard_normal(p.shape).astype(np.float32)
        p.set_data(ms.Tensor(1.0 + 0.1 * noise if p.name.endswith("gamma") else 0.1 * noise))
    return cell


def tiny_cells(seed: int):
    return (randomize_cell(build_component("unet", TINY.unet), seed),
            randomize_cell(build_component("vae", TINY.vae), seed + 1),
            randomize_cell(build_component("conditioner", TINY.conditioner), seed + 2))


def open_clip_state(ours):
    """Our CLIPTextEncoder state in OpenCLIP names with MindSpore suffixes, as the release stores the
    English encoder: fused in_proj (rows q, k, v), text_projection as (width, proj), logit_scale."""
    renames = [(r"^embeddings\.token_embedding\.", "token_embedding."), (r"^final_layer_norm\.", "ln_final."),
               (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
               (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
               (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
               (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
               (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj.")]
    out = {"positional_embedding": ours["embeddings.position_embedding.embedding_table"],
           "text_projection": ours["text_projection.weight"].T.copy(), "logit_scale": np.array(4.6052, np.float32)}
    layers = {int(m[1]) for m in (re.match(r"encoder\.layers\.(\d+)\.", k) for k in ours) if m}
    for n in layers:
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = np.concatenate(
                [ours[f"encoder.layers.{n}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
    for name, value in ours.items():
        for pattern, replacement in renames:
            if re.match(pattern, name):
                out[re.sub(pattern, replacement, name)] = value
    return out


def released_state(unet, vae, conditioner):
    """A whole model in the released sgm layout: all four prefixes, MindSpore suffixes."""
    state = {"model.diffusion_model." + k: v for k, v in cell_state(unet).items()}
    state.update({"first_stage_model." + k: v for k, v in cell_state(vae).items()})
    text = cell_state(conditioner)
    state.update({"conditioner.embedders.0.transformer.text_model." + k[len("encoders.0."):]: v
                  for k, v in text.items() if k.startswith("encoders.0.")})
    english = {k[len("encoders.1."):]: v for k, v in text.items() if k.startswith("encoders.1.")}
    state.update({"conditioner.embedders.1.model." + k: v for k, v in open_clip_state(english).items()})
    return state
