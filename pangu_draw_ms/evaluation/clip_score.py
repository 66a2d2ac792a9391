"""CLIP score of image-caption pairs, with CLIP (Radford et al. 2021) as MindSpore cells.

CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning")
measures how well a caption describes an image by the cosine similarity of their CLIP embeddings. This
module follows torchmetrics 1.9.0 (``torchmetrics.functional.multimodal.clip_score`` and the
``CLIPScore`` metric), the definition text-to-image papers report: for N pairs (image_i, caption_i)

    score = max(mean_i 100 * cos(E_image_i, E_caption_i), 0)

torchmetrics averages the per-pair ``100 * cos`` and clamps the MEAN at 0 (its docstring writes the clamp
per pair; its code clamps the average). Hessel et al.'s CLIP-S is ``2.5 * max(cos, 0)`` per pair instead.

:class:`DualEncoder` holds an image tower and a text tower that embed into one space, plus CLIP's
``logit_scale`` (the log of the inverse softmax temperature of contrastive training; it does not enter
the score, but it is part of the checkpoint and is loaded). :class:`CLIPModel` is transformers'
``CLIPModel`` built from this package's cells (:class:`~pangu_draw_ms.models.clip_text.CLIPTextEncoder`
with a projection, :class:`~pangu_draw_ms.models.clip_vision.CLIPVisionEncoder`), loaded from a
``save_pretrained`` folder by :func:`load_clip_model`; the Chinese-CLIP model of
:mod:`pangu_draw_ms.evaluation.cn_clip` is another :class:`DualEncoder`. :func:`clip_score` scores any of
them.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn

from ..config import TextEncoderConfig, VisionEncoderConfig
from ..images import ImageSource
from ..io.checkpoint import load_tensors
from ..io.diffusers_folder import CONFIG_JSON, config_beside
from ..io.state import load_state
from ..io.transformers_clip import LOGIT_SCALE, clip_model_configs_from_transformers, clip_model_from_transformers
from ..models.clip_text import CLIPTextEncoder
from ..models.clip_vision import CLIPVisionEncoder
from ..pipelines.image_processing import preprocess_clip_images
from ..tokenizers import ClipBPETokenizer, Tokenizer, resolve_vocab_path

Images = Union[ImageSource, Sequence[ImageSource]]
Texts = Union[str, Sequence[str]]

CLIP_BPE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's initial temperature 0.07 (Radford et al. 2021, section 2.5); a checkpoint overwrites it.
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
SCORE_SCALE = 100.0  # torchmetrics' factor: the score is a cosine in percent


class DualEncoder(nn.Cell):
    """An image tower and a text tower whose outputs share one embedding space, and ``logit_scale``.

    ``vision_model(pixel_values)`` and ``text_model(input_ids)`` are cells returning
    ``(hidden_states, embeddings)``; subclasses say how images become pixel values (:meth:`preprocess`)
    and which tokenizer the text tower was trained with (:meth:`default_tokenizer`). Parameters are named
    ``vision_model.*``, ``text_model.*`` and ``logit_scale``.
    """

    def __init__(self, vision_model: nn.Cell, text_model: nn.Cell):
        super().__init__()
        self.vision_model = vision_model
        self.text_model = text_model
        self.logit_scale = Parameter(Tensor(INITIAL_LOGIT_SCALE, ms.float32), name=LOGIT_SCALE)

    def preprocess(self, images: Images) -> np.ndarray:
        """Float32 pixel values (B, 3, S, S) for the image tower."""
        raise NotImplementedError

    def default_tokenizer(self) -> Tokenizer:
        """The tokenizer the text tower was trained with."""
        raise NotImplementedError

    def image_features(self, images: Images, batch_size: int = 32) -> np.ndarray:
        """Image embeddings (N, embed_dim), float32, not normalised; ``images`` as for :func:`clip_score`.

        The images go through the tower ``batch_size`` at a time (in GRAPH_MODE each batch shape compiles
        once: a last, smaller batch adds one compile)."""
        images = image_list(images)
        batch_size = _positive(batch_size)
        return np.concatenate([self.vision_model(Tensor(self.preprocess(images[start:start + batch_size])))[1].asnumpy()
                               for start in range(0, len(images), batch_size)])

    def text_features(self, texts: Texts, tokenizer: Optional[Tokenizer] = None, batch_size: int = 32) -> np.ndarray:
        """Text embeddings (N, embed_dim), float32, not normalised, ``batch_size`` captions at a time;
        ``tokenizer`` defaults to a new :meth:`default_tokenizer` (pass one to reuse it across calls)."""
        texts = _text_list(texts)
        tokenizer = tokenizer or self.default_tokenizer()
        batch_size = _positive(batch_size)
        return np.concatenate([self.text_model(Tensor(tokenizer(texts[start:start + batch_size])))[1].asnumpy()
                               for start in range(0, len(texts), batch_size)])


class CLIPModel(DualEncoder):
    """transformers' ``CLIPModel`` (OpenAI CLIP): :class:`CLIPTextEncoder` with ``text_projection`` and
    :class:`CLIPVisionEncoder`, both projecting to ``projection_dim``.

    Embeddings as transformers' ``get_text_features`` (the final-LayerNormed end-of-text token,
    projected) and ``get_image_features`` (the post-LayerNormed class token, projected); images are
    preprocessed as ``CLIPImageProcessor`` does (:func:`preprocess_clip_images`).
    """

    def __init__(self, text_config: TextEncoderConfig, vision_config: VisionEncoderConfig, dtype=ms.float32):
        if text_config.projection_dim != vision_config.projection_dim:
            raise ValueError(f"CLIP model: the text projection_dim {text_config.projection_dim} and the vision "
                             f"projection_dim {vision_config.projection_dim} differ; both towers must embed into the "
                             "same space")
        super().__init__(CLIPVisionEncoder(vision_config, dtype=dtype), CLIPTextEncoder(text_config, dtype=dtype))
        self.text_config = text_config
        self.vision_config = vision_config

    def preprocess(self, images: Images) -> np.ndarray:
        return preprocess_clip_images(image_list(images), self.vision_config.image_size)

    def default_tokenizer(self) -> Tokenizer:
        """OpenAI CLIP's byte BPE (bundled), padded to the text tower's ``max_position_embeddings``."""
        return ClipBPETokenizer(resolve_vocab_path(CLIP_BPE_VOCAB), max_length=self.text_config.max_position_embeddings)


def load_clip_model(path: str, dtype=ms.float32) -> CLIPModel:
    """A :class:`CLIPModel` from a transformers ``CLIPModel.save_pretrained`` folder (``config.json`` and
    ``model.safetensors``, or ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``), or from
    a weights file with that ``config.json`` beside it. Every weight must fit (strict loading)."""
    config = config_beside(path)
    if config is None:
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        raise FileNotFoundError(f"{os.path.join(folder, CONFIG_JSON)} not found: a transformers CLIPModel folder "
                                f"holds its {CONFIG_JSON} beside the weights")
    text_config, vision_config = clip_model_configs_from_transformers(config)
    text, vision, logit_scale = clip_model_from_transformers(load_tensors(path))
    model = CLIPModel(text_config, vision_config, dtype=dtype)
    state = {**{f"text_model.{k}": v for k, v in text.items()}, **{f"vision_model.{k}": v for k, v in vision.items()},
             LOGIT_SCALE: logit_scale}
    load_state(model, state, what=f"transformers CLIPModel {path}")
    return model


def cosine_similarities(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """cos(image_i, text_i) for each pair (row i of both (N, D) arrays), in float64."""
    image_features = np.asarray(image_features, np.float64)
    text_features = np.asarray(text_features, np.float64)
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"expected image and text features of the same shape (N, D), got {image_features.shape} "
                         f"and {text_features.shape}")
    image_features = image_features / np.linalg.norm(image_features, axis=-1, keepdims=True)
    text_features = text_features / np.linalg.norm(text_features, axis=-1, keepdims=True)
    return (image_features * text_features).sum(axis=-1)


def clip_score_from_features(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """``max(mean_i 100 * cos(image_i, text_i), 0)``: torchmetrics' CLIP score of paired embeddings."""
    return max(SCORE_SCALE * float(cosine_similarities(image_features, text_features).mean()), 0.0)


