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
import json
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
from ..io.lora import LoRALayer, write_lora
from ..io.model_dir import COMPONENT_FILES, save_component, with_scaling_factor, write_config, write_model_config
from ..io.state import load_parameters, load_state
from ..models.controlnet import ControlNet
from ..models.lora import add_lora_adapters, lora_parameters
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
    #: The stage trains the VAE or in its latent space (every stage but ``clip`` and the prompt stages).
    uses_vae = True
    #: The stage reads text pairs (:meth:`prompt_pairs`, :meth:`pair_stream`) instead of images.
    reads_prompt_pairs = False

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

    def _saved_parameters(self, name: str) -> Dict[str, Parameter]:
        """The parameters of trained network ``name`` a training checkpoint holds: all of them."""
        return {p.name: p for p in self.cells[name].get_parameters()}

    def checkpoint_state(self, name: str) -> Dict[str, np.ndarray]:
        """What a training checkpoint holds of trained network ``name`` (copies)."""
        return {key: p.asnumpy().copy() for key, p in self._saved_parameters(name).items()}

    def load_checkpoint_state(self, name: str, state: Mapping[str, np.ndarray], what: str) -> None:
        """Put :meth:`checkpoint_state`'s tensors back (strict: every saved parameter, nothing else)."""
        load_parameters(self._saved_parameters(name), state, what=what, owner=f"network {name!r}")

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


class LoRAStage(GeneratorStage):
    """Stage ``lora``: low-rank adapters (Hu et al. 2021) on the frozen ``lora.generator`` (``init.unet``),
    trained with eq. (2) on that generator's timestep range and bucket list - the paper's time split applies to
    adapters as to whole generators. Only the adapters train: the optimizer, its moments, the EMA and the
    checkpoints hold them alone. Exports ``<generator>_lora.safetensors`` in ``lora.layout``."""

    def __init__(self, config: TrainConfig, model_config: PanGuDrawConfig, dtype, is_main: bool = True):
        super().__init__(config, model_config, dtype, is_main)
        adapters = {id(p) for p in lora_parameters(self.adapters)}
        for param in self.cells["unet"].get_parameters():
            param.requires_grad = id(param) in adapters
        if is_main:
            total = sum(int(np.prod(p.shape)) for p in self.cells["unet"].get_parameters())
            logger.info("lora: %d adapted layers, %d trainable parameters (%.3f %% of the UNet's %d)",
                        len(self.adapters), self.num_trainable, 100.0 * self.num_trainable / total, total)

    def _build_networks(self) -> None:
        super()._build_networks()
        settings = self.config.lora
        self.adapters = add_lora_adapters(self.cells["unet"], settings.targets, settings.rank, settings.alpha,
                                          settings.dropout)

    @property
    def num_trainable(self) -> int:
        return sum(int(np.prod(p.shape)) for p in lora_parameters(self.adapters))

    def _saved_parameters(self, name: str) -> Dict[str, Parameter]:
        return {p.name: p for p in lora_parameters(self.adapters)}

    def lora_layers(self, state: Mapping[str, np.ndarray]) -> Dict[str, LoRALayer]:
        """``{adapted layer: LoRALayer}`` of the adapter tensors in ``state`` (e.g. the EMA weights)."""
        return {name: LoRALayer(np.asarray(state[f"{name}.lora_down"], np.float32),
                                np.asarray(state[f"{name}.lora_up"], np.float32), adapter.alpha)
                for name, adapter in self.adapters.items()}

    def export(self, directory: str, states: Mapping[str, Mapping[str, np.ndarray]],
               latent_std: Callable[[], float]) -> Dict[str, object]:
        """``<generator>_lora.safetensors`` (the adapters' EMA weights when EMA is on) in ``lora.layout``, into
        ``directory``: a LoRA folder, which ``--lora DIR`` reads (each file into its generator)."""
        settings = self.config.lora
        path = os.path.join(directory, f"{settings.generator}_lora.safetensors")
        metadata = {"generator": settings.generator, "rank": str(settings.rank), "alpha": str(settings.alpha),
                    "targets": ",".join(settings.targets), "t_range": json.dumps(list(self.t_range)),
                    "base_model": os.path.basename(self.config.init.unet)}
        write_lora(path, self.lora_layers(states["unet"]), self.model_config.unet, settings.layout, metadata)
        return {"lora": path, "trainable_parameters": self.num_trainable}


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


