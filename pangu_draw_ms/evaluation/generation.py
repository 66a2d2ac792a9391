"""Drawing an evaluation run's images: resumable, and shared out across ``msrun`` workers.

Image (seed s, prompt i) is ``<folder>/seed_<s>/<i:05d>.png`` and its noise comes from (s, i) - the
pipeline's ``first_image_index`` rule - so it is the same image whichever process, batch or restart draws
it (with the deterministic samplers: Euler, the default, DDIM with eta 0, Heun, DPM++(2M); an ancestral
sampler's per-step noise follows the batch; and up to float rounding where the batch size differs). A run
therefore resumes by drawing only the files that are missing (PNGs are written under a temporary name and
renamed, so a killed run leaves no half-written image), and ``world`` workers each draw one contiguous slice
of the prompts and together draw the images one process would.

``run.json`` in the folder records the settings that decide the images; a run with other settings into the
same folder stops with an error instead of mixing two runs' images.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from ..io.checkpoint import atomic_output
from .prompts import EvalPrompt

RUN_FILE = "run.json"
# draw(prompts, seed, first_image_index) -> one PIL image per prompt
Draw = Callable[[List[str], int, int], list]


@dataclass(frozen=True)
class ImageJob:
    """One image of the run: prompt ``index`` of the prompt list, drawn with ``seed``, saved at ``path``."""

    index: int
    seed: int
    prompt: EvalPrompt
    path: str


def image_path(folder: str, seed: int, index: int) -> str:
    return os.path.join(folder, f"seed_{seed}", f"{index:05d}.png")


def image_jobs(prompts: Sequence[EvalPrompt], seeds: Sequence[int], folder: str) -> List[ImageJob]:
    """Every image of the run, seed by seed, prompts in order."""
    if not prompts:
        raise ValueError("an evaluation run needs at least one prompt")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    return [ImageJob(i, seed, prompt, image_path(folder, seed, i))
            for seed in seeds for i, prompt in enumerate(prompts)]


def shard(jobs: Sequence[ImageJob], rank: int, world: int) -> List[ImageJob]:
    """Worker ``rank``'s share of ``jobs`` (of ``world`` workers): for each seed, one contiguous slice of the
    prompts, the slices of all workers covering every prompt exactly once."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    count = max(job.index for job in jobs) + 1
    low, high = rank * count // world, (rank + 1) * count // world
    return [job for job in jobs if low <= job.index < high]


def batches(jobs: Sequence[ImageJob], batch_size: int) -> Iterator[List[ImageJob]]:
    """Groups of at most ``batch_size`` jobs with one seed and consecutive prompt indices (one pipeline call
    each: its ``first_image_index`` is the first job's index)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batch: List[ImageJob] = []
    for job in jobs:
        if batch and (len(batch) == batch_size or job.seed != batch[-1].seed or job.index != batch[-1].index + 1):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def save_png(image, path: str, metadata: Dict[str, str]) -> None:
    """Write a PNG with text metadata atomically (:func:`~pangu_draw_ms.io.checkpoint.atomic_output`)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path) as partial:
        image.save(partial, format="PNG", pnginfo=info)


def check_run_settings(folder: str, settings: dict, write: bool) -> None:
    """Stop when ``folder`` holds another run's images; record ``settings`` there (``write``, on one rank)."""
    path = os.path.join(folder, RUN_FILE)
    settings = json.loads(json.dumps(settings, ensure_ascii=False))  # the form it has on disk
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{folder} holds the images of a run with other settings ({', '.join(changed)} "
                             "differ): give another --out, or remove that folder to redo it")
        return
    if write:
        os.makedirs(folder, exist_ok=True)
        with atomic_output(path) as partial, open(partial, "w", encoding="utf-8") as f:
            json.dump(settings, f, ensure_ascii=False, indent=1)


def draw_missing(draw: Draw, jobs: Sequence[ImageJob], batch_size: int,
                 progress: Optional[Callable[[int], None]] = None) -> int:
    """Draw and save every job whose PNG does not exist yet; returns how many were written. ``progress(n)``
    after each batch that wrote n images.

    A batch with a missing image is drawn whole, as the uninterrupted run drew it, and only its missing PNGs
    are written: a resumed run's images are then the uninterrupted run's bit for bit (the same image drawn
    in another batch agrees only to float rounding, about 1e-6: matmul kernels block by batch size).
    """
    written = 0
    for batch in batches(jobs, batch_size):
        missing = [not os.path.isfile(job.path) for job in batch]
        if not any(missing):
            continue
        images = draw([job.prompt.text for job in batch], batch[0].seed, batch[0].index)
        for job, image, write in zip(batch, images, missing):
            if write:
                save_png(image, job.path, {"prompt": job.prompt.text, "parameters": json.dumps(
                    {"prompt": job.prompt.text, "lang": job.prompt.lang, "key": job.prompt.key, "seed": job.seed,
                     "image_index": job.index}, ensure_ascii=False)})
        written += sum(missing)
        if progress is not None:
            progress(sum(missing))
    return written