def clip_score(images: Images, texts: Texts, model: DualEncoder, tokenizer: Optional[Tokenizer] = None,
               batch_size: int = 32) -> float:
    """CLIP score (torchmetrics' definition, see the module docstring) of ``images[i]`` captioned by
    ``texts[i]``, in [0, 100].

    ``images``: a PIL image, an image file path, a uint8 (H, W, 3) array, a sequence of those, or a uint8
    (N, H, W, 3) array. ``texts``: a caption or a sequence of N captions. ``model``: a :class:`CLIPModel`
    (:func:`load_clip_model`) or any other :class:`DualEncoder`; ``tokenizer`` defaults to the model's own.
    Images and captions go through the model ``batch_size`` at a time.
    """
    images = image_list(images)
    texts = _text_list(texts)
    if len(images) != len(texts):
        raise ValueError(f"clip_score scores image-caption pairs: got {len(images)} image(s) and {len(texts)} "
                         "caption(s); pass one caption per image")
    return clip_score_from_features(model.image_features(images, batch_size),
                                    model.text_features(texts, tokenizer, batch_size))


def image_list(images: Images) -> list:
    """``images`` as a non-empty list of single images (a uint8 (N, H, W, 3) array is split into N)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
        images = [images]
    if len(images) == 0:
        raise ValueError("got no images; pass a PIL image, an image path, a uint8 (H, W, 3) array, a sequence of "
                         "them, or a uint8 (N, H, W, 3) array")
    return list(images)


def _text_list(texts: Texts) -> list:
    """``texts`` as a non-empty list of captions."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("got no captions; pass a caption string or a sequence of them")
    return texts


def _positive(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size
