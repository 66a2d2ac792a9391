"""Chinese-CLIP (Yang et al. 2022, "Chinese CLIP: Contrastive Vision-Language Pretraining in Chinese";
OFA-Sys ``cn_clip``) as MindSpore cells, and the CN-CLIP score of Chinese captions.

Architecture (``cn_clip.clip.model.CLIP``, ViT variants):

* image tower: OpenAI CLIP's ViT (Radford et al. 2021) - patch convolution, class token, learned
  positions, ``ln_pre``, pre-LN blocks with quick_gelu (heads = width / ``vision_head_width``, MLP width
  4 x width, LayerNorm eps 1e-5), ``ln_post`` on the class token, ``proj`` to ``embed_dim``. That is
  :class:`~pangu_draw_ms.models.clip_vision.CLIPVisionEncoder`, reused as is;
* text tower: BERT (Devlin et al. 2019) with RoBERTa-wwm-ext weights - word + position + token-type
  (always type 0) embeddings and a LayerNorm, post-LN layers (``LN(x + attention(x))`` then
  ``LN(x + MLP(x))``, exact erf GELU, LayerNorm eps 1e-12), padding (id 0) masked out of attention with
  an additive -10000 as cn_clip does; the [CLS] token's last hidden state through ``text_projection``
  (no pooler) is the text embedding: :class:`BertTextEncoder`;
* ``logit_scale``.

Images are preprocessed as cn_clip's ``image_transform``: resized to ``image_resolution`` squared with
PIL's bicubic filter (no aspect-preserving crop, unlike OpenAI CLIP), scaled to [0, 1] and normalised with
OpenAI CLIP's mean and std. Captions are tokenized by the BERT-Chinese WordPiece tokenizer bundled with
this package (the same vocab.txt as cn_clip's), ``[CLS] ... [SEP]`` zero-padded to cn_clip's context
length 52.

Why BERT is written here: the issue asks to use mindformers' BERT encoder if mindformers 1.9.0 provides
one that runs in GRAPH_MODE on CPU. It provides none: the mindformers-1.9.0 wheel's ``mindformers/models``
holds deepseek3, glm2, glm4, glm4_moe, llama, qwen2, qwen3, qwen3_moe, telechat2, telechat3 and
telechat3_moe (plus shared base/auto/multi_modal code); ``models/auto/modeling_auto.py`` still names
``BertModel`` and ``BertForPreTraining`` in its name tables, but no file or class of the wheel defines
them. (It would also pin transformers==4.57.1, numpy<2, pyarrow==19.0.0, datasets and mindpet.) So the
BERT tower is built from this package's device-aware layers, reusing the CLIP attention and MLP cells.
"""
from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass, fields
from typing import Mapping, Optional, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import ConfigError, VisionEncoderConfig
from ..images import load_image, resize
from ..io.checkpoint import load_tensors
from ..io.cn_clip import cn_clip_from_checkpoint
from ..io.state import load_state
from ..models.clip_text import CLIPMLP, CLIPAttention
from ..models.clip_vision import CLIPVisionEncoder
from ..models.layers import Dense, Embedding, LayerNorm
from ..pipelines.image_processing import preprocess_clip_images
from ..tokenizers import Tokenizer, WordPieceTokenizer, resolve_vocab_path
from .clip_score import DualEncoder, Images, Texts, clip_score, image_list

BERT_CHINESE_VOCAB = "bert_chinese_vocab.txt"
CONTEXT_LENGTH = 52  # cn_clip.clip.tokenize's default, used by every released model
PAD_TOKEN_ID = 0  # [PAD] of the BERT-Chinese vocab; cn_clip masks it out of the text tower's attention
# cn_clip's BERT masks padding by adding (1 - mask) * -10000 to the attention scores.
PADDING_SCORE = -10000.0
BERT_LAYER_NORM_EPS = 1e-12  # cn_clip.clip.model.CLIP builds its BertConfig with this
VIT_LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, used by the ViT
VIT_MLP_RATIO = 4

