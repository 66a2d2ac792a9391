"""Typed configuration: frozen dataclasses loaded from YAML and validated on construction.

Every model config in this package is a dataclass in this file; ``configs/*.yaml`` files are loaded
with :func:`load_config`. A wrong key, a wrong type or an inconsistent value fails with a message
that names the offending entry (``unet.channel_mult``) and what would be valid.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Tuple, Type, TypeVar

import yaml

from .buckets import TABLE7_STRUCTURE, TABLE7_TEXTURE

T = TypeVar("T")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# A source checkout keeps configs/ beside the package; an installed package carries it inside.
CONFIG_DIR = next(
    (d for d in (os.path.join(os.path.dirname(_PACKAGE_DIR), "configs"), os.path.join(_PACKAGE_DIR, "configs"))
     if os.path.isdir(d)),
    os.path.join(_PACKAGE_DIR, "configs"),
)


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type, or inconsistent."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """SDXL-architecture UNet in sgm semantics (structure and texture generators share it).

    ``transformer_depth[i]`` is the number of transformer blocks in each spatial transformer of
    level ``i``; 0 means the level has no attention (the release: ``(0, 2, 10)``, i.e. attention at
    levels 2 and 3 only). Output blocks use the depth of their level, as sgm does. Heads are either a
    fixed width (``num_head_channels``, SDXL: 64) or a fixed count (``num_heads``, SD1.5: 8); set one.
    ``adm_in_channels``: width of the vector conditioning (``None``: no ``label_emb``, as SD1.5).
    ``use_linear_in_transformer``: proj_in/proj_out are Linear (SDXL) or 1x1 convs (SD1.5).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: Tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: Tuple[int, ...] = (0, 2, 10)
    transformer_depth_middle: int = 10
    num_head_channels: Optional[int] = 64
    num_heads: Optional[int] = None
    context_dim: int = 2048
    adm_in_channels: Optional[int] = 1536
    use_linear_in_transformer: bool = True
    norm_num_groups: int = 32
    ff_mult: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        _check(len(self.channel_mult) >= 1, "unet.channel_mult must name at least one level")
        _check(
            len(self.transformer_depth) == len(self.channel_mult),
            f"unet.transformer_depth has {len(self.transformer_depth)} entries but channel_mult has "
            f"{len(self.channel_mult)}; give one depth per level (0 = no attention at that level)",
        )
        _check(self.num_res_blocks >= 1, "unet.num_res_blocks must be >= 1")
        _check(all(d >= 0 for d in self.transformer_depth), "unet.transformer_depth entries must be >= 0")
        _check(self.transformer_depth_middle >= 1, "unet.transformer_depth_middle must be >= 1")
        _check(
            (self.num_head_channels is None) != (self.num_heads is None),
            "unet: set exactly one of num_head_channels (fixed head width) and num_heads (fixed head count)",
        )
        _check(self.adm_in_channels is None or self.adm_in_channels > 0, "unet.adm_in_channels must be > 0 or null")
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            _check(
                channels % self.norm_num_groups == 0,
                f"unet: {channels} channels (model_channels {self.model_channels} x mult {mult}) are not "
                f"divisible by norm_num_groups {self.norm_num_groups}",
            )
            divisor = self.num_head_channels or self.num_heads
            _check(
                channels % divisor == 0,
                f"unet: {channels} channels are not divisible by "
                f"{'num_head_channels' if self.num_head_channels else 'num_heads'} {divisor}",
            )
        _check(0.0 <= self.dropout < 1.0, "unet.dropout must be in [0, 1)")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, channels: int) -> Tuple[int, int]:
        """(number of heads, head width) of an attention layer over ``channels`` features."""
        if self.num_head_channels:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet (sgm/cldm layout) for a UNet of architecture ``unet``: a trainable copy of that
    UNet's encoder and middle block, fed the control image through a conv stack.

    ``conditioning_channels``: channels of the control image (3 for RGB). ``hint_channels``: widths of
    the control-image conv stack (diffusers ``conditioning_embedding_out_channels``); it halves the
    resolution ``len(hint_channels) - 1`` times, which must equal the VAE's downsampling (8 for SDXL).
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    hint_channels: Tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self):
        _check(self.conditioning_channels >= 1,
               f"controlnet.conditioning_channels must be >= 1, got {self.conditioning_channels}")
        _check(len(self.hint_channels) >= 1 and all(c >= 1 for c in self.hint_channels),
               f"controlnet.hint_channels must list at least one width >= 1, got {self.hint_channels}")

    @property
    def hint_downsample_factor(self) -> int:
        return 2 ** (len(self.hint_channels) - 1)


