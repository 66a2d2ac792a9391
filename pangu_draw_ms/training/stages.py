"""The stages of PanGu-Draw's training recipe, one class each.

PanGu-Draw trains its two generators time-decoupled (paper sec. 3.1): the structure generator on
t in [t_struct, T) at the structure (higher-resolution) buckets, the texture generator on t in [0, t_struct)
at the texture buckets, each a full denoiser of its own range, in the latent space of one VAE. A
ControlNet then learns to steer one frozen generator. The stages differ in what they build, feed and
optimise, and a stage object owns exactly that:

* its networks, built by the component factory inference uses
  (:func:`pangu_draw_ms.io.layouts.build_component`), and which of them train;
* its timestep range and bucket list (from the model config, :class:`~pangu_draw_ms.training.config.TrainConfig`);
* what a batch becomes for the compiled step (:meth:`TrainingStage.inputs`) and the loss over it;
* the component files its trained networks are exported as.

:class:`pangu_draw_ms.training.trainer.Trainer` runs any stage; a new stage is one new class in
:data:`STAGE_CLASSES`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn

from ..config import CLIPConfig, ControlNetConfig, PanGuDrawConfig, TokenizerConfig, load_config
from ..diffusion.schedule import NoiseSchedule
from ..images import edge_map, to_pil
from ..io.checkpoint import save_checkpoint
from ..io.layouts import build_component, load_component
from ..io.model_dir import COMPONENT_FILES, save_component, with_scaling_factor, write_config, write_model_config
from ..io.state import load_state
from ..models.controlnet import ControlNet
from ..models.unet import UNetModel
from .config import TrainConfig
from .losses import clip_contrastive_loss, diffusion_loss, vae_loss

logger = logging.getLogger("pangu_draw_ms.train")

# What a stage's step consumes: input tensors, and the timesteps they use (empty for a stage without).
StepInputs = Tuple[tuple, np.ndarray]


def _compiled(function: Callable) -> Callable:
    """``function`` compiled with ``ms.jit`` in GRAPH_MODE; run eagerly in PYNATIVE_MODE."""
    return ms.jit(function) if ms.get_context("mode") == ms.GRAPH_MODE else function


class TrainingStage:
    """One stage's networks, inputs, loss and export names (see the module docstring).

    Every stage holds the VAE (``cells["vae"]``, from ``init.vae`` when given): it trains it or trains in
    its latent space. Subclasses add their networks in :meth:`_build_networks` and name the trained ones in
    :meth:`_trained_networks`; every other network is frozen (eval mode, no gradients).
    """

    #: [low, high) of the uniformly sampled training timesteps; None for a stage that trains no denoiser.
    t_range: Optional[Tuple[int, int]] = None
    #: The batches carry captions: token ids, or their text features where those are cached.
    captioned = False
    #: The VAE is frozen, so an image's posterior never changes and ``data.cache_dir`` may hold it.
    frozen_vae = False
    #: The stage trains the VAE or in its latent space (every stage but ``clip``).
    uses_vae = True

    def __init__(self, config: TrainConfig, model_config: PanGuDrawConfig, dtype, is_main: bool = True):
        self.config, self.model_config, self.dtype, self.is_main = config, model_config, dtype, is_main
        self.cells: Dict[str, nn.Cell] = {}
        vae = self._build("vae", model_config.vae, config.init.vae) if self.uses_vae else None
        self._build_networks()
        self.trainable: List[str] = self._trained_networks()
        # Frozen components a stage was given are copied into the export directory.
        self.sources: Dict[str, str] = {name: path for name, path in (("vae", config.init.vae),
                                                                      ("conditioner", config.init.conditioner))
                                        if path and name in self.cells}
        for name, cell in self.cells.items():
            is_trained = name in self.trainable
            cell.set_train(is_trained)
            for param in cell.get_parameters():
                param.requires_grad = is_trained

        if vae is not None:
            def encode_images(pixels):
                return vae.encode(pixels)

            self.encode_images = _compiled(encode_images)

    @property
    def frozen_text(self) -> bool:
        """The text encoders are frozen, so a caption's features never change and the cache may hold them."""
        return self.captioned and not self.config.train_text_encoders

    def _build(self, name: str, section, weights: str) -> nn.Cell:
        """Network ``name`` of architecture ``section``, built as inference builds it, loaded from ``weights``
        when given (else seeded random)."""
        cell = self.cells[name] = build_component(name, section, self.dtype)
        if weights:
            load_component(cell, weights, name)
            if self.is_main:
                logger.info("%s: loaded %s", name, weights)
        return cell

    def _build_networks(self) -> None:
        """Build the networks besides the VAE into ``self.cells``."""

    def tokenizer_configs(self) -> List[TokenizerConfig]:
        """The tokenizers of a captioned stage's batches (``ids_<k>``): the model's text encoders'."""
        return [encoder.tokenizer for encoder in self.model_config.conditioner.encoders]

    def _trained_networks(self) -> List[str]:
        raise NotImplementedError

    def trainable_params(self) -> List[Parameter]:
        return [p for name in self.trainable for p in self.cells[name].trainable_params()]

    def _latent_shape(self, batch: Mapping[str, np.ndarray]) -> Tuple[int, ...]:
        """(C, h, w) of a sample's latent: from the batch's pixels, or from its cached posteriors."""
        vae, images = self.model_config.vae, batch.get("pixels")
        if images is None:
            return (vae.latent_channels,) + batch["latents"].shape[2:]
        f = vae.downsample_factor
        return vae.latent_channels, images.shape[2] // f, images.shape[3] // f

    def inputs(self, batch: Mapping[str, np.ndarray], rngs: Sequence[np.random.Generator]) -> StepInputs:
        """The step's input tensors for ``batch`` (``rngs``: one keyed generator per sample, drawn from in a
        fixed order), and the timesteps they use."""
        raise NotImplementedError

    def loss_fn(self) -> Callable:
        """The loss of the step's inputs, as a function of tensors (traced into the compiled gradient graph)."""
        raise NotImplementedError

    def component_files(self, name: str) -> List[str]:
        """The model-directory components the trained network ``name`` is exported as."""
        return [name]

    def export(self, directory: str, states: Mapping[str, Mapping[str, np.ndarray]],
               latent_std: Callable[[], float]) -> Dict[str, object]:
        """Write the trained ``states`` (``{network: exported weights}``) into the model directory ``directory``
        as :meth:`component_files`, copy in the frozen components it lacks, and write ``config.yaml`` as
        :meth:`export_config` says; returns what was written and measured."""
        model_config, measured = self.export_config(states, latent_std)
        written = dict(measured)
        for name, state in states.items():
            for component in self.component_files(name):
                written[component] = save_component(directory, component, state, model_config,
                                                    self.config.export_dtype, self.t_range,
                                                    getattr(self.cells[name], "config", None))
        for name, source in self.sources.items():
            if name not in self.trainable:
                target = os.path.join(directory, COMPONENT_FILES[name])
                if not os.path.exists(target):
                    shutil.copyfile(source, target)
                    written[name] = target
        write_model_config(directory, model_config)
        return written

    def export_config(self, states: Mapping[str, Mapping[str, np.ndarray]],
                      latent_std: Callable[[], float]) -> Tuple[PanGuDrawConfig, dict]:
        """The model config exported with the trained ``states`` (``{network: exported weights}``), and what
        was measured for it; ``latent_std`` measures the VAE's latent standard deviation on the training images."""
        return self.model_config, {}


