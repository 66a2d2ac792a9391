"""The demo's synthetic world: one coloured shape on a plain background, captioned in English and Chinese.

An image is fully described by its :class:`Scene` (colour, shape, size, position, background, image size);
:func:`render` draws it (4x supersampled, so edges are anti-aliased) and :func:`captions` describes it.
A caption names the colour and the shape always, and each of size, position and background with
probability 1/2 (the same ones in both languages): "a red circle", "a big red circle on the left on a
white background", "an orange cross" / "一个红色的圆形", "白色背景上左边有一个红色的大圆形". Everything is deterministic
given the random generator passed in.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

# name: (English, Chinese, RGB)
COLORS: Dict[str, Tuple[str, str, Tuple[int, int, int]]] = {
    "red": ("red", "红色", (220, 40, 40)),
    "green": ("green", "绿色", (40, 170, 60)),
    "blue": ("blue", "蓝色", (40, 80, 220)),
    "yellow": ("yellow", "黄色", (240, 210, 40)),
    "purple": ("purple", "紫色", (150, 60, 190)),
    "orange": ("orange", "橙色", (245, 130, 20)),
}
BACKGROUNDS: Dict[str, Tuple[str, str, Tuple[int, int, int]]] = {
    "white": ("white", "白色", (240, 240, 240)),
    "gray": ("gray", "灰色", (128, 128, 128)),
    "black": ("black", "黑色", (20, 20, 20)),
}
SHAPES: Dict[str, Tuple[str, str]] = {
    "circle": ("circle", "圆形"),
    "square": ("square", "正方形"),
    "triangle": ("triangle", "三角形"),
    "cross": ("cross", "十字形"),
}
# Shapes outside the world the demo model was trained on: the demo LoRA teaches "star" / "星形" (the demo
# tokenizer has no piece for 星, so the Chinese word reaches the text encoders as <unk> + 形). (A new colour cannot
# be taught by a UNet LoRA here: the demo VAE pulls other colours onto its six.)
NEW_SHAPES: Dict[str, Tuple[str, str]] = {
    "star": ("star", "星形"),
}
ALL_SHAPES = {**SHAPES, **NEW_SHAPES}
SIZES: Dict[str, Tuple[str, str, float]] = {  # name: (English, Chinese, extent / shorter image side)
    "small": ("small", "小", 0.34),
    "big": ("big", "大", 0.6),
}
POSITIONS: Dict[str, Tuple[str, str, Tuple[float, float]]] = {  # name: (English, Chinese, centre (y, x) fractions)
    "center": ("in the center", "中间", (0.5, 0.5)),
    "left": ("on the left", "左边", (0.5, 0.3)),
    "right": ("on the right", "右边", (0.5, 0.7)),
    "top": ("at the top", "上方", (0.3, 0.5)),
    "bottom": ("at the bottom", "下方", (0.7, 0.5)),
}
# Aspect ratios (height / width) the dataset is drawn at, and the image areas of its two resolution classes.
ASPECT_RATIOS = (0.5, 0.7, 1.0, 1.4, 2.0)
HIGH_RES_SIDE = 72   # sqrt(area) of a high-resolution image (jittered +-12 %)
LOW_RES_SIDE = 28    # low-resolution images: smaller than every structure bucket


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    position: str
    background: str
    height: int
    width: int
    jitter: Tuple[float, float, float] = (0.0, 0.0, 0.0)  # centre offset (y, x) and size factor, in [-1, 1]

    @property
    def attributes(self) -> Tuple[str, str, str, str, str]:
        return self.color, self.shape, self.size, self.position, self.background


def _polygon(shape: str, cy: float, cx: float, r: float) -> List[Tuple[float, float]]:
    """Outline (x, y) of a shape of half-extent ``r`` centred at (cy, cx)."""
    if shape == "square":
        r *= 0.85  # same visual weight as the circle
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":  # five points, inner radius 0.45 of the outer
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * np.cos(-np.pi / 2 + i * np.pi / 5),
                 cy + (r if i % 2 == 0 else 0.45 * r) * np.sin(-np.pi / 2 + i * np.pi / 5)) for i in range(10)]
    if shape == "cross":
        a = r * 0.34
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}; valid: {sorted(ALL_SHAPES)}")


def render(scene: Scene, supersample: int = 4) -> np.ndarray:
    """The scene as a uint8 RGB array (height, width, 3)."""
    from PIL import Image, ImageDraw

    s = supersample
    height, width = scene.height * s, scene.width * s
    image = Image.new("RGB", (width, height), BACKGROUNDS[scene.background][2])
    draw = ImageDraw.Draw(image)
    fy, fx = POSITIONS[scene.position][2]
    dy, dx, ds = scene.jitter
    side = min(height, width)
    r = 0.5 * SIZES[scene.size][2] * side * (1.0 + 0.12 * ds)
    cy = fy * height + 0.06 * side * dy
    cx = fx * width + 0.06 * side * dx
    color = COLORS[scene.color][2]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon(_polygon(scene.shape, cy, cx, r), fill=color)
    return np.asarray(image.resize((scene.width, scene.height), Image.LANCZOS))


def captions(scene: Scene, mention: Sequence[bool] = (True, True, True)) -> Tuple[str, str]:
    """(English, Chinese) caption; ``mention`` says whether size, position and background are named."""
    say_size, say_position, say_background = mention
    color_en, color_zh, _ = COLORS[scene.color]
    shape_en, shape_zh = ALL_SHAPES[scene.shape]
    size_en, size_zh, _ = SIZES[scene.size]
    position_en, position_zh, _ = POSITIONS[scene.position]
    background_en, background_zh, _ = BACKGROUNDS[scene.background]
    noun_phrase = (size_en + " " if say_size else "") + f"{color_en} {shape_en}"
    english = ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase
    if say_position:
        english += " " + position_en
    if say_background:
        english += f" on a {background_en} background"
    chinese = f"一个{color_zh}的" + (size_zh if say_size else "") + shape_zh
    if say_position or say_background:
        where = (f"{background_zh}背景上" if say_background else "") + (position_zh if say_position else "")
        chinese = f"{where}有" + chinese
    return english, chinese


def all_combinations(shapes: Sequence[str] = tuple(SHAPES)) -> List[Tuple[str, str, str, str, str]]:
    """Every (colour, shape, size, position, background) of ``shapes`` (default: the world's)."""
    return [(c, s, z, p, b) for c in COLORS for s in shapes for z in SIZES for p in POSITIONS for b in BACKGROUNDS]


def heldout_combinations(seed: int, shapes: Sequence[str] = tuple(SHAPES),
                         per_pair: int = 1) -> List[Tuple[str, str, str, str, str]]:
    """``per_pair`` combinations per (colour, shape) pair of ``shapes``, their other attributes drawn at random:
    these full combinations never appear in the training images, so their full captions are unseen sentences."""
    rng = np.random.default_rng([seed, 7])
    held = []
    for color in COLORS:
        for shape in shapes:
            while sum(1 for c in held if c[:2] == (color, shape)) < per_pair:
                combo = (color, shape, list(SIZES)[rng.integers(len(SIZES))],
                         list(POSITIONS)[rng.integers(len(POSITIONS))],
                         list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
                if combo not in held:
                    held.append(combo)
    return held


def random_scene(rng: np.random.Generator, combos: Sequence[Tuple[str, str, str, str, str]],
                 low_res_fraction: float = 0.0, scale: float = 1.0) -> Scene:
    """A scene of one of ``combos`` at a random aspect ratio; low resolution with ``low_res_fraction``;
    ``scale`` multiplies the image sides (small images for tests)."""
    color, shape, size, position, background = combos[rng.integers(len(combos))]
    ratio = ASPECT_RATIOS[rng.integers(len(ASPECT_RATIOS))] * float(np.exp(rng.uniform(-0.08, 0.08)))
    side = LOW_RES_SIDE if rng.random() < low_res_fraction else HIGH_RES_SIDE * float(np.exp(rng.uniform(-0.12, 0.12)))
    side *= scale
    height, width = max(8, round(side * ratio ** 0.5)), max(8, round(side / ratio ** 0.5))
    jitter = tuple(float(v) for v in rng.uniform(-1.0, 1.0, 3))
    return Scene(color, shape, size, position, background, int(height), int(width), jitter)


def scene_record(scene: Scene) -> dict:
    """The scene's attributes as plain data (manifest columns)."""
    record = asdict(scene)
    record.pop("jitter")
    return record


def write_dataset(directory: str, num_images: int, seed: int = 0, low_res_fraction: float = 0.3,
                  scale: float = 1.0, new_shapes: Sequence[str] = (), new_share: float = 0.0) -> Dict[str, int]:
    """Render ``num_images`` training scenes into ``directory/images`` with ``train.jsonl`` (columns image,
    caption_en, caption_zh, height, width and the scene attributes) and ``heldout.jsonl`` (the full
    captions of :func:`heldout_combinations`, which no training image shows). Deterministic in ``seed``.

    With ``new_shapes`` (names in :data:`NEW_SHAPES`), each image shows one of them with probability
    ``new_share`` and the world's shapes otherwise (data for teaching a new word while keeping the old ones),
    and ``heldout.jsonl`` holds the new shapes' held-out captions (two per colour)."""
    import json
    import os

    from PIL import Image

    unknown = [shape for shape in new_shapes if shape not in NEW_SHAPES]
    if unknown:
        raise ValueError(f"new shapes {unknown} are not defined; valid: {sorted(NEW_SHAPES)}")
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    held = heldout_combinations(seed, new_shapes, per_pair=2) if new_shapes else heldout_combinations(seed)
    base = [c for c in all_combinations() if c not in set(held)]
    new = [c for c in all_combinations(new_shapes) if c not in set(held)]
    rng = np.random.default_rng(seed)
    with open(os.path.join(directory, "train.jsonl"), "w", encoding="utf-8") as f:
        for i in range(num_images):
            combos = new if new and rng.random() < new_share else base
            scene = random_scene(rng, combos, low_res_fraction, scale)
            english, chinese = captions(scene, tuple(bool(v) for v in rng.random(3) < 0.5))
            name = f"images/{i:06d}.png"
            Image.fromarray(render(scene)).save(os.path.join(directory, name), optimize=False)
            row = {"image": name, "caption_en": english, "caption_zh": chinese, **scene_record(scene)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(directory, "heldout.jsonl"), "w", encoding="utf-8") as f:
        for color, shape, size, position, background in held:
            english, chinese = captions(Scene(color, shape, size, position, background, 0, 0))
            row = {"caption_en": english, "caption_zh": chinese, "color": color, "shape": shape, "size": size,
                   "position": position, "background": background}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"train": num_images, "heldout": len(held)}


def edge_control(shape: str, position: str, height: int, width: int) -> Tuple[np.ndarray, Tuple[float, float]]:
    """A ControlNet edge condition for the demo world: the edge map (uint8 (H, W, 3), white outlines on
    black) of a small ``shape`` drawn at ``position``, and the shape's centre (y, x) as fractions of H, W."""
    from ..images import edge_map

    scene = Scene("red", shape, "small", position, "black", height, width)
    edges = edge_map(render(scene).transpose(2, 0, 1)[None] / 255.0)[0]
    return (edges.transpose(1, 2, 0) * 255).astype(np.uint8), POSITIONS[position][2]