@dataclass(frozen=True)
class VAEConfig:
    """SDXL AutoencoderKL (LDM encoder/decoder with a mid attention block)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    # SDXL's VAE overflows in float16 (its activations exceed 65504): run it in float32 by default.
    force_fp32: bool = True

    def __post_init__(self):
        _check(len(self.channel_mult) >= 1, "vae.channel_mult must name at least one level")
        for name in ("in_channels", "out_channels", "base_channels", "latent_channels"):
            _check(getattr(self, name) >= 1, f"vae.{name} must be >= 1, got {getattr(self, name)}")
        _check(all(m >= 1 for m in self.channel_mult),
               f"vae.channel_mult entries must be >= 1, got {self.channel_mult}")
        _check(self.num_res_blocks >= 1, "vae.num_res_blocks must be >= 1")
        for mult in self.channel_mult:
            _check(
                (self.base_channels * mult) % self.norm_num_groups == 0,
                f"vae: {self.base_channels * mult} channels are not divisible by norm_num_groups "
                f"{self.norm_num_groups}",
            )
        _check(self.scaling_factor > 0, "vae.scaling_factor must be > 0")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


TokenizerKind = Literal["wordpiece", "clip_bpe", "sentencepiece"]

# The bundled vocab of each kind, and the file suffix each kind reads.
_DEFAULT_VOCAB = {"wordpiece": "bert_chinese_vocab.txt", "clip_bpe": "bpe_simple_vocab_16e6.txt.gz"}
_VOCAB_SUFFIX = {"wordpiece": ".txt", "clip_bpe": ".gz", "sentencepiece": ".model"}


@dataclass(frozen=True)
class TokenizerConfig:
    """How prompts become ids (see ``pangu_draw_ms.tokenizers.build_tokenizer``).

    ``vocab``: the vocab file of ``kind`` (WordPiece ``vocab.txt``, CLIP merges ``.txt.gz``,
    SentencePiece ``.model``); a bare file name is looked up in the package's bundled vocab folder
    ``pangu_draw_ms/tokenizers/data``. Empty = the bundled vocab of ``kind`` (wordpiece:
    ``bert_chinese_vocab.txt``, clip_bpe: ``bpe_simple_vocab_16e6.txt.gz``; sentencepiece has none).
    ``lowercase`` and ``jieba`` (Chinese word segmentation, sentencepiece only) must match how a
    SentencePiece model was trained. ``pad_with_end_token``: CLIP BPE padded with ``<|endoftext|>`` as
    transformers' CLIPTokenizer does (Stable Diffusion 1.x) instead of open_clip's 0.
    """

    kind: TokenizerKind = "clip_bpe"
    vocab: str = ""
    max_length: int = 77
    lowercase: bool = True
    jieba: bool = False
    pad_with_end_token: bool = False

    def __post_init__(self):
        _check(self.kind in _VOCAB_SUFFIX, f"tokenizer.kind {self.kind!r} is not valid; choose one of "
               f"{sorted(_VOCAB_SUFFIX)}")
        if not self.vocab:
            _check(self.kind in _DEFAULT_VOCAB, f"tokenizer.vocab: kind {self.kind!r} has no bundled vocab; give the "
                   "path of a trained .model file (pangu_draw_ms.tokenizers.train makes one)")
            object.__setattr__(self, "vocab", _DEFAULT_VOCAB[self.kind])
        suffix = _VOCAB_SUFFIX[self.kind]
        _check(self.vocab.endswith(suffix), f"tokenizer.vocab {self.vocab!r} is not a {self.kind} vocab: expected a "
               f"*{suffix} file" + (f" such as the bundled {_DEFAULT_VOCAB[self.kind]!r}" if self.kind in _DEFAULT_VOCAB
                                    else ""))
        _check(self.max_length >= 2, "tokenizer.max_length must be >= 2 (start and end tokens)")
        _check(not self.jieba or self.kind == "sentencepiece",
               f"tokenizer.jieba segments Chinese for kind 'sentencepiece' only, not {self.kind!r}")
        _check(not self.pad_with_end_token or self.kind == "clip_bpe",
               "tokenizer.pad_with_end_token (Stable Diffusion 1.x padding) applies to kind 'clip_bpe' only, "
               f"not {self.kind!r}")


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer: HF CLIPTextModel semantics, OpenCLIP weights map onto it.

    ``output_layer``: ``last`` = last block then final LayerNorm (HF ``last_hidden_state``),
    ``penultimate`` = output of the second-to-last block, no final LayerNorm (OpenCLIP/SDXL).
    ``projection_dim``: width of ``text_projection``, applied to the pooled feature (final-LN hidden at
    the EOT token); ``None`` = no projection, the pooled output is that feature itself (HF
    ``pooler_output``). ``eot_token_id``: ``None`` finds the EOT token as the argmax id (CLIP BPE, where
    EOT is the largest id), else the first position holding that id.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 77
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    output_layer: Literal["last", "penultimate"] = "last"
    projection_dim: Optional[int] = None
    eot_token_id: Optional[int] = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self):
        _check(
            self.hidden_size % self.num_heads == 0,
            f"text encoder: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}",
        )
        # Literal types are enforced when loading YAML; direct construction is checked here.
        _check(self.hidden_act in ("quick_gelu", "gelu"),
               f"text encoder: hidden_act {self.hidden_act!r} is not valid; choose 'quick_gelu' or 'gelu'")
        _check(self.output_layer in ("last", "penultimate"),
               f"text encoder: output_layer {self.output_layer!r} is not valid; choose 'last' or 'penultimate'")
        _check(self.projection_dim is None or self.projection_dim >= 1,
               f"text encoder: projection_dim {self.projection_dim} must be >= 1, or null for no text_projection")
        _check(
            self.eot_token_id is None or 0 <= self.eot_token_id < self.vocab_size,
            f"text encoder: eot_token_id {self.eot_token_id} is not an id of the {self.vocab_size}-token vocabulary; "
            "give an id in [0, vocab_size) or null (the EOT token is the largest id in each row)",
        )
        _check(
            self.num_layers >= (2 if self.output_layer == "penultimate" else 1),
            "text encoder: output_layer 'penultimate' needs at least 2 layers",
        )
        _check(
            self.tokenizer.max_length <= self.max_position_embeddings,
            f"text encoder: tokenizer.max_length {self.tokenizer.max_length} exceeds "
            f"max_position_embeddings {self.max_position_embeddings}",
        )


@dataclass(frozen=True)
class VisionEncoderConfig:
    """A CLIP vision transformer with a projection: HF ``CLIPVisionModelWithProjection`` semantics.

    The image is cut into ``patch_size`` squares (a strided convolution), a learned class token is put
    in front, and the class token's output, final-LayerNormed and projected to ``projection_dim``, is the
    image embedding. Defaults: the ViT-L/14 image encoder of SD image variations (lambdalabs
    ``sd-image-variations-diffusers``), whose 768-wide embedding conditions an SD1.5-architecture UNet.
    """

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    def __post_init__(self):
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "projection_dim"):
            _check(getattr(self, name) >= 1, f"vision encoder: {name} must be >= 1, got {getattr(self, name)}")
        below = max(1, self.image_size // self.patch_size) * self.patch_size
        _check(
            self.image_size % self.patch_size == 0,
            f"vision encoder: image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
            f"the patches must tile the image (e.g. image_size {below} or {below + self.patch_size})",
        )
        _check(
            self.hidden_size % self.num_heads == 0,
            f"vision encoder: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}",
        )
        _check(self.hidden_act in ("quick_gelu", "gelu"),
               f"vision encoder: hidden_act {self.hidden_act!r} is not valid; choose 'quick_gelu' or 'gelu'")
        _check(self.layer_norm_eps > 0, f"vision encoder: layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return self.num_patches + 1


@dataclass(frozen=True)
class CLIPConfig:
    """A CLIP model: a text tower and an image tower that embed into one space (Radford et al. 2021).

    The demo world's evaluator (``configs/demo_clip.yaml``, trained by stage ``clip``) is one: its text tower
    reads the demo's bilingual SentencePiece tokens, its image tower sees the whole image squashed to
    ``vision.image_size`` squared. Both projections must have the same width.
    """

    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(projection_dim=512))
    vision: VisionEncoderConfig = field(default_factory=lambda: VisionEncoderConfig(projection_dim=512))

    def __post_init__(self):
        _check(self.text.projection_dim == self.vision.projection_dim,
               f"CLIP: text.projection_dim {self.text.projection_dim} and vision.projection_dim "
               f"{self.vision.projection_dim} must be equal (both towers embed into one space)")


@dataclass(frozen=True)
class ConditionerConfig:
    """Both text encoders run on the same prompt; their cross-attention features are concatenated on
    the feature axis (in this order), and the vector is pooled text || sinusoidal(bucket index)."""

    encoders: Tuple[TextEncoderConfig, ...] = ()
    pooled_from: int = 1
    bucket_embed_dim: int = 256

    def __post_init__(self):
        _check(len(self.encoders) >= 1, "conditioner.encoders must list at least one text encoder")
        _check(
            0 <= self.pooled_from < len(self.encoders),
            f"conditioner.pooled_from {self.pooled_from} is not an index into the "
            f"{len(self.encoders)} encoders",
        )
        _check(
            self.encoders[self.pooled_from].projection_dim is not None,
            f"conditioner.pooled_from names encoder {self.pooled_from}, which has no projection_dim; "
            "the vector takes the projected pooled text of an encoder with a text_projection",
        )
        _check(self.bucket_embed_dim % 2 == 0, "conditioner.bucket_embed_dim must be even (cos || sin)")
        lengths = {e.tokenizer.max_length for e in self.encoders}
        _check(len(lengths) == 1, f"conditioner: all encoders must use one sequence length, got {sorted(lengths)}")

    @property
    def context_dim(self) -> int:
        return sum(e.hidden_size for e in self.encoders)

    @property
    def vector_dim(self) -> int:
        return self.encoders[self.pooled_from].projection_dim + self.bucket_embed_dim


# Dense layers of the UNet's transformer blocks a LoRA adapter (models/lora.py) can go on, by group, named as in
# diffusers/sgm: the attention projections (LoRA's paper adapts W_q and W_v; SDXL LoRAs adapt all four), the
# feed-forward (GEGLU in, out) and the linear proj_in/out around each transformer.
LORA_TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "feed_forward": ("ff.net.0.proj", "ff.net.2"),
    "projection": ("proj_in", "proj_out"),
}


# The samplers of diffusion/samplers.py by name (configs name them; the registry there must hold exactly these).
SamplerName = Literal["euler", "heun", "euler_ancestral", "ddim", "dpmpp_2m"]
SAMPLER_NAMES: Tuple[str, ...] = typing.get_args(SamplerName)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling defaults of the pipeline and ``tools/infer.py`` (each can be overridden per call).

    The released PanGu-Draw 3.0: Euler (EDM form), 40 steps, the sgm timestep spacing, guidance 6.0 and
    aesthetic style guidance 4.0, experts switched by the release rule (see diffusion/experts.py).
    """

    num_inference_steps: int = 40
    sampler: str = "euler"             # one of SAMPLER_NAMES (checked below, with the valid names)
    spacing: Literal["release", "leading", "trailing", "linspace"] = "release"
    guidance_scale: float = 6.0
    aesthetic_scale: float = 0.0
    anime_scale: float = 0.0
    photography_scale: float = 0.0
    switch_rule: Literal["exact", "release"] = "exact"
    negative_prompt: str = ""

    def __post_init__(self):
        _check(self.num_inference_steps >= 1, "sampling.num_inference_steps must be >= 1")
        _check(self.sampler in SAMPLER_NAMES,
               f"sampling.sampler {self.sampler!r} is not valid; choose one of {sorted(SAMPLER_NAMES)}")
        for name in ("guidance_scale", "aesthetic_scale", "anime_scale", "photography_scale"):
            _check(getattr(self, name) >= 0, f"sampling.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def style_scales(self) -> dict:
        return {"aesthetic": self.aesthetic_scale, "anime": self.anime_scale, "photography": self.photography_scale}


@dataclass(frozen=True)
class PanGuDrawConfig:
    """The whole model: one UNet architecture used twice (structure and texture generators), the
    VAE and the conditioner. ``t_struct``: the structure generator denoises t >= t_struct.

    ``structure_buckets`` / ``texture_buckets``: the (H, W) resolution buckets of each generator, in
    index order (default: the paper's Table 7); sampling uses the structure table.
    """

    name: str = "pangu_draw_v3"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    t_struct: int = 500
    num_train_timesteps: int = 1000
    structure_buckets: Tuple[Tuple[int, ...], ...] = TABLE7_STRUCTURE
    texture_buckets: Tuple[Tuple[int, ...], ...] = TABLE7_TEXTURE
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        _check(
            self.unet.context_dim == self.conditioner.context_dim,
            f"unet.context_dim {self.unet.context_dim} must equal the sum of the text encoders' hidden "
            f"sizes ({self.conditioner.context_dim})",
        )
        _check(
            self.unet.adm_in_channels == self.conditioner.vector_dim,
            f"unet.adm_in_channels {self.unet.adm_in_channels} must equal pooled width + bucket_embed_dim "
            f"({self.conditioner.vector_dim})",
        )
        _check(
            self.unet.in_channels == self.vae.latent_channels,
            f"unet.in_channels {self.unet.in_channels} must equal vae.latent_channels {self.vae.latent_channels}",
        )
        _check(
            0 < self.t_struct < self.num_train_timesteps,
            f"t_struct {self.t_struct} must lie in (0, {self.num_train_timesteps})",
        )
        multiple = self.vae.downsample_factor * 2 ** (len(self.unet.channel_mult) - 1)
        for name in ("structure_buckets", "texture_buckets"):
            table = getattr(self, name)
            _check(len(table) >= 1, f"{name} must list at least one (height, width) bucket")
            for size in table:
                _check(
                    len(size) == 2 and all(v > 0 and v % multiple == 0 for v in size),
                    f"{name}: {list(size)} is not a (height, width) pair of positive multiples of {multiple} "
                    "(VAE downsampling x UNet downsampling)",
                )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        _check(value in args, f"{where}: {value!r} is not valid; choose one of {list(args)}")
        return value
    if origin in (tuple, Tuple):
        _check(isinstance(value, (list, tuple)), f"{where}: expected a list, got {type(value).__name__}")
        item_type = args[0] if args else Any
        return tuple(_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        _check(isinstance(value, bool), f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{where}: expected a number, got {value!r}"
        )
        return float(value)
    if tp is str:
        _check(isinstance(value, str), f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: Type[T], data: Any, where: Optional[str] = None) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    where = where or cls.__name__
    if isinstance(data, cls):
        return data
    _check(isinstance(data, dict), f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    _check(not unknown, f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(config: Any) -> dict:
    """Plain-data form of a config (lists for tuples), suitable for YAML/JSON."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def resolve_config_path(name_or_path: str) -> str:
    """A YAML path, or the name of a bundled config in ``configs/`` (``tiny``, ``pangu_draw_v3``)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    candidate = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.isfile(candidate):
        return candidate
    if name_or_path.endswith((".yaml", ".yml")):
        raise ConfigError(f"{name_or_path}: no such file")
    bundled = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")) if os.path.isdir(CONFIG_DIR) else []
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a bundled config; bundled: {bundled}")


def _vocab_beside(data: Any, folder: str) -> None:
    """Point relative tokenizer vocab paths of a PanGuDrawConfig or CLIPConfig mapping that name a file in
    ``folder`` (the YAML's own folder) at that file: a model directory's config names its trained
    SentencePiece model by file name and works from any working directory."""
    data = data if isinstance(data, dict) else {}
    encoders = list((data.get("conditioner") or {}).get("encoders") or []) + [data.get("text") or {}]
    for encoder in encoders:
        tokenizer = encoder.get("tokenizer") if isinstance(encoder, dict) else None
        vocab = tokenizer.get("vocab") if isinstance(tokenizer, dict) else None
        if (isinstance(vocab, str) and vocab and not os.path.isabs(vocab)
                and os.path.isfile(os.path.join(folder, vocab))):
            tokenizer["vocab"] = os.path.join(folder, vocab)


def read_yaml(path: str) -> Any:
    """The data of a YAML file; a malformed one raises :class:`ConfigError` as ``<file>: line N: <what>``, a
    file that is not UTF-8 text likewise."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "malformed"
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: {where}: {what} (not valid YAML)") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); a config is a YAML text "
                          "file") from None


def load_config(name_or_path: str, cls: Type[T] = PanGuDrawConfig) -> T:
    """Load a YAML config file (or a bundled config by name) into dataclass ``cls``.

    A PanGuDrawConfig's or CLIPConfig's tokenizer vocab given as a path relative to the YAML's folder is
    resolved there.
    """
    path = resolve_config_path(name_or_path)
    data = read_yaml(path)
    if cls in (PanGuDrawConfig, CLIPConfig):
        _vocab_beside(data, os.path.dirname(os.path.abspath(path)))
    return from_dict(cls, data, where=os.path.basename(path))


# --------------------------------------------------------------------------------------------
# Coop-Diffusion recipes
# --------------------------------------------------------------------------------------------

PartnerKind = Literal["pangu", "diffusers", "controlnet", "image_variation"]


@dataclass(frozen=True)
class PartnerConfig:
    """One partner model of a Coop-Diffusion run (Algorithm 1's model B).

    kind ``pangu``: a PanGu-Draw model directory (``path``) or, for tests and smoke runs, a bundled config
    name (``config``) with seeded random weights. ``diffusers``: a diffusers text-to-image folder of the
    Stable Diffusion 1.x family (``unet/``, ``vae/``, ``text_encoder/``). ``controlnet``: ControlNet weights
    (``path``, any layout we load) attached to ``base`` (``main`` or a partner's name), driven by
    ``control_image``. ``image_variation``: a diffusers image-variation folder (``image_encoder/``,
    ``unet/``, ``vae/``) conditioned on ``image``.

    ``weight`` is d_i; the partner is fused for ``t_min <= t <= t_max``. ``height``/``width``: its native
    pixel size (default: the main image's size for ``pangu`` and ControlNets on ``main``, else 512).
    ``prompt``: its own prompt (default: the main prompt). ``resize_mode``: pixel resampling between the
    two latent spaces when their sizes differ. ``bucket_list`` (``pangu``): the bucket list its size is one
    of - ``texture`` runs a PanGu model at its lower-resolution list (the same bucket conditioning, index-
    aligned by aspect ratio), e.g. as the low-resolution model of a resolution bridge.
    """

    name: str
    kind: PartnerKind
    path: str = ""
    config: str = ""
    base: str = "main"
    height: Optional[int] = None
    width: Optional[int] = None
    prompt: Optional[str] = None
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    weight: float = 0.5
    t_min: int = 0
    t_max: int = 999
    control_image: str = ""
    control_scale: float = 1.0
    guess_mode: bool = False
    image: str = ""
    resize_mode: Literal["bicubic", "bilinear", "nearest", "area"] = "bicubic"
    bucket_list: Literal["structure", "texture"] = "structure"

    def __post_init__(self):
        where = f"partner {self.name!r}"
        _check(bool(self.name) and self.name != "main", f"{where}: a partner needs a name other than 'main'")
        _check(0.0 <= self.weight <= 1.0, f"{where}: weight (d) must be in [0, 1], got {self.weight}")
        _check(0 <= self.t_min <= self.t_max, f"{where}: need 0 <= t_min <= t_max, got {self.t_min}..{self.t_max}")
        _check(self.guidance_scale >= 0, f"{where}: guidance_scale must be >= 0")
        _check((self.height is None) == (self.width is None), f"{where}: give both height and width, or neither")
        if self.kind == "pangu":
            _check(bool(self.path) != bool(self.config), f"{where}: kind pangu needs either path (a model directory) "
                   "or config (a bundled config name, seeded random weights)")
        elif self.kind in ("diffusers", "image_variation", "controlnet"):
            _check(bool(self.path), f"{where}: kind {self.kind} needs path (the model's folder or file)")
        if self.kind == "controlnet":
            _check(bool(self.control_image), f"{where}: a controlnet partner needs control_image")
        if self.kind == "image_variation":
            _check(bool(self.image), f"{where}: an image_variation partner needs image (the reference picture)")


@dataclass(frozen=True)
class ResolutionBridgeConfig:
    """Sub-module 2: one model denoises from T down to the switch timestep ``t_low``; its x0 is decoded,
    resized in pixel space (``upsample``: the resize mode), encoded by the other model's VAE and re-noised
    with fresh noise; the other model continues to 0. ``order``: ``partner_first`` (the paper's default: a
    low-resolution ``partner`` first, then the main model at the requested size) or ``main_first`` (the
    paper's "vice versa": the main model first, then ``partner``, whose VAE decodes the image at its own
    size). ``latent_bilinear`` is the paper's Fig. 3 baseline (bilinear resizing of the noisy latent; one
    latent space only)."""

    partner: str
    t_low: int = 500
    upsample: Literal["bicubic", "bilinear", "nearest", "area", "latent_bilinear"] = "bicubic"
    order: Literal["partner_first", "main_first"] = "partner_first"

    def __post_init__(self):
        _check(0 < self.t_low < 1000, f"resolution_bridge.t_low must lie in (0, 1000), got {self.t_low}")


@dataclass(frozen=True)
class CoopRecipe:
    """A Coop-Diffusion run: partners fused by sub-module 1 and/or a sub-module 2 resolution bridge."""

    partners: Tuple[PartnerConfig, ...] = ()
    resolution_bridge: Optional[ResolutionBridgeConfig] = None

    def __post_init__(self):
        names = [p.name for p in self.partners]
        _check(len(set(names)) == len(names), f"recipe: partner names must be unique, got {names}")
        _check(bool(self.partners), "recipe: name at least one partner")
        for p in self.partners:
            if p.kind == "controlnet":
                bases = ["main"] + [q.name for q in self.partners if q.kind in ("pangu", "diffusers")]
                _check(p.base in bases, f"partner {p.name!r}: base {p.base!r} is not 'main' or a pangu/diffusers "
                       f"partner; valid: {bases}")
        if self.resolution_bridge is not None:
            _check(self.resolution_bridge.partner in names, f"resolution_bridge.partner "
                   f"{self.resolution_bridge.partner!r} is not a partner of the recipe; valid: {names}")
