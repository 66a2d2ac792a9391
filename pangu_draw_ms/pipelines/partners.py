"""Partner models for Coop-Diffusion: each is a denoiser on our contract with its own VAE, latent scale,
latent channels, native resolution and conditioning.

* :class:`PanGuPartner`: another PanGu-Draw / SDXL-style model (or the main model itself), its time
  split and guidance included.
* :class:`DiffusersPartner`: a Stable Diffusion 1.x-family text-to-image model from a diffusers folder
  (its VAE with scale 0.18215, its CLIP text encoder, 512 px).
* :class:`ImageVariationPartner`: a CLIP vision encoder + UNet conditioned on a reference image's
  embedding (diffusers' image-variation layout); unconditional = zeros, as in its pipeline.
* A ControlNet partner is its base partner (or the main model) with a :class:`ControlInput`.

``denoiser(prompts, num_images)`` gives the partner's guided ``denoise(z, t) -> eps`` for one run.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import nn

from ..config import PartnerConfig, TokenizerConfig, UNetConfig, load_config
from ..diffusion.denoiser import Conditioning, ControlInput, UNetEpsModel
from ..diffusion.experts import SingleModel
from ..diffusion.guidance import GuidedDenoiser, guidance_branches, guidance_weights
from ..images import load_image, resize, to_unit_array
from ..io.checkpoint import open_checkpoint
from ..io.diffusers_controlnet import controlnet_config_from_diffusers
from ..io.diffusers_folder import config_beside, model_config, model_path, tokenizer_pad_token
from ..io.diffusers_unet import unet_config_from_diffusers
from ..io.diffusers_vae import vae_config_from_diffusers
from ..io.layouts import build_component, component_config, load_component
from ..io.transformers_clip import text_encoder_config_from_transformers, vision_encoder_config_from_transformers
from ..tokenizers import build_tokenizer
from .image_processing import preprocess_clip_images

Denoise = Callable[[np.ndarray, int], np.ndarray]
SD_DEFAULT_SIZE = (512, 512)


def _loaded(component: str, config, path: str, dtype) -> nn.Cell:
    cell = build_component(component, config, dtype=dtype, materialize=False)
    load_component(cell, path, component)
    cell.set_train(False)
    return cell


def load_controlnet(path: str, dtype) -> nn.Cell:
    """A ControlNet from a diffusers folder/file (config.json beside it) or one of our files (config in
    its metadata)."""
    diffusers_config = config_beside(path)
    if diffusers_config is not None:
        config = controlnet_config_from_diffusers(diffusers_config)
    else:
        with open_checkpoint(path) as reader:
            component, config = component_config(reader.metadata)
        if component != "controlnet":
            raise ValueError(f"{path}: not a ControlNet file (its metadata describes a {component})")
    return _loaded("controlnet", config, path, dtype)


class Partner:
    """A model B of Coop-Diffusion: ``vae`` (decode_latents / encode_to_latents), ``pixel_size`` (H, W),
    latent channels and VAE downsampling, and per run a guided denoiser over its own latents."""

    name: str
    vae: nn.Cell
    pixel_size: Tuple[int, int]
    latent_channels: int
    downsample: int

    def latent_shape(self, batch: int) -> Tuple[int, int, int, int]:
        h, w = self.pixel_size
        return (batch, self.latent_channels, h // self.downsample, w // self.downsample)

    def denoiser(self, prompts: Sequence[str], num_images: int, control: Optional[ControlInput] = None) -> Denoise:
        raise NotImplementedError


class PanGuPartner(Partner):
    """A PanGu-Draw pipeline used as a partner (its experts, guidance, VAE and bucket conditioning)."""

    def __init__(self, pipeline, config: PartnerConfig, pixel_size: Tuple[int, int]):
        self.name = config.name
        self.pipeline = pipeline
        self.config = config
        self.pixel_size = tuple(pixel_size)
        self.vae = pipeline.components.get("vae")
        self.latent_channels = pipeline.config.unet.in_channels
        self.downsample = pipeline.config.vae.downsample_factor

    def denoiser(self, prompts, num_images, control=None):
        run = self.pipeline.plan(list(prompts), negative_prompt=self.config.negative_prompt,
                                 height=self.pixel_size[0], width=self.pixel_size[1], snap_to_bucket=True,
                                 guidance_scale=self.config.guidance_scale, style_scales={}, switch_rule="exact",
                                 num_images_per_prompt=num_images, bucket_list=self.config.bucket_list)
        if run.height != self.pixel_size[0] or run.width != self.pixel_size[1]:
            table = self.pipeline.buckets if self.config.bucket_list == "structure" else self.pipeline.texture_buckets
            raise ValueError(f"partner {self.name!r}: {self.pixel_size[0]}x{self.pixel_size[1]} is not a bucket of "
                             f"its model's {self.config.bucket_list} list; valid sizes: {table.describe()}")
        denoise, _ = self.pipeline.denoiser(run, control=control)
        return denoise


class StableDiffusionPartner(Partner):
    """A Stable Diffusion 1.x-family model of a diffusers folder: its ``unet/`` (no vector conditioning) and
    ``vae/`` (its own scaling factor), at 512 px unless the recipe sizes it, with classifier-free guidance
    over the conditioning a subclass gives (:meth:`conditioning`)."""

    def __init__(self, config: PartnerConfig, dtype, unet_config: UNetConfig):
        """``unet_config``: the config of the folder's ``unet/``, which the subclass has checked."""
        folder = config.path
        self.name = config.name
        self.config = config
        self.unet = _loaded("unet", unet_config, model_path(folder, "unet"), dtype)
        vae_config = vae_config_from_diffusers(model_config(folder, "vae"))
        self.vae = _loaded("vae", vae_config, model_path(folder, "vae"), dtype)
        self.pixel_size = (config.height, config.width) if config.height else SD_DEFAULT_SIZE
        self.latent_channels = unet_config.in_channels
        self.downsample = self.vae.config.downsample_factor

    def conditioning(self, prompts: Sequence[str]) -> Tuple[Conditioning, Conditioning]:
        """(conditional, unconditional) conditioning of one run, a row per prompt."""
        raise NotImplementedError

    def denoiser(self, prompts, num_images, control=None):
        cond, uncond = self.conditioning(prompts)
        branches = guidance_branches({"cond": cond, "uncond": uncond}, guidance_weights(self.config.guidance_scale, {}),
                                     num_images, control)
        return GuidedDenoiser(SingleModel(UNetEpsModel(self.unet, control), self.name), branches)


