"""Run records: one CSV row per optimizer step, and a PNG plot of the loss curve (drawn with Pillow)."""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Sequence

import numpy as np

COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "loss_scale", "finite", "samples_per_s", "t_min", "t_max",
           "bucket", "size")


METRICS_FILE = "metrics.csv"  # one row per optimizer step


class MetricsLog:
    """Appends rows to ``<directory>/metrics.csv`` (a resumed run keeps the rows before its step)."""

    def __init__(self, directory: str, start_step: int = 0):
        self.path = os.path.join(directory, METRICS_FILE)
        os.makedirs(directory, exist_ok=True)
        kept: List[dict] = [r for r in read_metrics(self.path) if int(r["step"]) <= start_step] \
            if os.path.isfile(self.path) else []
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def append(self, row: Dict[str, float]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow({k: row.get(k, "") for k in COLUMNS})


def read_metrics(path: str) -> List[dict]:
    with open(path, "r", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start)."""
    values = np.asarray(values, np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(0, idx - window)
    return (cumulative[idx] - cumulative[start]) / (idx - start)


def plot_loss(csv_path: str, png_path: str, title: str = "training loss", size=(800, 480)) -> None:
    """The loss per step (light) and its moving average (dark) on a log axis, with step and loss ticks."""
    from PIL import Image, ImageDraw

    rows = [r for r in read_metrics(csv_path) if r["loss"] not in ("", "nan", "inf")]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    left, right, top, bottom = 70, 20, 30, 40
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if len(rows) >= 2:
        steps = np.array([float(r["step"]) for r in rows])
        losses = np.maximum(np.array([float(r["loss"]) for r in rows]), 1e-8)
        logs = np.log10(losses)
        low, high = math.floor(logs.min() * 10) / 10, math.ceil(logs.max() * 10) / 10 + 1e-9
        first, last = steps.min(), max(steps.max(), steps.min() + 1)

        def xy(step, log_loss):
            x = left + (step - first) / (last - first) * (width - left - right)
            y = height - bottom - (log_loss - low) / (high - low) * (height - top - bottom)
            return x, y

        for fraction in np.linspace(0, 1, 5):
            value = low + fraction * (high - low)
            _, y = xy(first, value)
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((5, y - 6), f"{10 ** value:.3g}", fill="black")
            step = first + fraction * (last - first)
            x, _ = xy(step, low)
            draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
            draw.text((x - 12, height - bottom + 8), f"{int(step)}", fill="black")
        draw.line([xy(s, v) for s, v in zip(steps, logs)], fill=(170, 200, 235))
        smoothed = np.log10(smooth(losses, max(1, len(losses) // 50)))
        draw.line([xy(s, v) for s, v in zip(steps, smoothed)], fill=(20, 60, 160), width=2)
    image.save(png_path)
