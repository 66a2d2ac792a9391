"""Fréchet Inception Distance (FID), as pytorch-fid computes it.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
equilibrium") fits a Gaussian to the 2048-d Inception pool features of each image set and measures

    d^2 = |mu_1 - mu_2|^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)).

:func:`frechet_distance` is pytorch-fid's ``calculate_frechet_distance`` step for step, in float64 (scipy's
``sqrtm``; when the product's square root is not finite, ``eps`` is added to both diagonals; an imaginary
part larger than 1e-3 on the diagonal is an error, a smaller one is dropped). Statistics are the features'
mean and covariance (``np.cov``, unbiased), saved as pytorch-fid's ``.npz`` (``mu``, ``sigma``), so
published reference statistics (e.g. COCO-30k) load as they are.

Images are read and fed as pytorch-fid feeds them: RGB, ``uint8 / 255`` in [0, 1], through
:class:`~pangu_draw_ms.evaluation.inception.FIDInceptionV3` (which resizes to 299x299 itself). FID depends
on the image count (it is biased for small sets): compare only numbers measured on equally many images.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from scipy import linalg

from ..images import ImageSource, load_image, to_unit_array

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STATISTICS_KEYS = ("mu", "sigma")
DEFAULT_BATCH_SIZE = 50  # pytorch-fid's default

# What the functions below take as a set of images: a folder, a sequence of images (paths, PIL images,
# uint8 (H, W, 3) arrays) or one float array (B, 3, H, W) in [0, 1].
Images = Union[str, os.PathLike, Sequence[ImageSource], np.ndarray]


@dataclass
class FeatureStatistics:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D), float64, of ``count`` feature vectors (``count`` is
    None for statistics loaded from a file that does not record it, as pytorch-fid's do not)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: Optional[int] = None

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.size, self.mu.size):
            raise ValueError(f"FID statistics need mu of shape (D,) and sigma of shape (D, D); got mu "
                             f"{self.mu.shape} and sigma {self.sigma.shape}")

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStatistics":
        """Statistics of ``features`` (N, D), N >= 2: the mean and the unbiased covariance."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D); got shape {features.shape}")
        if features.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 images, got {features.shape[0]}: the covariance of fewer "
                             "is undefined")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write pytorch-fid's ``.npz`` (``mu``, ``sigma``), plus ``count`` when known."""
        extra = {} if self.count is None else {"count": np.int64(self.count)}
        np.savez(path, mu=self.mu, sigma=self.sigma, **extra)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "FeatureStatistics":
        """Read a ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's ``--save-stats`` output, published
        reference statistics, or :meth:`save`'s)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FID statistics file {os.fspath(path)!r} does not exist")
        with np.load(path) as stored:
            missing = [key for key in STATISTICS_KEYS if key not in stored.files]
            if missing:
                raise ValueError(f"{os.fspath(path)!r} is not an FID statistics file: it lacks "
                                 f"{', '.join(missing)} (has: {', '.join(stored.files) or 'nothing'}); expected "
                                 "an .npz with 'mu' (D,) and 'sigma' (D, D) as pytorch-fid writes")
            count = int(stored["count"]) if "count" in stored.files else None
            try:
                return cls(stored["mu"], stored["sigma"], count)
            except ValueError as error:
                raise ValueError(f"{os.fspath(path)!r}: {error}") from None


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): pytorch-fid's
    ``calculate_frechet_distance`` (the numerically stable form by D. J. Sutherland), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"the two FID statistics have different shapes: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}; both must come from the same features (2048-d "
                         "Inception pool features for FID)")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logger.warning("FID: the product of the covariances is singular; adding %s to their diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the square root of the covariance product has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag))}: the statistics are not valid covariances")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def image_files(folder: Union[str, os.PathLike]) -> List[str]:
    """The image files under ``folder``, recursively, sorted by path; files with other extensions are left
    out. An empty result is an error (a wrong folder would otherwise give a meaningless score)."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"image folder {os.fspath(folder)!r} does not exist or is not a folder")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {os.fspath(folder)!r}")
    return files


