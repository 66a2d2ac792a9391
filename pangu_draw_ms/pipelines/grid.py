"""Contact sheet of several images (the CLI's grid output)."""
from __future__ import annotations

import math
from typing import List, Optional

from PIL import Image


def image_grid(images: List[Image.Image], columns: Optional[int] = None, background=(255, 255, 255)) -> Image.Image:
    """Images laid out row by row in cells of the largest image's size (near-square by default)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), background)
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * cell_w, (i // columns) * cell_h))
    return grid
