"""Typed training configuration (``configs/train/*.yaml``), validated on construction like the model configs.

A training run trains ONE stage of PanGu-Draw's recipe:

* ``vae``: the autoencoder, on every image at its structure bucket;
* ``structure``: the structure generator, t uniform in [t_struct, T), the structure bucket list, all
  images (those smaller than their bucket upscaled into it - the paper's data-efficiency point);
* ``texture``: the texture generator, t uniform in [0, t_struct), the texture (lower-resolution) bucket
  list, only images at least as large as their bucket;
* ``full_range``: the single-model baseline, t uniform in [0, T), the structure bucket list;
* ``controlnet``: a ControlNet for a frozen trained generator (``controlnet.base``), on that generator's
  timestep range and bucket list, the control image made from each training image (``controlnet.control``).
* ``lora``: LoRA adapters on one frozen trained generator (``lora.generator``), on that generator's timestep
  range and bucket list: the time split applies to adapters too; only the adapters train and are saved.
* ``clip``: a CLIP (the :class:`~pangu_draw_ms.config.CLIPConfig` named by ``clip``) trained contrastively on
  the image-caption pairs: the demo world's evaluator, and in miniature the paper's sec. 5 step of
  pre-training a Chinese text encoder with a contrastive objective.
* ``prompt_sft``: the prompt enhancer's LLM (``prompt``, :class:`~pangu_draw_ms.prompting.config.PromptTrainConfig`)
  fine-tuned on (short -> enriched) prompt pairs, the paper supplement's first step; ``prompt_raft``: then refined
  by RAFT rounds (expansions drawn by the image model, scored by an aesthetic scorer and a CLIP, the best kept).

``t_struct``, T and the bucket lists come from the model config; :attr:`TrainConfig.timestep_range`
turns the stage into its range. The paper's ablations (Tables 4-6) are options of these stages:
``t_struct`` moves the split for both generators (Table 6), ``bucket_list`` trains a generator at the other
resolution (Table 5: the texture generator at the structure resolution), ``data.upscale_small_images:
false`` keeps only the images at least as large as their bucket (Table 5: "only high-resolution" data),
and ``resolution_boost_step`` makes stage ``full_range`` the Resolution Boost baseline (Table 4): the
low-resolution bucket list first, then the high-resolution one, over the whole timestep range.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import List, Literal, Optional, Tuple

import yaml

from ..config import LORA_TARGETS, PanGuDrawConfig, _check, from_dict, read_yaml, resolve_config_path
from ..prompting.config import PromptTrainConfig

Stage = Literal["vae", "structure", "texture", "full_range", "controlnet", "lora", "clip", "prompt_sft", "prompt_raft"]
STAGES = ("vae", "structure", "texture", "full_range", "controlnet", "lora", "clip", "prompt_sft", "prompt_raft")
CONTROLS = ("edges",)
Precision = Literal["auto", "fp32", "fp16", "bf16"]
BucketList = Literal["default", "structure", "texture"]
CAPTION_LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class DataConfig:
    """Image-text pairs: a JSONL or CSV manifest with columns ``image`` (path, relative to ``root``),
    ``caption_en``, ``caption_zh`` (at least one non-empty) and optionally ``height``/``width``.

    ``root``: folder of the image paths ("" = the manifest's folder). ``batch_size``: samples per worker
    and micro-step. ``num_workers``: parallel decode threads (<= cores). Each sample uses, per epoch, a
    caption of one of ``languages`` picked at random, replaced by "" with probability ``uncond_prob``
    (classifier-free guidance). ``upscale_small_images``: images smaller than their bucket are upscaled
    into it (true) or left out of this stage (false). ``cache_dir``: latents (frozen VAE) and text
    features (frozen text encoders) are computed once and read from there ("" = computed every step).
    """

    manifest: str = ""
    root: str = ""
    batch_size: int = 4
    num_workers: int = 2
    languages: Tuple[str, ...] = CAPTION_LANGUAGES
    uncond_prob: float = 0.1
    upscale_small_images: bool = True
    cache_dir: str = ""

    def __post_init__(self):
        _check(bool(self.manifest), "data.manifest must name a .jsonl or .csv manifest file")
        _check(self.manifest.endswith((".jsonl", ".csv")),
               f"data.manifest {self.manifest!r} must be a .jsonl or .csv file")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 1, f"data.num_workers must be >= 1, got {self.num_workers}")
        _check(len(self.languages) >= 1 and all(lang in CAPTION_LANGUAGES for lang in self.languages),
               f"data.languages {list(self.languages)} must be a non-empty subset of {list(CAPTION_LANGUAGES)}")
        _check(0.0 <= self.uncond_prob < 1.0, f"data.uncond_prob must be in [0, 1), got {self.uncond_prob}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (decoupled weight decay on matrices only) with linear warmup then cosine decay to
    ``min_lr_ratio * learning_rate``; gradients clipped to global norm ``max_grad_norm`` (0 = off) after
    ``grad_accumulation`` micro-steps; an exponential moving average of the weights with ``ema_decay``
    (0 = off; the exported weights are the EMA when it is on)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    grad_accumulation: int = 1
    ema_decay: float = 0.999

    def __post_init__(self):
        _check(self.learning_rate > 0, f"optim.learning_rate must be > 0, got {self.learning_rate}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
        _check(self.eps > 0, "optim.eps must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm must be >= 0 (0 turns clipping off)")
        _check(self.grad_accumulation >= 1, f"optim.grad_accumulation must be >= 1, got {self.grad_accumulation}")
        _check(0 <= self.ema_decay < 1, f"optim.ema_decay must be in [0, 1) (0 turns EMA off), got {self.ema_decay}")


@dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling (used when the compute precision is fp16): the scale starts at ``initial``,
    is divided by ``factor`` on an overflow (that step is skipped) and multiplied by it after ``window``
    finite steps."""

    initial: float = 65536.0
    factor: int = 2
    window: int = 1000

    def __post_init__(self):
        _check(self.initial >= 1, "loss_scale.initial must be >= 1")
        _check(self.factor >= 2, "loss_scale.factor must be an integer >= 2")
        _check(self.window >= 1, "loss_scale.window must be >= 1")


@dataclass(frozen=True)
class VAELossConfig:
    """Autoencoder loss: mean |x - x_rec| + ``mse_weight`` mean (x - x_rec)^2 + ``kl_weight`` KL(q(z|x) || N(0, I))
    (the KL summed over latent elements and averaged over the batch). The reconstruction terms are means
    over pixels, where LDM sums them: LDM's kl_weight 1e-6 corresponds here to about 1e-6 / (3 H W), and a
    much larger weight keeps the posterior noisy (the demo VAE at 1e-6 lost the colours of its images)."""

    mse_weight: float = 1.0
    kl_weight: float = 1e-8

    def __post_init__(self):
        _check(self.mse_weight >= 0 and self.kl_weight >= 0, "vae_loss weights must be >= 0")


@dataclass(frozen=True)
class ControlNetTrainConfig:
    """Stage ``controlnet``: the ControlNet steers the frozen ``base`` generator (``init.unet``: its weights)
    and trains on that generator's timestep range and buckets; it starts as a copy of the generator's
    encoder (Zhang et al. 2023, sec. 3.2) with zero convs, so training starts from the unchanged generator.
    ``control``: the control image made from each training image - ``edges`` (white outlines on black,
    :func:`pangu_draw_ms.images.edge_map`). ``hint_channels``: widths of the control
    image's conv stack; ``len - 1`` stride-2 convs must equal the VAE's downsampling."""

    base: Literal["structure", "texture"] = "structure"
    control: str = "edges"
    hint_channels: Tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self):
        _check(self.base in ("structure", "texture"),
               f"controlnet.base must be 'structure' or 'texture', got {self.base!r}")
        _check(self.control in CONTROLS,
               f"controlnet.control {self.control!r} is not valid; choose one of {list(CONTROLS)}")
        _check(len(self.hint_channels) >= 1 and all(c >= 1 for c in self.hint_channels),
               f"controlnet.hint_channels must list widths >= 1, got {list(self.hint_channels)}")