def _image(source: ImageSource, index: int) -> Image.Image:
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"image {index}"
    try:
        return load_image(source, name=name)
    except OSError as error:  # not an image, truncated, unreadable: say which file
        raise ValueError(f"{name} is not a readable image ({error})") from None


def image_batches(images: Images, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[np.ndarray]:
    """Float32 (B, 3, H, W) batches in [0, 1] of ``images`` in order, at most ``batch_size`` each; a batch
    ends early where the image size changes. Files are decoded one batch at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[1] != 3 or images.dtype.kind != "f":
            raise ValueError(f"an image array must be float (B, 3, H, W) in [0, 1]; got {images.dtype} "
                             f"{images.shape} (pass uint8 (H, W, 3) images as a list)")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"image values must lie in [0, 1]; got [{images.min():.3g}, {images.max():.3g}] "
                             "(VAE outputs in [-1, 1] become (x + 1) / 2)")
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size].astype(np.float32)
        return
    if isinstance(images, (str, os.PathLike)):
        images = image_files(images)
    batch: List[Image.Image] = []
    for index, source in enumerate(images):
        image = _image(source, index)
        if batch and (len(batch) == batch_size or image.size != batch[0].size):
            yield to_unit_array(batch)
            batch = []
        batch.append(image)
    if batch:
        yield to_unit_array(batch)


def inception_outputs(images: Images, inception, batch_size: int = DEFAULT_BATCH_SIZE
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """``(features (N, 2048), logits_unbiased (N, 1008))`` of ``images`` through ``inception``
    (:class:`~pangu_draw_ms.evaluation.inception.FIDInceptionV3`), float32, in the images' order.

    A short batch is padded to ``batch_size`` with copies of its last image (outputs dropped), so that
    GRAPH_MODE compiles one graph per image size, not one more for the last batch.
    """
    from mindspore import Tensor

    features, logits = [], []
    for batch in image_batches(images, batch_size):
        count = batch.shape[0]
        if count < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        pool, _, unbiased = inception(Tensor(batch))
        features.append(pool.asnumpy()[:count])
        logits.append(unbiased.asnumpy()[:count])
    if not features:
        raise ValueError("no images were given")
    return np.concatenate(features), np.concatenate(logits)


def statistics_of(source: Union[Images, FeatureStatistics], inception=None,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> FeatureStatistics:
    """FID statistics of ``source``: :class:`FeatureStatistics` as they are, a ``.npz`` file loaded, or
    images (a folder, a sequence, an array; see :func:`image_batches`) through ``inception``."""
    if isinstance(source, FeatureStatistics):
        return source
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(".npz"):
        return FeatureStatistics.load(source)
    if inception is None:
        raise ValueError("statistics of images need the Inception network: pass inception="
                         "pangu_draw_ms.io.inception.load_fid_inception(<pt_inception-2015-12-05 weights>)")
    features, _ = inception_outputs(source, inception, batch_size)
    return FeatureStatistics.from_features(features)


def fid_from_images(images: Union[Images, FeatureStatistics], reference: Union[Images, FeatureStatistics],
                    inception=None, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """FID between ``images`` and ``reference``; each is images (a folder, a sequence of paths/PIL images/
    uint8 arrays, a float (B, 3, H, W) array in [0, 1]), a statistics ``.npz`` or :class:`FeatureStatistics`."""
    first = statistics_of(images, inception, batch_size)
    second = statistics_of(reference, inception, batch_size)
    return frechet_distance(first.mu, first.sigma, second.mu, second.sigma)


def save_statistics(images: Images, path: Union[str, os.PathLike], inception,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> FeatureStatistics:
    """Compute the FID statistics of ``images`` and write them to ``path`` (pytorch-fid's ``.npz``)."""
    stats = statistics_of(images, inception, batch_size)
    stats.save(path)
    return stats