class VAEStage(TrainingStage):
    """Stage ``vae``: the autoencoder (L1 + MSE + KL on a posterior sample's reconstruction), on every image
    at its structure bucket. ``train_vae_encoder: false`` fine-tunes only the decoder of ``init.vae``, so the
    latent space the generators were trained in stays."""

    def __init__(self, config: TrainConfig, model_config: PanGuDrawConfig, dtype, is_main: bool = True):
        super().__init__(config, model_config, dtype, is_main)
        if not config.train_vae_encoder:
            vae = self.cells["vae"]
            for param in list(vae.encoder.get_parameters()) + list(vae.quant_conv.get_parameters()):
                param.requires_grad = False

    def _trained_networks(self) -> List[str]:
        return ["vae"]

    def inputs(self, batch: Mapping[str, np.ndarray], rngs: Sequence[np.random.Generator]) -> StepInputs:
        latent_shape = self._latent_shape(batch)
        noise = np.stack([r.standard_normal(latent_shape, dtype=np.float32) for r in rngs])
        return (Tensor(batch["pixels"]), Tensor(noise)), np.zeros(0, np.int64)

    def loss_fn(self) -> Callable:
        vae, weights = self.cells["vae"], self.config.vae_loss

        def loss(pixels, noise):
            return vae_loss(vae, pixels, noise, weights)

        return loss

    def export_config(self, states: Mapping[str, Mapping[str, np.ndarray]],
                      latent_std: Callable[[], float]) -> Tuple[PanGuDrawConfig, dict]:
        """With the encoder trained, the latent space is new: ``vae.scaling_factor`` becomes 1 / the latent
        std of the exported (EMA) weights, so the generators see unit-variance latents. A decoder fine-tune
        keeps the latent space, and with it the scaling factor of ``init.vae``."""
        if not self.config.train_vae_encoder:
            return self.model_config, {}
        load_state(self.cells["vae"], states["vae"], what="EMA weights")
        std = latent_std()
        return with_scaling_factor(self.model_config, 1.0 / std), {"latent_std": std}