class PromptSFTStage(TrainingStage):
    """Stage ``prompt_sft``: the prompt enhancer's LLM (mindformers' LLaMA, :mod:`pangu_draw_ms.prompting`)
    fine-tuned on (short -> enriched) prompt pairs with the next-token loss on the enriched half (the paper
    supplement's supervised step on human-annotated pairs). ``prompt.enhancer`` is the directory it starts from
    or the architecture of a new one; the pairs are ``data.manifest``. Exports an enhancer directory
    (config.yaml, enhancer.safetensors, tokenizer.model) that ``tools/infer.py --enhancer-dir`` reads."""

    uses_vae = False
    reads_prompt_pairs = True

    def _build_networks(self) -> None:
        from ..prompting.enhancer import build_enhancer

        self.enhancer = build_enhancer(self.config.prompt.enhancer)
        self.cells["enhancer"] = self.enhancer.model

    def _trained_networks(self) -> List[str]:
        return ["enhancer"]

    def prompt_pairs(self, phase: int, rank: int, world: int) -> List[Dict[str, str]]:
        """The pairs the steps from ``phase`` on train on: the manifest's, in ``data.languages``."""
        return self._read_pairs(self.config.data.manifest)

    def _read_pairs(self, path: str) -> List[Dict[str, str]]:
        """The pairs of ``path`` in ``data.languages`` that fit the enhancer's context (the others are left out,
        with a warning)."""
        from ..prompting.data import fitting_pairs, read_pairs

        pairs, dropped = fitting_pairs(read_pairs(path, self.config.data.languages), self.enhancer.tokenizer,
                                       self.enhancer.config.max_length)
        if dropped and self.is_main:
            logger.warning("%s: %d pair(s) longer than the enhancer's %d tokens left out", path, dropped,
                           self.enhancer.config.max_length)
        return pairs

    def pair_stream(self, pairs: Sequence[Dict[str, str]], plan, rank: int, batch_size: int):
        """This worker's micro-batches of ``pairs`` (tokenised rows and loss masks) in ``plan``'s order."""
        from ..prompting.data import PairStream

        return PairStream(pairs, self.enhancer.tokenizer, self.enhancer.config.max_length, plan, rank, batch_size)

    def inputs(self, batch: Mapping[str, np.ndarray], rngs: Sequence[np.random.Generator]) -> StepInputs:
        return (Tensor(batch["ids"]), Tensor(batch["loss_mask"])), np.zeros(0, np.int64)

    def loss_fn(self) -> Callable:
        model = self.cells["enhancer"]

        def loss(ids, loss_mask):
            return model(ids, loss_mask=loss_mask).reshape(())  # mindformers returns shape (1,)

        return loss

    def export(self, directory: str, states: Mapping[str, Mapping[str, np.ndarray]],
               latent_std: Callable[[], float]) -> Dict[str, object]:
        from ..prompting.enhancer import save_enhancer

        return save_enhancer(directory, self.enhancer.config, states["enhancer"], self.config.export_dtype)


class PromptRAFTStage(PromptSFTStage):
    """Stage ``prompt_raft``: the enhancer refined by RAFT (reward-ranked fine-tuning, Dong et al. 2023), the paper
    supplement's second step. Each round (:meth:`TrainConfig.phases`) first expands ``prompt.prompts_per_round``
    short prompts of the manifest ``prompt.candidates`` times, draws every expansion with the image model
    ``model``, scores it (aesthetic + CLIP-score against the short prompt, :class:`~pangu_draw_ms.prompting.raft.
    ImageReward`) and keeps each prompt's best expansion; the round's steps train on those pairs. Under msrun each
    worker expands and draws one slice of the prompts. The rounds' files (``output_dir/raft/round_R.jsonl``: the
    kept pairs with every candidate and reward) make a resumed run train on the same pairs."""

    def prompt_pairs(self, phase: int, rank: int, world: int) -> List[Dict[str, str]]:
        from ..prompting import raft
        from ..prompting.data import read_pairs
        from .trainer import barrier

        settings, directory = self.config.prompt, os.path.join(self.config.output_dir, "raft")
        round_index = self.config.phases().index(phase)
        mine, merged = raft.round_files(directory, round_index, rank)
        if not os.path.isfile(merged):
            prompts = raft.round_prompts(read_pairs(self.config.data.manifest, self.config.data.languages),
                                         settings.prompts_per_round, self.config.seed, round_index)
            first, last = len(prompts) * rank // world, len(prompts) * (rank + 1) // world
            if not os.path.isfile(mine):
                model = self.cells["enhancer"]
                model.set_train(False)
                candidates, rewards = raft.score_candidates(self.enhancer, prompts[first:last], first, settings,
                                                            self.config.seed, self._reward())
                model.set_train(True)
                raft.write_jsonl(mine, raft.best_pairs(prompts[first:last], candidates, rewards))
            barrier(world)
            if rank == 0:
                rows = [row for w in range(world) for row in raft.read_jsonl(raft.round_files(directory, round_index,
                                                                                              w)[0])]
                raft.write_jsonl(merged, rows)
                logger.info("RAFT round %d: %d prompts, mean reward of the kept expansions %.3f (of all %.3f)",
                            round_index, len(rows), np.mean([r["reward"] for r in rows]),
                            np.mean([x for r in rows for x in r["rewards"]]))
            barrier(world)
        return self._read_pairs(merged)

    def _build_networks(self) -> None:
        super()._build_networks()
        self.image_reward = None  # built by the first round that draws (a resumed run may need none)

    def _reward(self):
        """The reward of drawn expansions (built once): the image model, the CLIP and the aesthetic scorer."""
        if self.image_reward is None:
            from ..prompting.raft import ImageReward

            self.image_reward = ImageReward.for_model(self.config.model, self.config.prompt, self.config.seed)
        return self.image_reward


#: ``config.stage`` -> the class that trains it.
STAGE_CLASSES = {"vae": VAEStage, "structure": GeneratorStage, "texture": GeneratorStage,
                 "full_range": GeneratorStage, "controlnet": ControlNetStage, "lora": LoRAStage, "clip": CLIPStage,
                 "prompt_sft": PromptSFTStage, "prompt_raft": PromptRAFTStage}


def build_stage(config: TrainConfig, model_config: PanGuDrawConfig, dtype, is_main: bool = True) -> TrainingStage:
    """The stage object of ``config.stage``, its networks built (and loaded from ``config.init``)."""
    stage_class = STAGE_CLASSES.get(config.stage)
    if stage_class is None:
        raise ValueError(f"unknown training stage {config.stage!r}; valid: {', '.join(STAGE_CLASSES)}")
    return stage_class(config, model_config, dtype, is_main)
