"""Images in and out of the package: loading, resizing to a bucket, model arrays, edge maps and grids.

Every layer handles images (the pipelines' init and control images, training samples, the demo's edge
conditions, the tools' contact sheets), so this module depends on numpy and PIL only - never on MindSpore
or the rest of the package - and every layer may import it.

What counts as an image (:func:`load_image`): a path to an image file, a PIL image (any mode) or a uint8
array (H, W, 3) of RGB values or (H, W) of grey levels, each side at least :data:`MIN_ARRAY_SIDE`. The
minimum refuses the arrays that are not pictures but a mistake - a channels-first (3, H, W) array, a few
colours, a matrix - instead of turning them into a tiny image; files and PIL images are pictures whatever
their size. Model arrays are float32 (B, 3, H, W): [-1, 1] for the VAE (:func:`to_array`, :func:`to_pil`),
[0, 1] for ControlNet conditions and :func:`edge_map` (:func:`to_unit_array`).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

# One latent pixel of an 8x-downsampling VAE; a smaller array is a mistake, not a picture (see above).
MIN_ARRAY_SIDE = 8

_VALID = (f"pass a PIL image, an image file's path or a uint8 array (H, W, 3) of RGB values or (H, W) of grey "
          f"levels, each side at least {MIN_ARRAY_SIDE}")


def _open(path: Union[str, os.PathLike]) -> Image.Image:
    """The image file at ``path``, opened lazily (header read, pixels not yet decoded), with errors that name it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file {os.fspath(path)!r} does not exist")
    try:
        return Image.open(path)
    except UnidentifiedImageError as error:
        raise UnidentifiedImageError(f"{os.fspath(path)!r} is not an image: PIL recognises no image format "
                                     "in it") from error


def load_image(source: ImageSource, name: str = "image") -> Image.Image:
    """``source`` as a PIL RGB image (see the module docstring for what is accepted); ``name`` says which
    image an error is about. A missing file raises FileNotFoundError, a file that is not an image
    UnidentifiedImageError (an OSError), anything else that is not an image TypeError."""
    if isinstance(source, (str, os.PathLike)):
        with _open(source) as image:
            return image.convert("RGB")
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if (source.dtype != np.uint8 or source.ndim not in (2, 3) or source.shape[2:] not in ((), (3,))
                or min(source.shape[:2]) < MIN_ARRAY_SIDE):
            raise TypeError(f"{name} is an array of dtype {source.dtype} and shape {source.shape}; {_VALID}")
        return Image.fromarray(source).convert("RGB")
    raise TypeError(f"{name} is a {type(source).__name__}; {_VALID}")


def image_size(path: Union[str, os.PathLike]) -> Tuple[int, int]:
    """(H, W) of the image file at ``path``, from its header (the pixels are not decoded)."""
    with _open(path) as image:
        width, height = image.size
    return height, width


def resize(image: Image.Image, size: Tuple[int, int], crop: bool = False) -> Image.Image:
    """``image`` at ``size`` = (H, W) with PIL's bicubic filter. ``crop=False`` stretches it to the size
    (inference: the caller chose the bucket); ``crop=True`` keeps the aspect ratio, scales to cover the
    size and cuts the centre (training: a sample is never distorted)."""
    height, width = size
    if not crop:
        return image.resize((width, height), Image.BICUBIC)
    scale = max(height / image.height, width / image.width)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.BICUBIC)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def _channels_first(images: Union[Image.Image, Sequence[Image.Image]]) -> np.ndarray:
    """uint8 (B, 3, H, W) of one RGB image or a sequence of RGB images of one size."""
    if isinstance(images, Image.Image):
        images = [images]
    return np.ascontiguousarray(np.stack([np.asarray(image) for image in images]).transpose(0, 3, 1, 2))


def to_array(images: Union[Image.Image, Sequence[Image.Image]]) -> np.ndarray:
    """RGB image(s) of one size -> float32 (B, 3, H, W) in [-1, 1], the VAE's range (inverse of :func:`to_pil`)."""
    return _channels_first(images).astype(np.float32) / 127.5 - 1.0


def to_unit_array(images: Union[Image.Image, Sequence[Image.Image]]) -> np.ndarray:
    """RGB image(s) of one size -> float32 (B, 3, H, W) in [0, 1], the range of ControlNet conditions."""
    return _channels_first(images).astype(np.float32) / 255.0


def to_pil(images: np.ndarray) -> List[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images (rounded to the nearest uint8 value, clipped)."""
    arr = np.clip((images.transpose(0, 2, 3, 1) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


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


def image_grid(images: Sequence[ImageSource], columns: Optional[int] = None, background=(255, 255, 255)
               ) -> Image.Image:
    """Contact sheet (the CLI's and the evaluations' grids): ``images`` laid out row by row, ``columns`` per
    row (default near-square), in cells of the largest image's size on ``background``."""
    if len(images) == 0:
        raise ValueError("image_grid needs at least one image")
    cells = [load_image(image, f"image {i}") for i, image in enumerate(images)]
    columns = columns or math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / columns)
    cell_w = max(cell.width for cell in cells)
    cell_h = max(cell.height for cell in cells)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), background)
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % columns) * cell_w, (i // columns) * cell_h))
    return grid
