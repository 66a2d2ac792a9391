"""Our pipeline and a diffusers StableDiffusionXLPipeline holding the same UNet and VAE weights.

Used by the end-to-end parity test and by bench/pipeline_speed.py. PanGu-Draw's vector conditioning is
pooled text || sinusoidal(bucket index): in diffusers terms an SDXL "text_time" addition with ONE time id
(the bucket index) instead of SDXL's six size/crop ids, so the reference pipeline supplies that id.
Both pipelines get the same prompt embeddings (ours), the same initial noise and Euler with the same
("leading") timesteps; both experts of ours hold the reference UNet's weights.
"""
from __future__ import annotations

import numpy as np

from pangu_draw_ms.config import PanGuDrawConfig
from pangu_draw_ms.io.diffusers_unet import diffusers_unet_kwargs, unet_from_diffusers
from pangu_draw_ms.io.diffusers_vae import vae_from_diffusers
from pangu_draw_ms.io.state import load_state
from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

from helpers import randomize_torch_module, torch_state_numpy


def diffusers_vae_kwargs(config) -> dict:
    levels = len(config.vae.channel_mult)
    return dict(in_channels=config.vae.in_channels, out_channels=config.vae.out_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(config.vae.base_channels * m for m in config.vae.channel_mult),
                layers_per_block=config.vae.num_res_blocks, latent_channels=config.vae.latent_channels,
                norm_num_groups=config.vae.norm_num_groups, scaling_factor=config.vae.scaling_factor)


def build_pair(config: PanGuDrawConfig, seed: int = 0, randomize: bool = True):
    """(our pipeline, diffusers pipeline) with identical UNet (both experts) and VAE weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    bucket_dim = config.conditioner.bucket_embed_dim
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**diffusers_unet_kwargs(config.unet, addition_time_embed_dim=bucket_dim)).eval()
    vae = AutoencoderKL(**diffusers_vae_kwargs(config)).eval()
    if randomize:
        randomize_torch_module(unet, seed=seed)
        randomize_torch_module(vae, seed=seed + 1)

    ours = PanGuDrawPipeline.from_config(config)
    unet_state = unet_from_diffusers(torch_state_numpy(unet), config.unet)
    for name in ("structure_unet", "texture_unet"):
        load_state(ours.components.get(name), unet_state)
    load_state(ours.components.get("vae"), vae_from_diffusers(torch_state_numpy(vae)))

    class BucketIndexSDXLPipeline(StableDiffusionXLPipeline):
        bucket_index = 0

        def _get_add_time_ids(self, original_size, crops_coords_top_left, target_size, dtype,
                              text_encoder_projection_dim=None):
            return torch.tensor([[float(self.bucket_index)]], dtype=dtype)

    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="leading")
    reference = BucketIndexSDXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                        tokenizer_2=None, unet=unet, scheduler=scheduler)
    reference.set_progress_bar_config(disable=True)
    return ours, reference


def reference_run(reference, ours: PanGuDrawPipeline, prompt: str, bucket_index: int, height: int, width: int,
                  steps: int, guidance_scale: float, noise: np.ndarray, output_type: str = "latent"):
    """The diffusers pipeline on our prompt encodings (same text features, pooled text and bucket id)."""
    import torch

    conds = ours.encode([prompt], "", [], bucket_index)
    pooled = ours.config.conditioner.encoders[ours.config.conditioner.pooled_from].projection_dim
    reference.bucket_index = bucket_index
    out = reference(
        prompt_embeds=torch.from_numpy(conds["cond"].context),
        pooled_prompt_embeds=torch.from_numpy(conds["cond"].vector[:, :pooled]),
        negative_prompt_embeds=torch.from_numpy(conds["uncond"].context),
        negative_pooled_prompt_embeds=torch.from_numpy(conds["uncond"].vector[:, :pooled]),
        height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
        latents=torch.from_numpy(noise), output_type=output_type)
    return out.images
