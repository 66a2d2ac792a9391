"""Training data: a manifest of image-text pairs, aspect-ratio buckets, and a sharded, resumable batch stream.

* :func:`read_manifest` reads a JSONL or CSV manifest. Unusable entries (malformed line, no image, no
  caption, missing or unreadable file, bad size) are skipped and counted, never fatal.
* :func:`assign_buckets` puts every sample in the bucket of the nearest aspect ratio (Table 7 rule:
  ratio first, then area); a stage that does not upscale leaves out images smaller than their bucket.
* :class:`BatchPlan` fixes, per epoch, the GLOBAL batches (one bucket each, ``batch_size x world``
  samples): samples shuffled within buckets, batches shuffled, seeded by (seed, epoch). Rank r takes
  slice r of every global batch, so the data position of a run is one number - the count of micro-
  batches consumed - and a 2-worker run sees exactly the samples of a 1-worker run with twice the batch.
* :class:`BatchStream` decodes a rank's micro-batches through ``mindspore.dataset.GeneratorDataset``
  with parallel workers (threads), from any position. An image that fails to decode is replaced by the
  next good sample of its bucket (the batch keeps its shape) and counted.
* :class:`FeatureCache` holds precomputed VAE posteriors and frozen text features on disk.
"""
from __future__ import annotations

import collections
import csv
import functools
import json
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..buckets import BucketTable
from ..images import image_size, load_image, resize, to_array

# Which caption a sample contributes in an epoch: one of the languages, or the empty prompt.
UNCOND = "uncond"


@dataclass(frozen=True)
class Sample:
    """One image-text pair; ``height``/``width`` are the image's own size in pixels."""

    image: str
    caption_en: str
    caption_zh: str
    height: int
    width: int

    def caption(self, language: str) -> str:
        return self.caption_en if language == "en" else self.caption_zh


class Skipped(collections.Counter):
    """Counts of left-out samples by reason."""

    def describe(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.items())) or "none"