class GeneratorStage(TrainingStage):
    """Stages ``structure``, ``texture`` and ``full_range``: a generator UNet trained with PanGu-Draw eq. (2)
    on the timestep range and bucket list of its role (time-decoupled training, sec. 3.1; ``full_range`` is
    the single-model baseline over all of [0, T)), in the latent space of the frozen ``init.vae``, with the
    text encoders frozen (``init.conditioner``) or trained along (``train_text_encoders``)."""

    captioned = frozen_vae = True
    #: The component files a trained UNet is exported as: the full-range baseline serves as both generators.
    UNET_FILES = {"structure": ["structure_unet"], "texture": ["texture_unet"],
                  "full_range": ["structure_unet", "texture_unet"]}

    def __init__(self, config: TrainConfig, model_config: PanGuDrawConfig, dtype, is_main: bool = True):
        super().__init__(config, model_config, dtype, is_main)
        self.t_range = config.timestep_range(model_config)
        self.schedule = NoiseSchedule(model_config.num_train_timesteps)
        conditioner = self.cells["conditioner"]

        def encode_text(bucket, *ids):
            return conditioner(ids, bucket)

        self.encode_text = _compiled(encode_text)

    def _build_networks(self) -> None:
        config, model, init = self.config, self.model_config, self.config.init
        if not init.vae:
            raise ValueError(f"stage {config.stage!r} trains in the latent space of a trained VAE: set init.vae "
                             "to its vae.safetensors (stage 'vae' makes one)")
        unet = self._build("unet", model.unet, init.unet)
        self._build("conditioner", model.conditioner, init.conditioner)
        if not init.conditioner and not config.train_text_encoders:
            raise ValueError("the text encoders are frozen (train_text_encoders: false) but init.conditioner names "
                             "no weights; give a conditioner.safetensors or set train_text_encoders: true")
        if config.recompute:
            for block in list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks):
                block.recompute()

    def _trained_networks(self) -> List[str]:
        return ["unet"] + (["conditioner"] if self.config.train_text_encoders else [])

    def _control_images(self, images: np.ndarray) -> tuple:
        """The step inputs a stage derives from the batch's images (-1..1) besides their latents: none."""
        return ()

    def inputs(self, batch: Mapping[str, np.ndarray], rngs: Sequence[np.random.Generator]) -> StepInputs:
        """``(z0, noise, t, alpha_bar_t, bucket) + control images + text``, where text is the token ids when
        the text encoders train, else the (cached or computed) features ``(context, vector)``."""
        images, vae = batch.get("pixels"), self.model_config.vae
        latent_shape = self._latent_shape(batch)
        low, high = self.t_range
        timesteps = np.array([r.integers(low, high) for r in rngs], np.int64)
        noise = np.stack([r.standard_normal(latent_shape, dtype=np.float32) for r in rngs])
        posterior_noise = np.stack([r.standard_normal(latent_shape, dtype=np.float32) for r in rngs])
        if images is None:
            mean, logvar = np.split(batch["latents"].astype(np.float32), 2, axis=1)
        else:
            mean, logvar = (x.asnumpy() for x in self.encode_images(Tensor(images)))
        z0 = (vae.scaling_factor * (mean + np.exp(0.5 * logvar) * posterior_noise)).astype(np.float32)
        alpha_bar = self.schedule.alphas_cumprod[timesteps].astype(np.float32).reshape(-1, 1, 1, 1)
        bucket = Tensor(batch["bucket_index"])
        ids = [Tensor(batch[f"ids_{k}"]) for k in range(len(self.model_config.conditioner.encoders))] \
            if "ids_0" in batch else []
        if self.config.train_text_encoders:
            text = tuple(ids)
        elif "context" in batch:
            text = (Tensor(batch["context"]), Tensor(batch["vector"]))
        else:
            text = tuple(self.encode_text(bucket, *ids))
        inputs = (Tensor(z0), Tensor(noise), Tensor(timesteps.astype(np.float32)), Tensor(alpha_bar), bucket) \
            + self._control_images(images) + text
        return inputs, timesteps

    def loss_fn(self) -> Callable:
        unet, conditioner = self.cells["unet"], self.cells["conditioner"]
        if self.config.train_text_encoders:
            def loss(z0, noise, timesteps, alpha_bar, bucket, *ids):
                context, vector = conditioner(ids, bucket)
                return diffusion_loss(unet, z0, noise, timesteps, alpha_bar, context, vector)
        else:
            def loss(z0, noise, timesteps, alpha_bar, bucket, context, vector):
                return diffusion_loss(unet, z0, noise, timesteps, alpha_bar, context, vector)
        return loss

    def component_files(self, name: str) -> List[str]:
        return self.UNET_FILES[self.config.stage] if name == "unet" else [name]