# The released ViT models' configs: cn_clip's model_configs/<vision>.json and <text>.json (facts, copied
# as numbers), keyed as cn_clip.clip.available_models names them. RN50 (a ModifiedResNet) is not supported.
_VISION_JSON = {
    "ViT-B-16": {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
                 "vision_patch_size": 16},
    "ViT-L-14": {"embed_dim": 768, "image_resolution": 224, "vision_layers": 24, "vision_width": 1024,
                 "vision_patch_size": 14},
    "ViT-L-14-336": {"embed_dim": 768, "image_resolution": 336, "vision_layers": 24, "vision_width": 1024,
                     "vision_patch_size": 14},
    "ViT-H-14": {"embed_dim": 1024, "image_resolution": 224, "vision_layers": 32, "vision_width": 1280,
                 "vision_head_width": 80, "vision_patch_size": 14},
}
_TEXT_JSON = {
    "RoBERTa-wwm-ext-base-chinese": {"vocab_size": 21128, "text_hidden_act": "gelu", "text_hidden_size": 768,
                                     "text_intermediate_size": 3072, "text_max_position_embeddings": 512,
                                     "text_num_attention_heads": 12, "text_num_hidden_layers": 12,
                                     "text_type_vocab_size": 2},
    "RoBERTa-wwm-ext-large-chinese": {"vocab_size": 21128, "text_hidden_act": "gelu", "text_hidden_size": 1024,
                                      "text_intermediate_size": 4096, "text_max_position_embeddings": 512,
                                      "text_num_attention_heads": 16, "text_num_hidden_layers": 24,
                                      "text_type_vocab_size": 2},
}
# cn_clip.clip.utils._MODEL_INFO: released model -> "<vision>@<text>".
RELEASED_MODELS = {
    "ViT-B-16": "ViT-B-16@RoBERTa-wwm-ext-base-chinese",
    "ViT-L-14": "ViT-L-14@RoBERTa-wwm-ext-base-chinese",
    "ViT-L-14-336": "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese",
    "ViT-H-14": "ViT-H-14@RoBERTa-wwm-ext-large-chinese",
}
# Keys of cn_clip's JSON configs that only matter for training.
_TRAINING_ONLY_KEYS = ("text_attention_probs_dropout_prob", "text_hidden_dropout_prob", "text_initializer_range")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class BertConfig:
    """The BERT text tower of a Chinese-CLIP model (built by :attr:`CNCLIPConfig.text_encoder_config`).

    Field names are those the shared CLIP attention/MLP cells read (``hidden_size``, ``num_heads``,
    ``intermediate_size``, ``hidden_act``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    projection_dim: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = BERT_LAYER_NORM_EPS
    pad_token_id: int = PAD_TOKEN_ID


@dataclass(frozen=True)
class CNCLIPConfig:
    """A Chinese-CLIP ViT + BERT architecture, with the field names of cn_clip's JSON model configs
    (``model_configs/ViT-B-16.json`` merged with ``RoBERTa-wwm-ext-base-chinese.json``: the defaults).

    Vision: ``image_resolution`` (input side), ``vision_patch_size``, ``vision_width``, ``vision_layers``,
    ``vision_head_width`` (heads = width / head width); text: ``vocab_size``, ``text_hidden_size``,
    ``text_num_hidden_layers``, ``text_num_attention_heads``, ``text_intermediate_size``,
    ``text_max_position_embeddings``, ``text_type_vocab_size``, ``text_hidden_act``; ``embed_dim`` (the
    shared embedding width); ``context_length``: token ids per caption (cn_clip's 52).
    """

    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 16
    vision_head_width: int = 64
    vocab_size: int = 21128
    text_hidden_size: int = 768
    text_num_hidden_layers: int = 12
    text_num_attention_heads: int = 12
    text_intermediate_size: int = 3072
    text_max_position_embeddings: int = 512
    text_type_vocab_size: int = 2
    text_hidden_act: str = "gelu"
    context_length: int = CONTEXT_LENGTH

    def __post_init__(self):
        _check(not isinstance(self.vision_layers, (list, tuple, str)),
               f"CN-CLIP: vision_layers {self.vision_layers!r} describes a ModifiedResNet image tower (RN50); only "
               "the ViT towers (an integer number of layers) are implemented")
        for name in ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                     "vision_head_width", "vocab_size", "text_hidden_size", "text_num_hidden_layers",
                     "text_num_attention_heads", "text_intermediate_size", "text_max_position_embeddings",
                     "text_type_vocab_size", "context_length"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"CN-CLIP: {name} must be an integer >= 1, got {value!r}")
        _check(self.vision_width % self.vision_head_width == 0,
               f"CN-CLIP: vision_width {self.vision_width} is not divisible by vision_head_width "
               f"{self.vision_head_width}")
        _check(self.text_hidden_size % self.text_num_attention_heads == 0,
               f"CN-CLIP: text_hidden_size {self.text_hidden_size} is not divisible by text_num_attention_heads "
               f"{self.text_num_attention_heads}")
        _check(self.text_hidden_act == "gelu",
               f"CN-CLIP: text_hidden_act {self.text_hidden_act!r} is not implemented; the released text towers use "
               "'gelu' (exact erf GELU)")
        _check(self.context_length <= self.text_max_position_embeddings,
               f"CN-CLIP: context_length {self.context_length} exceeds text_max_position_embeddings "
               f"{self.text_max_position_embeddings}")
        _check(self.image_resolution % self.vision_patch_size == 0,
               f"CN-CLIP: image_resolution {self.image_resolution} is not divisible by vision_patch_size "
               f"{self.vision_patch_size}; the patches must tile the image")

    @property
    def vision_encoder_config(self) -> VisionEncoderConfig:
        """The ViT image tower as a :class:`VisionEncoderConfig` (quick_gelu, LayerNorm eps 1e-5)."""
        return VisionEncoderConfig(
            image_size=self.image_resolution, patch_size=self.vision_patch_size, hidden_size=self.vision_width,
            num_layers=self.vision_layers, num_heads=self.vision_width // self.vision_head_width,
            intermediate_size=VIT_MLP_RATIO * self.vision_width, hidden_act="quick_gelu",
            layer_norm_eps=VIT_LAYER_NORM_EPS, projection_dim=self.embed_dim)

    @property
    def text_encoder_config(self) -> BertConfig:
        """The BERT text tower as a :class:`BertConfig`."""
        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.text_hidden_size, num_layers=self.text_num_hidden_layers,
            num_heads=self.text_num_attention_heads, intermediate_size=self.text_intermediate_size,
            max_position_embeddings=self.text_max_position_embeddings, type_vocab_size=self.text_type_vocab_size,
            projection_dim=self.embed_dim, hidden_act=self.text_hidden_act)

    @classmethod
    def from_cn_clip_json(cls, vision: Union[str, os.PathLike, Mapping], text: Union[str, os.PathLike, Mapping],
                          context_length: int = CONTEXT_LENGTH) -> "CNCLIPConfig":
        """The config of cn_clip's ``model_configs/<vision>.json`` + ``<text>.json`` (paths or loaded dicts),
        merged as ``cn_clip.clip.utils.create_model`` does. Training-only keys (dropout rates, initializer
        range) are ignored; unknown keys are refused."""
        merged = {**_json_dict(vision), **_json_dict(text)}
        if isinstance(merged.get("vision_layers"), str):  # RN50.json writes its stage depths as "[3,4,6,3]"
            merged["vision_layers"] = ast.literal_eval(merged["vision_layers"])
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in merged if k not in names and k not in _TRAINING_ONLY_KEYS)
        _check(not unknown, f"CN-CLIP: unknown config key(s) {unknown}; cn_clip's model configs hold {sorted(names)} "
               f"and the training-only {list(_TRAINING_ONLY_KEYS)}")
        return cls(**{k: v for k, v in merged.items() if k in names}, context_length=context_length)

    @classmethod
    def released(cls, name: str) -> "CNCLIPConfig":
        """The config of a released Chinese-CLIP ViT model: ``ViT-B-16``, ``ViT-L-14``, ``ViT-L-14-336`` or
        ``ViT-H-14`` (``cn_clip.clip.available_models()`` names, checkpoints ``clip_cn_vit-*.pt``)."""
        if name not in RELEASED_MODELS:
            raise ConfigError(f"CN-CLIP: unknown released model {name!r}; choose one of {sorted(RELEASED_MODELS)} "
                              "(RN50 is a ResNet, which is not implemented)")
        vision, text = RELEASED_MODELS[name].split("@")
        return cls.from_cn_clip_json(_VISION_JSON[vision], _TEXT_JSON[text])


def _json_dict(source: Union[str, os.PathLike, Mapping]) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    with open(source, encoding="utf-8") as f:
        return json.load(f)


class BertEmbeddings(nn.Cell):
    """word + position + token-type embeddings (every token of type 0, as cn_clip), then LayerNorm."""

    def __init__(self, config: BertConfig, dtype=ms.float32):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size, dtype=dtype)
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.position_ids = Tensor(np.arange(config.max_position_embeddings, dtype=np.int32))

    def construct(self, input_ids):
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"BERT text encoder: sequences of {length} tokens exceed the {self.max_positions} "
                             f"position embeddings; pass at most {self.max_positions}")
        x = (self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:length])
             + self.token_type_embeddings(ops.zeros_like(input_ids)))
        return self.layer_norm(x)


class BertLayer(nn.Cell):
    """Post-LN transformer layer: ``x = LN(x + attention(x))``, then ``LN(x + MLP(x))``."""

    def __init__(self, config: BertConfig, dtype=ms.float32):
        super().__init__()
        self.self_attn = CLIPAttention(config, dtype=dtype)
        self.attention_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype)
        self.mlp_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def construct(self, x, mask):
        x = self.attention_norm(x + self.self_attn(x, mask))
        return self.mlp_norm(x + self.mlp(x))


class BertEncoder(nn.Cell):
    def __init__(self, config: BertConfig, dtype=ms.float32):
        super().__init__()
        self.layers = nn.CellList([BertLayer(config, dtype=dtype) for _ in range(config.num_layers)])

    def construct(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return x


class BertTextEncoder(nn.Cell):
    """cn_clip's text tower: BERT, then ``text_projection`` of the [CLS] (first) token.

    ``construct(input_ids)`` with int ids (B, L), L <= ``max_position_embeddings``, padded with
    ``pad_token_id``, returns ``(hidden, text_embeds)``: the last layer's output (B, L, hidden_size) and
    the projected [CLS] feature (B, projection_dim).
    """

    def __init__(self, config: BertConfig, dtype=ms.float32):
        super().__init__()
        self.config = config
        self.pad_token_id = config.pad_token_id
        self.embeddings = BertEmbeddings(config, dtype=dtype)
        self.encoder = BertEncoder(config, dtype=dtype)
        self.text_projection = Dense(config.hidden_size, config.projection_dim, bias=False, dtype=dtype)

    def construct(self, input_ids):
        batch, length = input_ids.shape
        padding = (input_ids == self.pad_token_id).astype(ms.float32) * PADDING_SCORE
        hidden = self.encoder(self.embeddings(input_ids), padding.reshape(batch, 1, 1, length))
        return hidden, self.text_projection(hidden[:, 0])


def preprocess_cn_clip_images(images: Images, image_size: int = 224) -> np.ndarray:
    """Float32 pixel values (B, 3, image_size, image_size) as cn_clip's ``image_transform``: each image
    (anything :func:`pangu_draw_ms.images.load_image` reads, converted to RGB first) resized to
    ``image_size`` squared with PIL's bicubic filter, scaled to [0, 1], normalised with OpenAI CLIP's
    mean and std. (cn_clip converts to RGB after resizing; the same for RGB images.)"""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    squares = [resize(load_image(image, f"image {i}"), (image_size, image_size))
               for i, image in enumerate(image_list(images))]
    # On a square of the target size CLIP's shortest-side resize (PIL returns an unchanged copy) and center
    # crop do nothing: what remains is CLIP's scaling and normalisation.
    return preprocess_clip_images(squares, image_size)


def cn_clip_tokenizer(context_length: int = CONTEXT_LENGTH) -> WordPieceTokenizer:
    """The BERT-Chinese WordPiece tokenizer (bundled vocab, the one cn_clip ships): ``[CLS] ids [SEP]``
    zero-padded to ``context_length``; a longer caption keeps its first ``context_length - 2`` word pieces,
    as ``cn_clip.clip.tokenize`` does."""
    return WordPieceTokenizer(resolve_vocab_path(BERT_CHINESE_VOCAB), max_length=context_length)


class CNCLIPModel(DualEncoder):
    """Chinese-CLIP: ``vision_model`` (:class:`CLIPVisionEncoder`), ``text_model`` (:class:`BertTextEncoder`)
    and ``logit_scale``, built from a :class:`CNCLIPConfig`; :func:`load_cn_clip` loads a cn_clip checkpoint.

    ``image_features`` / ``text_features`` equal cn_clip's ``encode_image`` / ``encode_text``."""

    def __init__(self, config: CNCLIPConfig, dtype=ms.float32):
        super().__init__(CLIPVisionEncoder(config.vision_encoder_config, dtype=dtype),
                         BertTextEncoder(config.text_encoder_config, dtype=dtype))
        self.config = config

    def preprocess(self, images: Images) -> np.ndarray:
        return preprocess_cn_clip_images(images, self.config.image_resolution)

    def default_tokenizer(self) -> Tokenizer:
        return cn_clip_tokenizer(self.config.context_length)


def load_cn_clip(path: str, config: Union[CNCLIPConfig, str] = "ViT-B-16", dtype=ms.float32) -> CNCLIPModel:
    """A :class:`CNCLIPModel` with the weights of a cn_clip checkpoint (``clip_cn_vit-b-16.pt`` ..., read
    with ``torch.load(weights_only=True)``; or the same names in a .safetensors/.ckpt file).

    ``config``: a :class:`CNCLIPConfig` or a released model's name (:meth:`CNCLIPConfig.released`): the
    checkpoint does not record its architecture. Every weight must fit (strict loading)."""
    if isinstance(config, str):
        config = CNCLIPConfig.released(config)
    model = CNCLIPModel(config, dtype=dtype)
    load_state(model, cn_clip_from_checkpoint(load_tensors(path)), what=f"cn_clip checkpoint {path}")
    return model


def cn_clip_score(images: Images, texts: Texts, model: CNCLIPModel, tokenizer: Optional[Tokenizer] = None,
                  batch_size: int = 32) -> float:
    """CN-CLIP score: :func:`~pangu_draw_ms.evaluation.clip_score.clip_score` (``max(mean 100 cos, 0)``,
    torchmetrics' definition) of ``images[i]`` captioned by (Chinese) ``texts[i]`` with a Chinese-CLIP
    model; ``tokenizer`` defaults to :func:`cn_clip_tokenizer`."""
    if not isinstance(model, CNCLIPModel):
        raise TypeError(f"cn_clip_score needs a CNCLIPModel (load_cn_clip), got {type(model).__name__}; "
                        "score with an English CLIP model through clip_score")
    return clip_score(images, texts, model, tokenizer, batch_size)