@dataclass(frozen=True)
class LoRATrainConfig:
    """Stage ``lora``: low-rank adapters (Hu et al. 2021) on the dense layers ``targets`` (groups of
    :data:`pangu_draw_ms.config.LORA_TARGETS`: attention, feed_forward, projection) of the frozen
    ``generator`` (``init.unet``: its weights), trained on that generator's timestep range and bucket list; the
    update is (``alpha`` / ``rank``) B A, with dropout ``dropout`` on its input. The export writes
    ``<generator>_lora.safetensors`` in ``layout`` (``diffusers`` or ``kohya``), which ``tools/infer.py
    --lora-<generator>`` (or ``--lora DIR`` for a folder of both) and diffusers' ``load_lora_weights`` read."""

    generator: Literal["structure", "texture"] = "structure"
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = ("attention",)
    layout: Literal["diffusers", "kohya"] = "diffusers"

    def __post_init__(self):
        _check(self.generator in ("structure", "texture"),
               f"lora.generator must be 'structure' or 'texture', got {self.generator!r}")
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.targets) >= 1 and all(t in LORA_TARGETS for t in self.targets),
               f"lora.targets {list(self.targets)} must be a non-empty list of {list(LORA_TARGETS)}")
        _check(self.layout in ("diffusers", "kohya"),
               f"lora.layout must be 'diffusers' or 'kohya', got {self.layout!r}")


