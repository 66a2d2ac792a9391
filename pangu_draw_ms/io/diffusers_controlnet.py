"""diffusers ``ControlNetModel`` on-disk names -> our sgm-layout :class:`~pangu_draw_ms.models.controlnet.ControlNet`.

The ControlNet-only parts are renamed here; everything it shares with the UNet (``time_embedding``,
``add_embedding``, ``conv_in``, ``down_blocks``, ``mid_block``) goes through the UNet mapping:

* ``controlnet_cond_embedding.conv_in`` -> ``input_hint_block.0``; ``...blocks.{k}`` ->
  ``input_hint_block.{2k + 2}``; ``...conv_out`` -> the last conv (SiLUs sit at the odd indices);
* ``controlnet_down_blocks.{i}`` -> ``zero_convs.{i}.0``; ``controlnet_mid_block`` -> ``middle_block_out.0``.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import numpy as np

from ..config import ControlNetConfig
from .config_options import ConfigOptions, UnsupportedOptionError
from .diffusers_unet import UNET_OPTIONS, diffusers_unet_kwargs, unet_config_from_diffusers, unet_from_diffusers

# A ControlNet's config is its UNet encoder's plus the conditioning embedding (checked below).
CONTROLNET_OPTIONS = ConfigOptions(
    "diffusers ControlNet config",
    read=UNET_OPTIONS.read + ("conditioning_channels", "conditioning_embedding_out_channels",
                              "controlnet_conditioning_channel_order", "global_pool_conditions"),
    fixed=UNET_OPTIONS.fixed, inert=UNET_OPTIONS.inert)
_HINT_BLOCK = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)")


def _controlnet_name(name: str, config: ControlNetConfig):
    """Our name for a ControlNet-only diffusers entry, or None for entries shared with the UNet."""
    module, _, leaf = name.rpartition(".")
    if module == "controlnet_cond_embedding.conv_in":
        return f"input_hint_block.0.{leaf}"
    match = _HINT_BLOCK.fullmatch(name)
    if match:
        return f"input_hint_block.{2 * int(match[1]) + 2}.{leaf}"
    if module == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{4 * len(config.hint_channels) - 2}.{leaf}"
    match = re.fullmatch(r"controlnet_down_blocks\.(\d+)", module)
    if match:
        return f"zero_convs.{match[1]}.0.{leaf}"
    if module == "controlnet_mid_block":
        return f"middle_block_out.0.{leaf}"
    return None


def controlnet_from_diffusers(state: Mapping[str, np.ndarray], config: ControlNetConfig) -> Dict[str, np.ndarray]:
    """Rename a diffusers ControlNet state dict for our ControlNet of architecture ``config``.

    Raises ``ValueError`` listing keys that belong to neither the ControlNet parts nor the UNet encoder.
    """
    out: Dict[str, np.ndarray] = {}
    shared = {}
    for name, value in state.items():
        ours = _controlnet_name(name, config)
        if ours is None:
            shared[name] = value
        else:
            out[ours] = value
    out.update(unet_from_diffusers(shared, config.unet))
    return out


def diffusers_controlnet_kwargs(config: ControlNetConfig, addition_time_embed_dim: int = 256) -> dict:
    """``ControlNetModel(**kwargs)`` arguments describing the same architecture as ``config``."""
    kwargs = diffusers_unet_kwargs(config.unet, addition_time_embed_dim)
    del kwargs["out_channels"], kwargs["up_block_types"]
    kwargs.update(conditioning_channels=config.conditioning_channels,
                  conditioning_embedding_out_channels=tuple(config.hint_channels))
    return kwargs


def controlnet_config_from_diffusers(config: Mapping) -> ControlNetConfig:
    """Our :class:`ControlNetConfig` from a diffusers ``ControlNetModel`` config dict (``config.json``)."""
    order = config.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise UnsupportedOptionError(f"diffusers ControlNet config: controlnet_conditioning_channel_order {order!r} "
                                     "is not supported (only 'rgb'); flip the control image's channels yourself")
    if config.get("global_pool_conditions", False) is not False:
        raise UnsupportedOptionError("diffusers ControlNet config: global_pool_conditions=True is not supported")
    return ControlNetConfig(unet=unet_config_from_diffusers(config, CONTROLNET_OPTIONS),
                            conditioning_channels=config.get("conditioning_channels", 3),
                            hint_channels=tuple(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)))
