"""Images to CLIP vision-encoder input, as transformers' ``CLIPImageProcessor`` does it (numpy + PIL).

Diffusers' ``StableDiffusionImageVariationPipeline`` passes PIL images through its feature extractor, a
``CLIPImageProcessor`` (resize the shortest side to 224 with PIL bicubic, center crop 224 x 224, scale to
[0, 1], normalise with CLIP's mean and std), and feeds the result to ``CLIPVisionModelWithProjection``;
:func:`preprocess_clip_images` gives the same array for :class:`~pangu_draw_ms.models.clip_vision.CLIPVisionEncoder`.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
from PIL import Image

from ..images import ImageSource, load_image

# OpenAI CLIP's per-channel (R, G, B) statistics of its training images, in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_clip_images(images: Union[ImageSource, Sequence[ImageSource]], image_size: int = 224) -> np.ndarray:
    """Float32 pixel values (B, 3, image_size, image_size) of one image or a sequence of images.

    Each image is anything :func:`pangu_draw_ms.images.load_image` takes (a PIL image of any mode is
    converted to RGB, an alpha channel is dropped). The shortest side is resized to ``image_size`` with
    PIL's bicubic filter (the longer side to ``int(image_size * long / short)``, truncated, as transformers
    does), the center
    ``image_size`` square is cropped (the extra row or column of an odd margin is cut at the bottom or
    right), values are scaled to [0, 1] and normalised with :data:`CLIP_MEAN` / :data:`CLIP_STD`.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess_clip_images: got no images; pass a PIL image, a uint8 (H, W, 3) array or a "
                         "sequence of them")
    return np.stack([_preprocess_one(load_image(image, f"image {i}"), image_size) for i, image in enumerate(images)])


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

