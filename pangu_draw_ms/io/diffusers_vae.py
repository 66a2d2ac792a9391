"""Map a diffusers ``AutoencoderKL`` state dict onto :class:`pangu_draw_ms.models.vae.AutoencoderKL`.

Input: the on-disk names that diffusers' ``save_pretrained`` writes (``vae/diffusion_pytorch_model.*``),
as ``{name: numpy array}``. Output: our LDM/sgm names, ready for ``io.state.load_state``. Differences:

* ``down_blocks.{i}.resnets.{j}`` -> ``down.{i}.block.{j}``; ``conv_shortcut`` -> ``nin_shortcut``;
  ``downsamplers.0`` -> ``downsample``, ``upsamplers.0`` -> ``upsample``.
* ``decoder.up_blocks`` run in application order (``up_blocks.0`` is the coarsest level) while LDM's
  ``decoder.up`` is indexed by level: ``up_blocks.{k}`` -> ``up.{num_levels - 1 - k}``.
* ``mid_block.resnets.{0,1}`` -> ``mid.block_{1,2}``; ``mid_block.attentions.0`` -> ``mid.attn_1`` with
  ``group_norm``/``to_q``/``to_k``/``to_v``/``to_out.0`` (or the pre-0.14 names ``query``/``key``/
  ``value``/``proj_attn``) -> ``norm``/``q``/``k``/``v``/``proj_out``. The projections are Linear
  weights [C, C] in diffusers and 1x1 convolutions [C, C, 1, 1] in ours.
* ``conv_norm_out`` -> ``norm_out``; norm ``weight``/``bias`` -> ``gamma``/``beta``.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import numpy as np

from ..config import VAEConfig
from .config_options import ConfigOptions, UnsupportedOptionError

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "conv_shortcut": "nin_shortcut"}
_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_OUTER_PARTS = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
_NORMS = {"norm1", "norm2", "norm", "norm_out"}
_ATTENTION_PROJECTIONS = {"q", "k", "v", "proj_out"}

_UP_BLOCK = re.compile(r"decoder\.up_blocks\.(\d+)\.")
_SHOW = 10


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in names)


# (pattern over the module path, then ".weight|bias"; builder of our module path from the match and
# the number of decoder levels)
_RULES = tuple((re.compile(pattern + r"\.(weight|bias)"), build) for pattern, build in (
    (rf"(encoder|decoder)\.({_alternatives(_OUTER_PARTS)})",
     lambda m, n: f"{m[1]}.{_OUTER_PARTS[m[2]]}"),
    (r"(quant_conv|post_quant_conv)",
     lambda m, n: m[1]),
    (rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.({_alternatives(_RESNET_PARTS)})",
     lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET_PARTS[m[3]]}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv",
     lambda m, n: f"encoder.down.{m[1]}.downsample.conv"),
    (rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.({_alternatives(_RESNET_PARTS)})",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_RESNET_PARTS[m[3]]}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv"),
    (rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.({_alternatives(_RESNET_PARTS)})",
     lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET_PARTS[m[3]]}"),
    (rf"(encoder|decoder)\.mid_block\.attentions\.0\.({_alternatives(_ATTENTION_PARTS)})",
     lambda m, n: f"{m[1]}.mid.attn_1.{_ATTENTION_PARTS[m[2]]}"),
))


def vae_from_diffusers(state: Mapping[str, np.ndarray], config: Optional[VAEConfig] = None) -> Dict[str, np.ndarray]:
    """Rename (and reshape) a diffusers ``AutoencoderKL`` state dict to our parameter names.

    ``config`` fixes the number of decoder levels (``up_blocks.{k}`` -> ``up.{levels - 1 - k}``); without
    it the levels are counted in ``state``, which must then hold the whole decoder. Raises ``ValueError``
    naming the entries that are not diffusers AutoencoderKL weights, or when two entries (e.g. ``to_q``
    and the legacy ``query``) map onto the same parameter. Whether the result fits a given model
    (missing entries, shapes) is checked by ``io.state.load_state``.
    """
    if config is not None:
        num_levels = len(config.channel_mult)
    else:
        up_levels = {int(m[1]) for m in (_UP_BLOCK.match(name) for name in state) if m}
        num_levels = max(up_levels) + 1 if up_levels else 0

    converted: Dict[str, np.ndarray] = {}
    unknown = []
    for name, value in state.items():
        for pattern, build in _RULES:
            match = pattern.fullmatch(name)
            if match:
                break
        else:
            unknown.append(name)
            continue
        module = build(match, num_levels)
        part = module.rsplit(".", 1)[-1]
        leaf = match.groups()[-1]
        if part in _NORMS:
            leaf = "gamma" if leaf == "weight" else "beta"
        if part in _ATTENTION_PROJECTIONS and leaf == "weight" and np.ndim(value) == 2:
            value = np.reshape(value, tuple(np.shape(value)) + (1, 1))
        target = f"{module}.{leaf}"
        if target in converted:
            raise ValueError(f"diffusers VAE state: {name!r} maps onto {target!r}, which another entry already "
                             "filled (a state dict with both the new and the legacy attention names?)")
        converted[target] = value
    if unknown:
        more = f" (+{len(unknown) - _SHOW} more)" if len(unknown) > _SHOW else ""
        raise ValueError(
            f"{len(unknown)} entr{'y is' if len(unknown) == 1 else 'ies are'} not diffusers AutoencoderKL "
            f"weights: {', '.join(sorted(unknown)[:_SHOW])}{more}. Expected names such as "
            "'encoder.down_blocks.0.resnets.0.conv1.weight' or 'decoder.mid_block.attentions.0.to_q.weight' "
            "(the vae/ folder of a diffusers pipeline, without a 'vae.' prefix)")
    return converted


VAE_OPTIONS = ConfigOptions(
    "diffusers VAE config",
    read=("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
          "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor", "force_upcast"),
    # shift_factor and latents_mean/std change how latents are normalised around the VAE (SD3, Flux,
    # Playground); our latent scale is scaling_factor alone.
    fixed={"act_fn": ("silu",), "mid_block_add_attention": (True,), "use_quant_conv": (True,),
           "use_post_quant_conv": (True,), "shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,)},
    inert={"sample_size": "the tile size of diffusers' tiled decoding; our VAE decodes whole latents"})


def vae_config_from_diffusers(config: Mapping) -> VAEConfig:
    """Our :class:`VAEConfig` from a diffusers ``AutoencoderKL`` config dict (``config.json``). Raises
    :class:`UnsupportedOptionError` (a ``ValueError``) naming any option our VAE does not honour."""
    VAE_OPTIONS.check(config)
    channels = list(config["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise UnsupportedOptionError(f"diffusers VAE config: block_out_channels {channels} are not multiples of the "
                                     "first")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        blocks = list(config.get(key, [kind] * len(channels)))
        if blocks != [kind] * len(channels):
            raise UnsupportedOptionError(f"diffusers VAE config: {key} {blocks} is not supported (only {kind!r}, one "
                                         f"per entry of block_out_channels: {len(channels)})")
    return VAEConfig(in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
                     base_channels=base, channel_mult=tuple(c // base for c in channels),
                     num_res_blocks=config.get("layers_per_block", 1), latent_channels=config.get("latent_channels", 4),
                     norm_num_groups=config.get("norm_num_groups", 32),
                     scaling_factor=float(config.get("scaling_factor", 0.18215)),
                     force_fp32=bool(config.get("force_upcast", True)))
