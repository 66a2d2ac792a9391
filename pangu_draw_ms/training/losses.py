"""Training objectives, written with MindSpore ops so they trace into the compiled gradient graph."""
from __future__ import annotations

from mindspore import ops

from ..diffusion.schedule import add_noise
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL
from .config import VAELossConfig


def diffusion_loss(unet: UNetModel, z0, noise, timesteps, alpha_bar, context, vector, controlnet=None, hint=None):
    """PanGu-Draw eq. (2): E || eps - eps_theta(z_t, t, c) ||^2 with z_t from eq. (1).

    ``alpha_bar``: a_t gathered per sample, shape (B, 1, 1, 1); ``timesteps``: (B,) float. With a
    ``controlnet``, eps_theta is the UNet steered by the ControlNet's residuals for control image ``hint``.
    """
    z_t = add_noise(z0, noise, alpha_bar)
    control = None if controlnet is None else controlnet(z_t, hint, timesteps, context, vector)
    eps = unet(z_t, timesteps, context, vector, control)
    return ops.mean(ops.square(eps - noise))


def vae_loss(vae: AutoencoderKL, pixels, noise, config: VAELossConfig):
    """Reconstruction of a posterior sample (L1 + weighted L2) plus the weighted KL to N(0, I)."""
    mean, logvar = vae.encode(pixels)
    z = mean + ops.exp(0.5 * logvar) * noise
    error = vae.decode(z) - pixels
    kl = 0.5 * ops.sum(ops.square(mean) + ops.exp(logvar) - 1.0 - logvar) / pixels.shape[0]
    return ops.mean(ops.abs(error)) + config.mse_weight * ops.mean(ops.square(error)) + config.kl_weight * kl


# CLIP bounds its learned temperature: logits are scaled by at most 100 (Radford et al. 2021, sec. 2.5).
MAX_LOGIT_SCALE = 4.605170185988092  # ln 100


def clip_contrastive_loss(image_embeds, text_embeds, logit_scale, same_caption):
    """CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3): cross-entropy of the scaled cosine
    similarities of each image against the batch's texts and of each text against its images.

    ``same_caption`` (B, B): 1 where two samples carry the same caption. Those pairs are positives too - the
    target of a row is spread evenly over them - instead of pushing apart images one caption describes equally
    well (in a small world, "a red circle" is many images' caption).
    """
    image = image_embeds / ops.norm(image_embeds, dim=-1, keepdim=True)
    text = text_embeds / ops.norm(text_embeds, dim=-1, keepdim=True)
    logits = ops.exp(ops.minimum(logit_scale, MAX_LOGIT_SCALE)) * ops.matmul(image, text.T)
    targets = same_caption / ops.sum(same_caption, -1, keepdim=True)  # symmetric: serves both directions
    per_image = -ops.sum(targets * ops.log_softmax(logits, -1), -1)
    per_text = -ops.sum(targets * ops.log_softmax(logits.T, -1), -1)
    return (ops.mean(per_image) + ops.mean(per_text)) / 2