class ControlNetStage(GeneratorStage):
    """Stage ``controlnet``: a ControlNet steering the frozen ``controlnet.base`` generator (``init.unet``),
    on that generator's timestep range and buckets, the control image made from each training image. It
    starts as a copy of the generator's encoder, middle block and embeddings with zero convs (ControlNet,
    Zhang et al. 2023, sec. 3.2), so training starts from the unchanged generator."""

    def _build_networks(self) -> None:
        super()._build_networks()
        self.cells["controlnet"] = self._controlnet_copying(self.cells["unet"])
        # The gradient graph holds both networks and needs unique parameter names; the frozen
        # generator is neither saved nor exported, so its names may change.
        self.cells["unet"].update_parameters_name("frozen_generator.")

    def _controlnet_copying(self, unet: UNetModel) -> ControlNet:
        """A ControlNet for ``unet`` whose encoder, middle block and embeddings start as copies of the
        generator's (ControlNet sec. 3.2); its zero convs make it a no-op until it learns."""
        settings, vae = self.config.controlnet, self.model_config.vae
        config = ControlNetConfig(unet=self.model_config.unet, conditioning_channels=3,
                                  hint_channels=tuple(settings.hint_channels))
        if config.hint_downsample_factor != vae.downsample_factor:
            raise ValueError(f"controlnet.hint_channels {list(settings.hint_channels)} downsample the control image "
                             f"{config.hint_downsample_factor}x but the VAE downsamples {vae.downsample_factor}x: give "
                             f"{int(np.log2(vae.downsample_factor)) + 1} widths")
        controlnet = build_component("controlnet", config, self.dtype)
        generator = {p.name: p for p in unet.get_parameters()}
        params = list(controlnet.get_parameters())
        copied = 0
        for param in params:
            source = generator.get(param.name)
            if source is not None and source.shape == param.shape:
                param.set_data(source.value().copy())
                copied += 1
        if self.is_main:
            logger.info("controlnet: %d of %d tensors copied from the %s generator", copied,
                        len(params), settings.base)
        return controlnet

    def _trained_networks(self) -> List[str]:
        return ["controlnet"]

    def _control_images(self, images: np.ndarray) -> tuple:
        """The control image of each training image (``controlnet.control: edges``)."""
        return (Tensor(edge_map((images + 1.0) / 2.0)),)

    def loss_fn(self) -> Callable:
        unet, controlnet = self.cells["unet"], self.cells["controlnet"]

        def loss(z0, noise, timesteps, alpha_bar, bucket, hint, context, vector):
            return diffusion_loss(unet, z0, noise, timesteps, alpha_bar, context, vector, controlnet, hint)

        return loss

    def component_files(self, name: str) -> List[str]:
        return [f"{self.config.controlnet.base}_controlnet"]


