"""Inception Score (IS), Salimans et al. 2016, "Improved techniques for training GANs".

IS = exp(E_x KL(p(y|x) || p(y))), with p(y|x) the softmax of the FID Inception-v3's unbiased logits
(``features @ fc.weight^T``; see :mod:`pangu_draw_ms.evaluation.inception`) and p(y) their mean over the
images of a split. The images are cut into ``splits`` consecutive parts, split i holding images
``[i N // splits, (i + 1) N // splits)``; the score is the mean and the standard deviation of the splits'
scores. Everything is float64.

This is Salimans et al.'s reference code and torch-fidelity's ``isc_features_to_metric``. Against the other
implementations, on the same logits:

* torchmetrics' ``InceptionScore`` gives the same mean when N is a multiple of ``splits`` (it cuts with
  ``torch.chunk``: equal parts then) and the same images form each part; its standard deviation is the
  sample one (N - 1 denominator over the splits): ours x sqrt(splits / (splits - 1)).
* Both torchmetrics and torch-fidelity shuffle the images before cutting (``torch.randperm``;
  ``np.random.RandomState(2020).permutation`` in torch-fidelity), which changes the splits and so the
  numbers slightly. Here the images are taken in the order given; to reproduce torch-fidelity, pass
  ``logits[np.random.RandomState(2020).permutation(len(logits))]``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .fid import DEFAULT_BATCH_SIZE, Images, inception_outputs

DEFAULT_SPLITS = 10


class InceptionScore(NamedTuple):
    """Mean and (population) standard deviation of the per-split Inception Scores."""

    mean: float
    std: float


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score_from_logits(logits: np.ndarray, splits: int = DEFAULT_SPLITS) -> InceptionScore:
    """IS of the images whose unbiased Inception logits are ``logits`` (N, C), N >= ``splits``."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, classes); got shape {logits.shape}")
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    count = logits.shape[0]
    if count < splits:
        raise ValueError(f"the Inception Score with {splits} splits needs at least {splits} images, got {count}")
    log_p = _log_softmax(logits)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        part = slice(i * count // splits, (i + 1) * count // splits)
        log_marginal = np.log(p[part].mean(axis=0, keepdims=True))
        kl = (p[part] * (log_p[part] - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)))


def inception_score(images: Images, inception, splits: int = DEFAULT_SPLITS,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> InceptionScore:
    """IS of ``images`` (a folder, a sequence of paths/PIL images/uint8 arrays, or a float (B, 3, H, W) array
    in [0, 1]) through ``inception`` (:class:`~pangu_draw_ms.evaluation.inception.FIDInceptionV3`)."""
    _, logits = inception_outputs(images, inception, batch_size)
    return inception_score_from_logits(logits, splits)