@dataclass(frozen=True)
class InitConfig:
    """Weights to start from (safetensors with our parameter names, as in a model directory). Frozen
    components must be given: the diffusion stages need ``vae``, and ``conditioner`` unless the text
    encoders are trained; stage ``controlnet`` needs ``unet`` (the generator it steers) and ``conditioner``.
    A trainable component without a file starts from random weights."""

    vae: str = ""
    conditioner: str = ""
    unet: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``model``: a model YAML (or bundled config name) or a model directory holding
    ``config.yaml``. ``steps``: optimizer steps. ``export_dir``: model directory the trained weights (the
    EMA when it is on, floats in ``export_dtype``) are written into at the end, with ``config.yaml`` (see
    ``pangu_draw_ms.io.model_dir``). ``precision``: compute dtype (``auto``: fp16 on Ascend, fp32 on
    CPU; fp16 turns dynamic loss scaling on). ``recompute``: recompute each UNet block's activations in the
    backward pass (less memory, more compute). ``train_vae_encoder``: stage ``vae`` trains the whole
    autoencoder; ``false`` fine-tunes only the decoder (and post_quant_conv) of ``init.vae``, so the latent
    space and its scaling factor stay those the generators were trained in (the "ft-MSE" decoder
    fine-tune of Stable Diffusion's VAE). ``clip``: stage ``clip``'s architecture, a CLIPConfig YAML or bundled
    name (``model`` then only gives the bucket list the images are read at).

    ``t_struct``: the split point instead of the model config's (the exported ``config.yaml`` records it, so
    the pipeline switches generators there too). ``bucket_list``: ``default`` trains the texture generator at
    the texture list and everything else at the structure list; ``structure``/``texture`` choose a list.
    ``resolution_boost_step`` (stage ``full_range`` only, 0 = off): steps [0, N) train at the texture
    (low-resolution) list, steps [N, steps) at the structure list - the paper's Resolution Boost."""

    model: str = "tiny"
    stage: Stage = "structure"
    output_dir: str = "outputs/train"
    steps: int = 100
    seed: int = 0
    precision: Precision = "auto"
    recompute: bool = False
    train_text_encoders: bool = False
    train_vae_encoder: bool = True
    data: DataConfig = field(default_factory=lambda: DataConfig(manifest="data/train.jsonl"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)
    init: InitConfig = field(default_factory=InitConfig)
    controlnet: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)
    lora: LoRATrainConfig = field(default_factory=LoRATrainConfig)
    clip: str = "demo_clip"
    prompt: PromptTrainConfig = field(default_factory=PromptTrainConfig)
    t_struct: Optional[int] = None
    bucket_list: BucketList = "default"
    resolution_boost_step: int = 0
    export_dir: str = ""
    export_dtype: Literal["fp32", "fp16"] = "fp32"
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self):
        _check(self.stage in STAGES, f"stage {self.stage!r} is not valid; choose one of {list(STAGES)}")
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.log_every >= 1, "log_every must be >= 1")
        _check(self.save_every >= 0, "save_every must be >= 0 (0: save only at the end)")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        _check(not (self.train_text_encoders and self.stage == "vae"),
               "train_text_encoders applies to the diffusion stages, not to stage 'vae'")
        if not self.train_vae_encoder:
            _check(self.stage == "vae", "train_vae_encoder: false fine-tunes a VAE's decoder; it applies to "
                   f"stage 'vae' only, not to stage {self.stage!r}")
            _check(bool(self.init.vae), "train_vae_encoder: false fine-tunes the decoder of a trained VAE: set "
                   "init.vae to its vae.safetensors")
        if self.stage == "controlnet":
            _check(bool(self.init.unet) and bool(self.init.conditioner) and bool(self.init.vae),
                   "stage 'controlnet' steers a trained generator: set init.unet (its structure_unet or "
                   "texture_unet.safetensors), init.conditioner and init.vae")
            _check(not self.train_text_encoders, "stage 'controlnet' keeps the text encoders frozen: "
                   "set train_text_encoders: false")
            _check(not self.data.cache_dir, "stage 'controlnet' makes its control images from the decoded "
                   "training images every step: leave data.cache_dir empty")
        if self.stage == "lora":
            _check(bool(self.init.unet) and bool(self.init.conditioner) and bool(self.init.vae),
                   f"stage 'lora' adapts a trained generator: set init.unet (its {self.lora.generator}_unet"
                   ".safetensors), init.conditioner and init.vae")
            _check(not self.train_text_encoders, "stage 'lora' trains adapters on the UNet only; the text encoders "
                   "stay frozen: set train_text_encoders: false")
        if self.stage == "clip":
            _check(self.data.uncond_prob == 0, "stage 'clip' learns image-caption pairs; an empty caption pairs "
                   f"with nothing: set data.uncond_prob: 0 (got {self.data.uncond_prob})")
            _check(not self.data.cache_dir and not self.train_text_encoders,
                   "stage 'clip' trains both of its towers on decoded images and token ids: leave data.cache_dir "
                   "empty and train_text_encoders false (they name the generator's text encoders)")
        if self.stage == "prompt_raft":
            _check(self.steps >= self.prompt.rounds, f"stage 'prompt_raft' runs prompt.rounds={self.prompt.rounds} "
                   f"rounds of steps / rounds optimizer steps each: steps must be >= the rounds, got {self.steps}")

        if self.t_struct is not None:
            _check(self.stage in ("structure", "texture", "controlnet", "lora"),
                   f"t_struct splits the timesteps between the generators; stage {self.stage!r} does not use it")
        if self.resolution_boost_step:
            _check(self.stage == "full_range", "resolution_boost_step applies to stage 'full_range' (the Resolution "
                   f"Boost baseline), not to stage {self.stage!r}")
            _check(0 < self.resolution_boost_step < self.steps,
                   f"resolution_boost_step must lie in (0, steps={self.steps}), got {self.resolution_boost_step}")
            _check(self.bucket_list == "default", "resolution_boost_step chooses the bucket lists itself (texture, "
                   f"then structure); leave bucket_list at 'default' (got {self.bucket_list!r})")

    def model_config(self, model: PanGuDrawConfig) -> PanGuDrawConfig:
        """The model config this run trains and exports: ``model`` with ``t_struct`` applied."""
        return model if self.t_struct is None else replace(model, t_struct=self.t_struct)

    @property
    def generator_role(self) -> str:
        """Whose timestep range and buckets the stage trains on: the stage's own, or for a ControlNet or LoRA
        the generator it steers or adapts."""
        return {"controlnet": self.controlnet.base, "lora": self.lora.generator}.get(self.stage, self.stage)

    def timestep_range(self, model: PanGuDrawConfig) -> Tuple[int, int]:
        """[low, high) of the uniformly sampled training timesteps of a diffusion stage (a ControlNet or LoRA
        trains on its generator's range)."""
        return {"structure": (model.t_struct, model.num_train_timesteps),
                "texture": (0, model.t_struct),
                "full_range": (0, model.num_train_timesteps)}[self.generator_role]

    def buckets(self, model: PanGuDrawConfig, step: int = 0) -> Tuple[Tuple[int, ...], ...]:
        """The (H, W) bucket list this stage trains at from optimizer step ``step`` on: by default the texture
        list for ``texture`` (and a ControlNet or LoRA of the texture generator), else the structure list;
        ``bucket_list`` chooses one; with Resolution Boost the texture list before ``resolution_boost_step``."""
        if self.resolution_boost_step:
            return model.texture_buckets if step < self.resolution_boost_step else model.structure_buckets
        if self.bucket_list != "default":
            return getattr(model, f"{self.bucket_list}_buckets")
        return model.texture_buckets if self.generator_role == "texture" else model.structure_buckets

    def phases(self) -> List[int]:
        """The first optimizer step of each run of steps with one bucket list: [0], or [0, N] with Resolution
        Boost; for ``prompt_raft`` the first step of each RAFT round (each round reads the pairs it generated)."""
        if self.stage == "prompt_raft":
            return [r * self.steps // self.prompt.rounds for r in range(self.prompt.rounds)]
        return [0, self.resolution_boost_step] if self.resolution_boost_step else [0]


def _parse_value(text: str):
    """A YAML value, with numbers YAML 1.1 leaves as strings ("3e-3") read as numbers."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def load_train_config(path: str, overrides: Tuple[str, ...] = ()) -> TrainConfig:
    """A training YAML, with ``key.sub=value`` overrides (values parsed as YAML: ``steps=10``)."""
    path = resolve_config_path(path)
    data = read_yaml(path) or {}
    _check(isinstance(data, dict), f"{path}: a training config is a mapping of keys (stage, steps, data, ...), "
                                   f"got {type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        _check(bool(sep) and bool(key), f"override {item!r} is not of the form key=value (e.g. steps=10)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return from_dict(TrainConfig, data, where=os.path.basename(path))
