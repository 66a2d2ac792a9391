"""diffusers ``UNet2DConditionModel`` on-disk names -> our sgm-layout UNet names.

Covers the SDXL family (``add_embedding`` of the ``text_time`` addition -> ``label_emb``) and the SD1.5
family (no addition embedding, 1x1-conv proj_in/proj_out). Tensors are passed through unchanged: the two
layouts agree on every shape; only names differ (and norms are ``gamma``/``beta`` on our side).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import numpy as np

from ..config import UNetConfig
from .config_options import ConfigOptions, UnsupportedOptionError

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_NORM_LEAF = re.compile(r"(^|\.)(norm\d?|conv_norm_out)$")


class UnmappedKeyError(KeyError):
    """A diffusers key that has no place in the target layout."""


def _resnet(rest: str) -> str:
    part, _, tail = rest.partition(".")
    if part not in _RESNET_PARTS:
        raise UnmappedKeyError(part)
    return f"{_RESNET_PARTS[part]}.{tail}" if tail else _RESNET_PARTS[part]


def map_module(module: str, config: UNetConfig) -> str:
    """Our module path for a diffusers UNet module path (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``); :class:`UnmappedKeyError` when it has none."""
    n = config.num_res_blocks
    levels = len(config.channel_mult)
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * (n + 1) + index
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        kind, index, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_resnet(rest)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        up, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = up * (n + 1) + index
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module)
    if m:
        up = int(m[1])
        level = levels - 1 - up
        position = 2 if config.transformer_depth[level] > 0 else 1
        return f"output_blocks.{up * (n + 1) + n}.{position}.conv"
    raise UnmappedKeyError(module)


def diffusers_attention_module(module: str, config: UNetConfig) -> str:
    """The diffusers path of a module inside one of our transformer blocks (``input_blocks.4.1.proj_in`` ->
    ``down_blocks.1.attentions.0.proj_in``): the inverse of :func:`map_module` there (what LoRA files name);
    :class:`UnmappedKeyError` for a module outside the attention blocks."""
    n = config.num_res_blocks
    m = re.fullmatch(r"input_blocks\.(\d+)\.1\.(.+)", module)
    if m and int(m[1]) >= 1:
        level, index = divmod(int(m[1]) - 1, n + 1)
        return f"down_blocks.{level}.attentions.{index}.{m[2]}"
    m = re.fullmatch(r"middle_block\.1\.(.+)", module)
    if m:
        return f"mid_block.attentions.0.{m[1]}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.1\.(.+)", module)
    if m:
        up, index = divmod(int(m[1]), n + 1)
        return f"up_blocks.{up}.attentions.{index}.{m[2]}"
    raise UnmappedKeyError(module)


def diffusers_unet_kwargs(config: UNetConfig, addition_time_embed_dim: int = 256) -> dict:
    """``UNet2DConditionModel(**kwargs)`` arguments describing the same architecture as ``config``.

    With ``adm_in_channels`` set, the vector conditioning is diffusers' ``text_time`` addition: pooled text
    || sinusoidal(``addition_time_embed_dim``) of one "time id" per sample, which is the bucket index.
    """
    channels = tuple(config.model_channels * m for m in config.channel_mult)
    kwargs = dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in config.transformer_depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(config.transformer_depth)),
        block_out_channels=channels,
        layers_per_block=config.num_res_blocks,
        # Levels without attention ignore their entry; the middle block takes the last one.
        transformer_layers_per_block=tuple(max(d, 1) for d in config.transformer_depth[:-1])
        + (config.transformer_depth_middle,),
        # diffusers' "attention_head_dim" is the number of heads per level (a historic misnomer).
        attention_head_dim=tuple(config.heads(c)[0] for c in channels),
        cross_attention_dim=config.context_dim,
        norm_num_groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_in_transformer,
        mid_block_type="UNetMidBlock2DCrossAttn",
    )
    if config.transformer_depth[-1] and config.transformer_depth[-1] != config.transformer_depth_middle:
        raise ValueError("diffusers gives the middle block the depth of the last level: "
                         f"transformer_depth[-1] {config.transformer_depth[-1]} "
                         f"!= middle {config.transformer_depth_middle}")
    if config.adm_in_channels is not None:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
                      projection_class_embeddings_input_dim=config.adm_in_channels)
    return kwargs


def unet_from_diffusers(state: Mapping[str, np.ndarray], config: UNetConfig) -> Dict[str, np.ndarray]:
    """Rename a diffusers UNet state dict for our :class:`~pangu_draw_ms.models.unet.UNetModel`.

    ``config`` must describe the same architecture (it fixes block indices). Raises ``ValueError``
    listing the keys that have no counterpart in our layout.
    """
    out: Dict[str, np.ndarray] = {}
    unmapped = []
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        try:
            target = map_module(module, config)
        except UnmappedKeyError:
            unmapped.append(key)
            continue
        if _NORM_LEAF.search(module):
            leaf = {"weight": "gamma", "bias": "beta"}.get(leaf, leaf)
        out[f"{target}.{leaf}"] = value
    if unmapped:
        shown = ", ".join(unmapped[:10]) + (f" (+{len(unmapped) - 10} more)" if len(unmapped) > 10 else "")
        raise ValueError(f"{len(unmapped)} diffusers UNet key(s) have no counterpart in the sgm layout: {shown}")
    return out


_DOWN_TO_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_PIPELINE_SIZE = "the default image size of diffusers pipelines; our resolution buckets size the image"
UNET_OPTIONS = ConfigOptions(
    "diffusers UNet config",
    read=("in_channels", "out_channels", "down_block_types", "up_block_types", "mid_block_type", "block_out_channels",
          "layers_per_block", "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
          "attention_head_dim", "num_attention_heads", "use_linear_projection", "addition_embed_type",
          "projection_class_embeddings_input_dim", "dropout", "time_embedding_dim"),
    # The sgm UNet's computation (a list of only_cross_attention flags is reduced to one first).
    fixed={"class_embed_type": (None,), "num_class_embeds": (None,), "class_embeddings_concat": (False,),
           "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "time_cond_proj_dim": (None,),
           "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
           "resnet_out_scale_factor": (1.0,), "only_cross_attention": (False,),
           "mid_block_only_cross_attention": (None, False), "dual_cross_attention": (False,),
           "cross_attention_norm": (None,), "act_fn": ("silu",), "center_input_sample": (False,),
           "flip_sin_to_cos": (True,), "freq_shift": (0,), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
           "conv_in_kernel": (3,), "conv_out_kernel": (3,), "time_embedding_type": ("positional",),
           "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
           "attention_type": ("default",), "reverse_transformer_layers_per_block": (None,), "norm_eps": (1e-5,)},
    inert={"sample_size": _PIPELINE_SIZE,
           "upcast_attention": "our attention always takes its softmax in float32",
           "addition_time_embed_dim": "it says how the vector conditioning is built (our conditioner's "
                                      "bucket_embed_dim); the UNet sees only its width, "
                                      "projection_class_embeddings_input_dim",
           "addition_embed_type_num_heads": "used only by addition_embed_type 'text', which is refused"})


def _normalised(config: Mapping) -> dict:
    """``config`` with a list of only_cross_attention flags that are all False reduced to one False."""
    config = dict(config)
    flags = config.get("only_cross_attention", False)
    if isinstance(flags, (list, tuple)) and not any(flags):
        config["only_cross_attention"] = False
    return config


def _per_level(value, levels: int, what: str) -> list:
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels:
        raise ValueError(f"diffusers config: {what} has {len(values)} entries for {levels} blocks")
    return values


def unet_config_from_diffusers(config: Mapping, options: ConfigOptions = UNET_OPTIONS) -> UNetConfig:
    """Our :class:`UNetConfig` from a diffusers ``UNet2DConditionModel`` config dict (``config.json``;
    ``options`` is the option table, :data:`UNET_OPTIONS` or a ControlNet's). Raises
    :class:`UnsupportedOptionError` (a ``ValueError``) naming any option our sgm-layout UNet does not honour."""
    config = _normalised(config)
    options.check(config)
    down = list(config["down_block_types"])
    unknown = sorted(set(down) - set(_DOWN_TO_UP))
    if unknown:
        raise UnsupportedOptionError(f"{options.what}: block types {unknown} are not supported; supported: "
                                     f"{sorted(_DOWN_TO_UP)}")
    if "up_block_types" in config:
        mirrored = [_DOWN_TO_UP[kind] for kind in reversed(down)]
        if list(config["up_block_types"]) != mirrored:
            raise UnsupportedOptionError(f"{options.what}: up_block_types {list(config['up_block_types'])} do not "
                                         f"mirror down_block_types (expected {mirrored}), as our UNet's decoder does")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise UnsupportedOptionError(f"{options.what}: mid_block_type {config['mid_block_type']!r} is not supported "
                                     "(only 'UNetMidBlock2DCrossAttn')")
    layers_per_block = config.get("layers_per_block", 2)
    if isinstance(layers_per_block, (list, tuple)):
        if len(set(layers_per_block)) != 1:
            raise UnsupportedOptionError(f"{options.what}: layers_per_block {list(layers_per_block)} differs per "
                                         "level; our UNet has one number of res blocks for every level")
        layers_per_block = layers_per_block[0]
    norm_num_groups = config.get("norm_num_groups", 32)
    if norm_num_groups is None:
        raise UnsupportedOptionError(f"{options.what}: norm_num_groups=None (no group norms) is not supported; "
                                     "our UNet normalises with GroupNorm (e.g. 32 groups)")
    levels = len(down)
    channels = list(config["block_out_channels"])
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        raise UnsupportedOptionError(f"{options.what}: block_out_channels {channels} are not multiples of the first")
    if config.get("time_embedding_dim") not in (None, 4 * model_channels):
        raise UnsupportedOptionError(f"{options.what}: time_embedding_dim={config['time_embedding_dim']} is not "
                                     f"supported (only None or 4 x block_out_channels[0] = {4 * model_channels})")
    layers = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    if any(not isinstance(n, int) for n in layers):
        raise UnsupportedOptionError(f"{options.what}: per-block lists of transformer_layers_per_block are not "
                                     "supported")
    depth = tuple(n if kind.startswith("CrossAttn") else 0 for n, kind in zip(layers, down))
    heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8), levels,
                       "attention_head_dim")
    widths = {c // h for c, h, kind in zip(channels, heads, down) if kind.startswith("CrossAttn")}
    widths.add(channels[-1] // heads[-1])  # the middle block
    if len(set(heads)) == 1:
        head_kwargs = dict(num_heads=heads[0], num_head_channels=None)
    elif len(widths) == 1:
        head_kwargs = dict(num_head_channels=widths.pop(), num_heads=None)
    else:
        raise UnsupportedOptionError(f"{options.what}: heads {heads} over channels {channels} have neither one count "
                                     "nor one width; our UNet needs one of the two")
    addition = config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise UnsupportedOptionError(f"{options.what}: addition_embed_type {addition!r} is not supported "
                                     "(only None or 'text_time')")
    context_dim = config.get("cross_attention_dim", 1280)
    if not isinstance(context_dim, int):
        raise UnsupportedOptionError(f"{options.what}: a per-block cross_attention_dim is not supported")
    return UNetConfig(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        model_channels=model_channels, channel_mult=tuple(c // model_channels for c in channels),
        num_res_blocks=layers_per_block, transformer_depth=depth,
        transformer_depth_middle=layers[-1], context_dim=context_dim,
        adm_in_channels=config.get("projection_class_embeddings_input_dim") if addition else None,
        use_linear_in_transformer=config.get("use_linear_projection", False),
        norm_num_groups=norm_num_groups, dropout=float(config.get("dropout", 0.0)), **head_kwargs)