def _read_rows(path: str, skipped: Skipped) -> Iterator[dict]:
    with open(path, "r", encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            yield from csv.DictReader(f)
            return
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["malformed manifest line"] += 1
                continue
            if isinstance(row, dict):
                yield row
            else:
                skipped["malformed manifest line"] += 1


def read_manifest(path: str, root: str = "") -> Tuple[List[Sample], Skipped]:
    """The usable samples of a manifest and the counts of skipped entries by reason.

    Columns: ``image`` (path relative to ``root``, default the manifest's folder), ``caption_en``,
    ``caption_zh`` (at least one non-empty), optional ``height``/``width`` (read from the file when absent).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data manifest {os.path.abspath(path)!r} does not exist")
    root = root or os.path.dirname(os.path.abspath(path))
    samples: List[Sample] = []
    skipped = Skipped()
    for row in _read_rows(path, skipped):
        image = str(row.get("image") or "").strip()
        caption_en = str(row.get("caption_en") or "").strip()
        caption_zh = str(row.get("caption_zh") or "").strip()
        if not image:
            skipped["no image path"] += 1
            continue
        if not caption_en and not caption_zh:
            skipped["no caption"] += 1
            continue
        image = image if os.path.isabs(image) else os.path.join(root, image)
        if not os.path.isfile(image):
            skipped["missing image file"] += 1
            continue
        try:
            if row.get("height") not in (None, "") and row.get("width") not in (None, ""):
                height, width = int(row["height"]), int(row["width"])
            else:
                height, width = image_size(image)
        except (ValueError, TypeError):
            skipped["bad size"] += 1
            continue
        except OSError:
            skipped["unreadable image"] += 1
            continue
        if height <= 0 or width <= 0:
            skipped["bad size"] += 1
            continue
        samples.append(Sample(image, caption_en, caption_zh, height, width))
    return samples, skipped


def assign_buckets(samples: Sequence[Sample], table: BucketTable, upscale_small_images: bool
                   ) -> Tuple[np.ndarray, Skipped]:
    """Bucket index of every sample (-1 = left out) and the counts of left-out samples."""
    buckets = np.full(len(samples), -1, np.int64)
    skipped = Skipped()
    for i, sample in enumerate(samples):
        b = table.nearest(sample.height, sample.width)
        bucket_h, bucket_w = table.sizes[b]
        if not upscale_small_images and (sample.height < bucket_h or sample.width < bucket_w):
            skipped["smaller than its bucket (this stage does not upscale)"] += 1
            continue
        buckets[i] = b
    return buckets, skipped


class BatchPlan:
    """Per-epoch global batches of sample indices, each from one bucket."""

    def __init__(self, buckets: np.ndarray, global_batch: int, seed: int):
        self.buckets = np.asarray(buckets)
        self.global_batch = global_batch
        self.seed = seed
        counts = collections.Counter(int(b) for b in self.buckets if b >= 0)
        self.batches_per_epoch = sum(n // global_batch for n in counts.values())
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no bucket holds a full global batch of {global_batch} samples (batch_size x workers); "
                f"samples per bucket: {dict(sorted(counts.items()))}. Use a smaller batch or more data")

    @functools.lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> List[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for b in sorted(set(int(x) for x in self.buckets if x >= 0)):
            members = rng.permutation(np.flatnonzero(self.buckets == b))
            usable = len(members) // self.global_batch * self.global_batch
            batches.extend(members[:usable].reshape(-1, self.global_batch))
        return [batches[i] for i in rng.permutation(len(batches))]

    def position(self, micro: int) -> Tuple[int, int]:
        """(epoch, batch within the epoch) of the micro-batch with this running count."""
        return divmod(micro, self.batches_per_epoch)


def choose_captions(indices: np.ndarray, epoch: int, seed: int, samples: Sequence[Sample],
                    languages: Sequence[str], uncond_prob: float) -> List[str]:
    """Which caption (a language or :data:`UNCOND`) each sample contributes in ``epoch``."""
    choices = []
    for i in indices:
        rng = np.random.default_rng([seed, epoch, int(i), 1])
        available = [lang for lang in languages if samples[i].caption(lang)]
        drop = rng.random() < uncond_prob
        pick = available[int(rng.integers(len(available)))] if available else UNCOND
        choices.append(UNCOND if drop else pick)
    return choices


class FeatureCache:
    """Precomputed VAE posteriors (``latents/<i>.npy``: mean and logvar stacked on channels) and frozen text
    features (``text/<i>.npz``: context and vector per caption choice) for sample ``i``, valid for one
    ``fingerprint`` (weights, bucket list, which samples, config) recorded in ``meta.json``; the trainer gives
    each fingerprint its own subfolder of ``data.cache_dir``."""

    def __init__(self, directory: str, fingerprint: str):
        self.directory = directory
        self.fingerprint = fingerprint

    def latents_path(self, i: int) -> str:
        return os.path.join(self.directory, "latents", f"{i}.npy")

    def text_path(self, i: int) -> str:
        return os.path.join(self.directory, "text", f"{i}.npz")

    def is_valid(self) -> bool:
        meta = os.path.join(self.directory, "meta.json")
        if not os.path.isfile(meta):
            return False
        with open(meta, "r", encoding="utf-8") as f:
            return json.load(f).get("fingerprint") == self.fingerprint

    def mark_valid(self) -> None:
        from ..io.checkpoint import atomic_output

        with atomic_output(os.path.join(self.directory, "meta.json")) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"fingerprint": self.fingerprint}, f)


class BatchStream:
    """This rank's micro-batches, decoded in parallel, starting from any running micro-batch count.

    Each batch is a dict: ``bucket_index`` (b,) int32, ``indices`` (b,) sample indices, and either
    ``pixels`` (b, 3, H, W) or ``latents`` (b, 2C, h, w) (posterior mean and logvar, from the cache),
    plus - for the diffusion stages - either ``ids_<k>`` ((b, L) int32 ids of text encoder k) or
    ``context`` / ``vector`` (cached text features).
    """

    def __init__(self, samples: Sequence[Sample], buckets: np.ndarray, table: BucketTable, plan: BatchPlan, *,
                 rank: int, world: int, batch_size: int, seed: int, languages: Sequence[str] = ("en", "zh"),
                 uncond_prob: float = 0.0, tokenizers: Optional[Sequence[Callable]] = None,
                 cache: Optional[FeatureCache] = None, cache_text: bool = False, num_workers: int = 2):
        self.samples = samples
        self.buckets = buckets
        self.table = table
        self.plan = plan
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.seed = seed
        self.languages = tuple(languages)
        self.uncond_prob = uncond_prob
        self.tokenizers = tokenizers
        self.cache = cache
        self.cache_text = cache_text and cache is not None
        self.num_workers = num_workers
        self.bad = set()
        self.replaced = 0
        self._lock = threading.Lock()
        self._members = {b: np.flatnonzero(buckets == b) for b in range(len(table))}

    def pixels(self, i: int, size) -> np.ndarray:
        """The image of sample ``i``; a sample that fails to decode is replaced by the next good one of its bucket."""
        members = self._members[int(self.buckets[i])]
        start = int(np.searchsorted(members, i))
        for k in range(len(members)):
            j = int(members[(start + k) % len(members)])
            if j in self.bad:
                continue
            try:
                return to_array(resize(load_image(self.samples[j].image), size, crop=True))[0]
            except (OSError, ValueError, SyntaxError):
                with self._lock:
                    self.bad.add(j)
                    self.replaced += 1
        raise RuntimeError(f"no image of bucket {size} could be decoded")

    def columns(self) -> List[str]:
        names = ["bucket_index", "indices", "latents" if self.cache is not None else "pixels"]
        if self.tokenizers is not None:
            names += [f"ids_{k}" for k in range(len(self.tokenizers))]
        if self.cache_text:
            names += ["context", "vector"]
        return names

    def batch(self, micro: int) -> Dict[str, np.ndarray]:
        """Micro-batch number ``micro`` of this rank (columns: :meth:`columns`)."""
        epoch, position = self.plan.position(micro)
        global_batch = self.plan.epoch(epoch)[position]
        indices = global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        bucket = int(self.buckets[indices[0]])
        size = self.table.sizes[bucket]
        captions = choose_captions(indices, epoch, self.seed, self.samples, self.languages, self.uncond_prob)
        batch = {"bucket_index": np.full(len(indices), bucket, np.int32), "indices": indices.astype(np.int64)}
        if self.cache is not None:
            batch["latents"] = np.stack([np.load(self.cache.latents_path(int(i))) for i in indices])
        else:
            batch["pixels"] = np.stack([self.pixels(int(i), size) for i in indices])
        if self.tokenizers is not None:
            texts = [self.samples[i].caption(c) if c != UNCOND else "" for i, c in zip(indices, captions)]
            for k, tokenizer in enumerate(self.tokenizers):
                batch[f"ids_{k}"] = tokenizer(texts)
        if self.cache_text:
            features = [np.load(self.cache.text_path(int(i))) for i in indices]
            batch["context"] = np.stack([f[f"context_{c}"] for f, c in zip(features, captions)])
            batch["vector"] = np.stack([f[f"vector_{c}"] for f, c in zip(features, captions)])
        return batch

    def __call__(self, start: int) -> Iterator[Dict[str, np.ndarray]]:
        """Micro-batches ``start``, ``start + 1``, ... (epoch after epoch, without end)."""
        import mindspore.dataset as ds

        columns = self.columns()
        stream = self

        class Window:
            """Random-access source over micro-batches [begin, end): the dataset decodes items in parallel."""

            def __init__(self, begin, end):
                self.begin, self.end = begin, end

            def __len__(self):
                return self.end - self.begin

            def __getitem__(self, k):
                batch = stream.batch(self.begin + k)
                return tuple(batch[name] for name in columns)

        epoch = start // self.plan.batches_per_epoch
        while True:
            begin = max(start, epoch * self.plan.batches_per_epoch)
            window = Window(begin, (epoch + 1) * self.plan.batches_per_epoch)
            dataset = ds.GeneratorDataset(window, column_names=columns, shuffle=False,
                                          num_parallel_workers=self.num_workers, python_multiprocessing=False)
            for row in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
                yield dict(zip(columns, row))
            epoch += 1
