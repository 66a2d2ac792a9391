"""Resolution buckets: the image sizes a generator is trained and sampled at, each with its index.

PanGu-Draw conditions the UNet on the sinusoidal embedding of the bucket INDEX (the vector input), so a
size is only meaningful together with its position in the table the model was trained with. Tables are
aligned by aspect ratio: index i is the same aspect ratio in the structure and the texture table (the
texture generator is trained at lower resolution but samples at the structure generator's size).

Sizes are (height, width) in pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

Size = Tuple[int, int]

# Paper, Table 7 (H x W): structure generator (high resolution) and texture generator (low resolution).
TABLE7_STRUCTURE: Tuple[Size, ...] = (
    (512, 2048), (512, 1920), (704, 1408), (768, 1344), (864, 1152), (1024, 1024),
    (1152, 864), (1344, 768), (1408, 704), (1920, 512), (2048, 512))
TABLE7_TEXTURE: Tuple[Size, ...] = (
    (256, 1024), (256, 960), (384, 768), (416, 736), (480, 640), (512, 512),
    (640, 480), (736, 416), (768, 384), (960, 256), (1024, 256))
# The released PanGu-Draw 3.0 code lists W x H; stored here as (H, W). Index 5 is square in both; the
# high list has one entry fewer than Table 7, so its indices 7-9 may be off by one against training.
RELEASE_LOW: Tuple[Size, ...] = tuple((h, w) for w, h in (
    (256, 1024), (256, 960), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (768, 320), (960, 256), (1024, 256)))
RELEASE_HIGH: Tuple[Size, ...] = tuple((h, w) for w, h in (
    (512, 2048), (512, 1920), (768, 1536), (864, 1536), (960, 1280), (1024, 1024),
    (1280, 960), (1536, 768), (1920, 512), (2048, 512)))


class BucketError(ValueError):
    """A size or ratio that no bucket of the table supports."""


@dataclass(frozen=True)
class BucketTable:
    """An ordered list of (H, W) sizes; a size's index is its position (the model's bucket input)."""

    name: str
    sizes: Tuple[Size, ...]

    def __post_init__(self):
        if not self.sizes:
            raise BucketError(f"bucket table {self.name!r} is empty")
        if len(set(self.sizes)) != len(self.sizes):
            raise BucketError(f"bucket table {self.name!r} lists a size twice: {list(self.sizes)}")

    def __len__(self) -> int:
        return len(self.sizes)

    def describe(self) -> str:
        return ", ".join(f"{i}: {h}x{w}" for i, (h, w) in enumerate(self.sizes))

    def index(self, height: int, width: int) -> int:
        """The index of exactly (height, width); a clear error listing the valid sizes otherwise."""
        try:
            return self.sizes.index((int(height), int(width)))
        except ValueError:
            raise BucketError(f"{height}x{width} (HxW) is not a bucket of {self.name!r}; valid sizes: "
                              f"{self.describe()} (or ask to snap to the nearest bucket)") from None

    def nearest(self, height: float, width: float) -> int:
        """Index of the bucket closest in aspect ratio (log scale), then in area."""
        import math

        if height <= 0 or width <= 0:
            raise BucketError(f"height and width must be positive, got {height}x{width}")
        ratio = math.log(width / height)
        area = height * width
        return min(range(len(self.sizes)),
                   key=lambda i: (round(abs(math.log(self.sizes[i][1] / self.sizes[i][0]) - ratio), 6),
                                  abs(self.sizes[i][0] * self.sizes[i][1] - area)))

    def for_ratio(self, ratio: str) -> int:
        """Index for an aspect ratio given as ``"W:H"`` (e.g. ``"16:9"``), snapping to the nearest."""
        try:
            w, h = (float(x) for x in ratio.split(":"))
        except ValueError:
            raise BucketError(f"ratio {ratio!r} is not of the form W:H (e.g. 16:9)") from None
        return self.nearest(h, w)

    def select(self, height: Optional[int] = None, width: Optional[int] = None, ratio: Optional[str] = None,
               snap: bool = False) -> Tuple[int, Size]:
        """(index, size) from an exact size, a size to snap, or a ratio; default: the square bucket."""
        if ratio is not None:
            if height is not None or width is not None:
                raise BucketError("give either height/width or a ratio, not both")
            i = self.for_ratio(ratio)
        elif height is None and width is None:
            i = self.nearest(1, 1)
        elif height is None or width is None:
            raise BucketError("give both height and width (or a ratio)")
        else:
            i = self.nearest(height, width) if snap else self.index(height, width)
        return i, self.sizes[i]

    def scaled(self, divisor: int, multiple: int = 8, name: Optional[str] = None) -> "BucketTable":
        """The same aspect ratios at 1/divisor of the size, rounded to ``multiple`` (small demo models)."""
        def fit(v):
            return max(multiple, int(round(v / divisor / multiple)) * multiple)
        return BucketTable(name or f"{self.name}/{divisor}", tuple((fit(h), fit(w)) for h, w in self.sizes))


TABLES: Dict[str, BucketTable] = {
    "table7_structure": BucketTable("table7_structure", TABLE7_STRUCTURE),
    "table7_texture": BucketTable("table7_texture", TABLE7_TEXTURE),
    "release_high": BucketTable("release_high", RELEASE_HIGH),
    "release_low": BucketTable("release_low", RELEASE_LOW),
}


def bucket_table(name_or_sizes) -> BucketTable:
    """A named table (``table7_structure``, ``table7_texture``, ``release_high``, ``release_low``) or a
    table built from a sequence of (H, W) pairs."""
    if isinstance(name_or_sizes, BucketTable):
        return name_or_sizes
    if isinstance(name_or_sizes, str):
        if name_or_sizes not in TABLES:
            raise BucketError(f"unknown bucket table {name_or_sizes!r}; valid: {sorted(TABLES)}")
        return TABLES[name_or_sizes]
    sizes: Sequence = name_or_sizes
    return BucketTable("custom", tuple((int(h), int(w)) for h, w in sizes))