class CLIPStage(TrainingStage):
    """Stage ``clip``: a CLIP (the :class:`~pangu_draw_ms.config.CLIPConfig` named by ``config.clip``) trained
    with CLIP's contrastive objective on the image-caption pairs, each sample captioned in one of
    ``data.languages`` per epoch so that its one text tower learns both (the paper's sec. 5 pre-trains its
    Chinese text encoder contrastively; this is that step in miniature, and the demo world's evaluator).
    Images come at their bucket and are squashed to the image tower's square, as the evaluator sees them.
    Exports ``clip.safetensors``, ``config.yaml`` (the CLIPConfig) and the tokenizer's vocabulary file."""

    captioned = True
    uses_vae = False

    def _build_networks(self) -> None:
        from ..evaluation.demo import DemoCLIP

        self.clip_config = load_config(self.config.clip, CLIPConfig)
        self.cells["clip"] = DemoCLIP(self.clip_config)

    def _trained_networks(self) -> List[str]:
        return ["clip"]

    def tokenizer_configs(self) -> List[TokenizerConfig]:
        return [self.clip_config.text.tokenizer]

    def inputs(self, batch: Mapping[str, np.ndarray], rngs: Sequence[np.random.Generator]) -> StepInputs:
        """``(pixels at the image tower's size, token ids, same_caption)``; ``same_caption[i, j]``: samples i and
        j carry the same token ids (the demo world repeats short captions), both positives of each other."""
        pixels = self.cells["clip"].preprocess(to_pil(batch["pixels"]))
        ids = batch["ids_0"]
        same_caption = (ids[:, None, :] == ids[None, :, :]).all(axis=-1).astype(np.float32)
        return (Tensor(pixels), Tensor(ids), Tensor(same_caption)), np.zeros(0, np.int64)

    def loss_fn(self) -> Callable:
        clip = self.cells["clip"]

        def loss(pixels, ids, same_caption):
            return clip_contrastive_loss(clip.vision_model(pixels)[1], clip.text_model(ids)[1], clip.logit_scale,
                                         same_caption)

        return loss

    def export(self, directory: str, states: Mapping[str, Mapping[str, np.ndarray]],
               latent_std: Callable[[], float]) -> Dict[str, object]:
        """``clip.safetensors`` (floats in ``export_dtype``), ``config.yaml`` naming the vocabulary beside it,
        and that vocabulary file: a folder :func:`~pangu_draw_ms.evaluation.demo.load_demo_clip` reads."""
        from ..evaluation.demo import CLIP_CONFIG, CLIP_WEIGHTS

        weights_path = os.path.join(directory, CLIP_WEIGHTS)
        save_checkpoint(dict(states["clip"]), weights_path, dtype=self.config.export_dtype,
                        metadata={"component": "clip"})
        vocab = self.clip_config.text.tokenizer.vocab
        config = self.clip_config
        if vocab and os.path.isfile(vocab):
            target = os.path.join(directory, os.path.basename(vocab))
            if os.path.abspath(vocab) != os.path.abspath(target):
                shutil.copyfile(vocab, target)
            tokenizer = dataclasses.replace(config.text.tokenizer, vocab=os.path.basename(vocab))
            config = dataclasses.replace(config, text=dataclasses.replace(config.text, tokenizer=tokenizer))
        config_path = os.path.join(directory, CLIP_CONFIG)
        write_config(config, config_path)
        return {"clip": weights_path, "config": config_path}


#: ``config.stage`` -> the class that trains it.
STAGE_CLASSES = {"vae": VAEStage, "structure": GeneratorStage, "texture": GeneratorStage,
                 "full_range": GeneratorStage, "controlnet": ControlNetStage, "clip": CLIPStage}


def build_stage(config: TrainConfig, model_config: PanGuDrawConfig, dtype, is_main: bool = True) -> TrainingStage:
    """The stage object of ``config.stage``, its networks built (and loaded from ``config.init``)."""
    stage_class = STAGE_CLASSES.get(config.stage)
    if stage_class is None:
        raise ValueError(f"unknown training stage {config.stage!r}; valid: {', '.join(STAGE_CLASSES)}")
    return stage_class(config, model_config, dtype, is_main)