class DiffusersPartner(StableDiffusionPartner):
    """A Stable Diffusion 1.x-family text-to-image model from a diffusers folder: ``unet/``, ``vae/``,
    ``text_encoder/`` (CLIP, last layer) and the CLIP BPE tokenizer (padded as
    ``tokenizer/special_tokens_map.json`` says; SD 1.x pads with <|endoftext|>)."""

    def __init__(self, config: PartnerConfig, dtype):
        folder = config.path
        unet_config = unet_config_from_diffusers(model_config(folder, "unet"))
        if unet_config.adm_in_channels is not None:
            raise ValueError(f"partner {config.name!r}: {folder}/unet takes a vector conditioning (SDXL-style); "
                             "diffusers partners are Stable Diffusion 1.x-family UNets (use kind pangu for SDXL-style)")
        text_config = text_encoder_config_from_transformers(model_config(folder, "text_encoder"), output_layer="last")
        pad = tokenizer_pad_token(folder, default="<|endoftext|>")
        self.tokenizer = build_tokenizer(TokenizerConfig(kind="clip_bpe", pad_with_end_token=pad == "<|endoftext|>",
                                                         max_length=text_config.max_position_embeddings))
        super().__init__(config, dtype, unet_config)
        self.text_encoder = _loaded("text_encoder", text_config, model_path(folder, "text_encoder"), dtype)

    def encode(self, texts: Sequence[str]) -> Conditioning:
        hidden, _ = self.text_encoder(ms.Tensor(self.tokenizer(list(texts))))
        return Conditioning(hidden.asnumpy().astype(np.float32))

    def conditioning(self, prompts):
        """The prompts' encodings, and the negative prompt's repeated once per prompt."""
        everything = self.encode(list(prompts) + [self.config.negative_prompt])
        n = len(prompts)
        return Conditioning(everything.context[:n]), Conditioning(np.repeat(everything.context[n:], n, axis=0))


