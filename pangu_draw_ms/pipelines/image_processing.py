"""Images to CLIP vision-encoder input, as transformers' ``CLIPImageProcessor`` does it (numpy + PIL).

Diffusers' ``StableDiffusionImageVariationPipeline`` passes PIL images through its feature extractor, a
``CLIPImageProcessor`` (resize the shortest side to 224 with PIL bicubic, center crop 224 x 224, scale to
[0, 1], normalise with CLIP's mean and std), and feeds the result to ``CLIPVisionModelWithProjection``;
:func:`preprocess_clip_images` gives the same array for :class:`~pangu_draw_ms.models.clip_vision.CLIPVisionEncoder`.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from PIL import Image

# OpenAI CLIP's per-channel (R, G, B) statistics of its training images, in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[Image.Image, np.ndarray]


def preprocess_clip_images(images: Union[ImageLike, Sequence[ImageLike]], image_size: int = 224) -> np.ndarray:
    """Float32 pixel values (B, 3, image_size, image_size) of one image or a sequence of images.

    Each image is a PIL image (any mode; converted to RGB, an alpha channel is dropped) or a uint8 array
    (H, W, 3). The shortest side is resized to ``image_size`` with PIL's bicubic filter (the longer side
    to ``int(image_size * long / short)``, truncated, as transformers does), the center
    ``image_size`` square is cropped (the extra row or column of an odd margin is cut at the bottom or
    right), values are scaled to [0, 1] and normalised with :data:`CLIP_MEAN` / :data:`CLIP_STD`.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess_clip_images: got no images; pass a PIL image, a uint8 (H, W, 3) array or a "
                         "sequence of them")
    return np.stack([_preprocess_one(_as_rgb(image, i), image_size) for i, image in enumerate(images)])


def _as_rgb(image: ImageLike, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(image)
    what = (f"an array of dtype {image.dtype} and shape {image.shape}" if isinstance(image, np.ndarray)
            else f"a {type(image).__name__}")
    raise TypeError(f"image {index} is {what}; pass a PIL image or a uint8 array (H, W, 3) of RGB values 0..255")


def _preprocess_one(image: Image.Image, size: int) -> np.ndarray:
    width, height = image.size
    if width <= height:
        resized = (size, int(size * height / width))
    else:
        resized = (int(size * width / height), size)
    pixels = np.asarray(image.resize(resized, resample=Image.Resampling.BICUBIC))  # (H, W, 3) uint8
    top = (resized[1] - size) // 2
    left = (resized[0] - size) // 2
    pixels = pixels[top:top + size, left:left + size].astype(np.float64) / 255.0
    pixels = (pixels - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    return pixels.transpose(2, 0, 1).astype(np.float32)


def edge_map(pixels: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Edge control images (white outlines on black, as ControlNet's edge conditions) of images
    ``pixels`` (B, 3, H, W) in [0, 1]: a pixel is an edge where the largest colour step to its right or
    lower neighbour exceeds ``threshold``. Returns float32 (B, 3, H, W) in {0, 1}."""
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"edge_map takes images (B, 3, H, W) in [0, 1], got shape {pixels.shape}")
    step_x = np.abs(np.diff(pixels, axis=3, append=pixels[..., -1:])).max(axis=1)
    step_y = np.abs(np.diff(pixels, axis=2, append=pixels[..., -1:, :])).max(axis=1)
    edges = (np.maximum(step_x, step_y) > threshold).astype(np.float32)
    return np.repeat(edges[:, None], 3, axis=1)
