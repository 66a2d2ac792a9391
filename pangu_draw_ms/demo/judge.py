"""Measuring prompt following on the demo's world: which colour and which shape an image shows.

* Background: the median colour of the image's border; foreground: pixels farther than
  ``FOREGROUND_DISTANCE`` from it (RGB distance).
* Colour: the median foreground colour, named by the nearest palette colour of :data:`shapes.COLORS`.
* Shape: a softmax-regression classifier over the foreground mask cropped to its bounding box and
  resized to ``MASK_SIZE`` squared, trained on masks of images rendered by the dataset generator (the world's
  shapes, or those and the shapes a caller adds, e.g. the demo LoRA's star).

An image with (almost) no foreground has neither colour nor shape (``None``), which counts as a miss.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .shapes import COLORS, SHAPES, all_combinations, random_scene, render

FOREGROUND_DISTANCE = 60.0
MIN_FOREGROUND = 0.01  # fraction of the pixels
MASK_SIZE = 20
_PALETTE = np.array([rgb for _, _, rgb in COLORS.values()], np.float64)


def foreground(image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mask (H, W) bool, background RGB) of a uint8 (H, W, 3) image."""
    pixels = image.astype(np.float64)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    return mask, background


def color_of(image: np.ndarray) -> Optional[str]:
    """Palette name of the foreground's median colour; None without a foreground."""
    mask, _ = foreground(image)
    if mask.mean() < MIN_FOREGROUND:
        return None
    median = np.median(image.reshape(-1, 3)[mask.reshape(-1)].astype(np.float64), axis=0)
    return list(COLORS)[int(np.argmin(np.linalg.norm(_PALETTE - median, axis=1)))]


def foreground_centre(image: np.ndarray) -> Optional[Tuple[float, float]]:
    """Centre (y, x) of the foreground as fractions of the image height and width; None without a foreground."""
    mask, _ = foreground(image)
    if mask.mean() < MIN_FOREGROUND:
        return None
    rows, cols = np.nonzero(mask)
    return float(rows.mean() + 0.5) / mask.shape[0], float(cols.mean() + 0.5) / mask.shape[1]


def mask_features(mask: np.ndarray) -> Optional[np.ndarray]:
    """The mask's bounding-box crop resized to MASK_SIZE x MASK_SIZE, flattened; None if (almost) empty."""
    from PIL import Image

    if mask.mean() < MIN_FOREGROUND:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.uint8) * 255
    small = Image.fromarray(crop).resize((MASK_SIZE, MASK_SIZE), Image.BILINEAR)
    return np.asarray(small, np.float64).reshape(-1) / 255.0


class ShapeClassifier:
    """Softmax regression on :func:`mask_features` (weights (features + 1, shapes)) over the shape ``names``."""

    def __init__(self, weights: np.ndarray, names: Sequence[str] = tuple(SHAPES)):
        self.weights = weights
        self.names = list(names)

    @staticmethod
    def _design(features: np.ndarray) -> np.ndarray:
        return np.concatenate([features, np.ones((len(features), 1))], axis=1)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, names: Sequence[str] = tuple(SHAPES), steps: int = 400,
            lr: float = 0.5, l2: float = 1e-4) -> "ShapeClassifier":
        x = cls._design(features)
        onehot = np.eye(len(names))[labels]
        w = np.zeros((x.shape[1], len(names)))
        for _ in range(steps):  # full-batch gradient descent on the (convex) cross-entropy
            logits = x @ w
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            w -= lr * (x.T @ (p - onehot) / len(x) + l2 * w)
        return cls(w, names)

    @classmethod
    def trained_on_renders(cls, num_images: int = 1200, seed: int = 0,
                           shapes: Sequence[str] = tuple(SHAPES)) -> "ShapeClassifier":
        """Fit on masks of ``num_images`` scenes drawn by the dataset generator (every attribute combination of
        ``shapes``: the world's, plus e.g. the demo LoRA's new shape)."""
        rng = np.random.default_rng([seed, 11])
        combos = all_combinations(shapes)
        features, labels = [], []
        while len(features) < num_images:
            scene = random_scene(rng, combos)
            vector = mask_features(foreground(render(scene))[0])
            if vector is not None:
                features.append(vector)
                labels.append(list(shapes).index(scene.shape))
        return cls.fit(np.stack(features), np.array(labels), shapes)

    def probabilities(self, image: np.ndarray) -> Optional[np.ndarray]:
        """The softmax over :attr:`names` for an image's foreground mask; None without a foreground."""
        vector = mask_features(foreground(image)[0])
        if vector is None:
            return None
        logits = (self._design(vector[None]) @ self.weights)[0]
        p = np.exp(logits - logits.max())
        return p / p.sum()

    def predict(self, image: np.ndarray) -> Optional[str]:
        p = self.probabilities(image)
        return None if p is None else self.names[int(np.argmax(p))]


def judge(images: Sequence[np.ndarray], classifier: ShapeClassifier) -> Tuple[list, list]:
    """(colours, shapes) of uint8 (H, W, 3) images."""
    return [color_of(im) for im in images], [classifier.predict(im) for im in images]


def write_report(folder: str, report: dict) -> dict:
    """Write an evaluation's ``report`` to ``folder/results.json`` and print it."""
    import json
    import os

    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report