class ImageVariationPartner(StableDiffusionPartner):
    """Image variation (diffusers' ``StableDiffusionImageVariationPipeline`` layout): the reference image's
    CLIP embedding (B, 1, projection) is the UNet's cross-attention context; the unconditional branch
    uses zeros, as that pipeline does. Prompts are ignored."""

    def __init__(self, config: PartnerConfig, dtype):
        folder = config.path
        vision_config = vision_encoder_config_from_transformers(model_config(folder, "image_encoder"))
        unet_config = unet_config_from_diffusers(model_config(folder, "unet"))
        if unet_config.context_dim != vision_config.projection_dim:
            raise ValueError(f"partner {config.name!r}: the UNet attends to {unet_config.context_dim} features but the "
                             f"image encoder projects to {vision_config.projection_dim}")
        encoder = _loaded("image_encoder", vision_config, model_path(folder, "image_encoder"), dtype)
        pixels = preprocess_clip_images(load_image(config.image, f"partner {config.name!r}'s image"),
                                        vision_config.image_size)
        _, embeds = encoder(ms.Tensor(pixels))
        self.image_embeds = embeds.asnumpy().astype(np.float32)[:, None, :]   # (1, 1, projection)
        super().__init__(config, dtype, unet_config)

    def conditioning(self, prompts):
        """The image embedding once per prompt, and zeros."""
        cond = Conditioning(np.repeat(self.image_embeds, len(prompts), axis=0))
        return cond, Conditioning(np.zeros_like(cond.context))


class ControlledPartner(Partner):
    """A ControlNet attached to a base model (a partner, or the main model as a :class:`PanGuPartner`):
    the base's latent space, size and conditioning, with the control image steering every UNet call."""

    def __init__(self, config: PartnerConfig, base: Partner, dtype):
        self.name = config.name
        self.config = config
        self.base = base
        self.vae, self.pixel_size = base.vae, base.pixel_size
        self.latent_channels, self.downsample = base.latent_channels, base.downsample
        self.control = ControlInput(load_controlnet(config.path, dtype), self.control_pixels(config.control_image),
                                    scale=config.control_scale, guess_mode=config.guess_mode)

    def control_pixels(self, control_image) -> np.ndarray:
        """A control image (path, PIL or uint8 array) as the ControlNet takes it: (1, 3, H, W) in [0, 1] at
        the base's size; a list of them: (N, 3, H, W)."""
        images = control_image if isinstance(control_image, (list, tuple)) else [control_image]
        if not images:
            raise ValueError(f"partner {self.name!r}: an empty list of control images")
        return to_unit_array([resize(load_image(image, f"partner {self.name!r}'s control image"), self.pixel_size)
                              for image in images])

    def denoiser(self, prompts, num_images, control=None, control_image=None):
        """The base's denoiser steered by this ControlNet, with the recipe's control image or ``control_image``
        for this run: one image (path, PIL or HxWx3 uint8) for every image of the run, or a list with one per
        image (``len(prompts) x num_images``, prompt by prompt)."""
        if control_image is not None:
            control = dataclasses.replace(self.control, image=self.control_pixels(control_image))
            given, images = control.image.shape[0], len(prompts) * num_images
            if given not in (1, images):
                raise ValueError(f"partner {self.name!r}: {given} control images for a run of {images} images; "
                                 f"give one, or one per image")
        return self.base.denoiser(prompts, num_images, control=control or self.control)


def build_partner(config: PartnerConfig, main, partners: dict, main_size: Tuple[int, int], dtype) -> Partner:
    """The partner a :class:`PartnerConfig` describes. ``main``: the main PanGuDrawPipeline; ``partners``:
    the ones built so far (a ControlNet's base); ``main_size``: the main image's (H, W)."""
    from .pangu_draw import PanGuDrawPipeline

    if config.kind == "pangu":
        if config.path == "main":
            pipeline = main
        elif config.path:
            pipeline = PanGuDrawPipeline.from_pretrained(config.path, precision=main.components.precision)
        else:
            pipeline = PanGuDrawPipeline.from_config(load_config(config.config), precision=main.components.precision)
        size = (config.height, config.width) if config.height else main_size
        return PanGuPartner(pipeline, config, size)
    if config.kind == "diffusers":
        return DiffusersPartner(config, dtype)
    if config.kind == "image_variation":
        return ImageVariationPartner(config, dtype)
    base = PanGuPartner(main, config, main_size) if config.base == "main" else partners[config.base]
    return ControlledPartner(config, base, dtype)
