"""Text-to-image and image-to-image with time-decoupled sampling (PanGu-Draw sec. 3.1).

One run: encode the prompts, the negative prompt and any style-prefixed prompts once; pick the
resolution bucket and its index; draw the initial noise per image from the seed; denoise with the
structure generator for t >= T_struct and the texture generator below (classifier-free + style guidance
batched into one UNet call per step); decode with the VAE.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import mindspore as ms
import numpy as np
from PIL import Image

from ..buckets import BucketTable
from ..config import PanGuDrawConfig
from ..diffusion.compiled import CompiledDenoiser, step_denoiser
from ..diffusion.coop import CoopDenoiser
from ..diffusion.denoiser import Conditioning, ControlInput, UNetEpsModel
from ..diffusion.experts import STRUCTURE, TEXTURE, SingleModel, TimeDecoupledExperts
from ..diffusion.guidance import STYLE_PREFIXES, GuidedDenoiser, guidance_branches, guidance_weights
from ..diffusion.samplers import NonFiniteLatentsError, Sampler, StepCallback, make_sampler
from ..diffusion.schedule import CLEAN, NoiseSchedule, add_noise
from ..images import load_image, resize, to_array, to_pil
from ..io.lora import lora_files
from ..models.layers import default_precision
from ..tokenizers import build_tokenizer
from .components import ComponentStore
from .prompt_encoder import PromptEncoder
from .requests import RequestError, check_noise, check_prompts, check_settings, load_init_image

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, int, str], None]  # (step index, num steps, t, expert)


@dataclass
class PipelineOutput:
    images: List[Image.Image]
    latents: np.ndarray                       # (B, C, h, w) final latents (scaled, as the UNet sees them)
    info: Dict = field(default_factory=dict)  # settings, bucket, expert trace, timings


@dataclass
class Run:
    """One request, resolved against the config's defaults and checked (:meth:`PanGuDrawPipeline.plan`)."""

    prompts: List[str]
    negative_prompt: str
    sampler: Sampler
    spacing: str
    num_inference_steps: int
    timesteps: np.ndarray
    guidance_weights: Dict[str, float]
    guidance_scale: float
    style_scales: Dict[str, float]
    guidance_rescale: float
    t_struct: int
    switch_rule: str
    single_model: Optional[str]
    seed: int
    num_images_per_prompt: int
    first_image_index: int
    bucket_index: int
    height: int
    width: int
    strength: Optional[float]
    latent_shape: tuple
    precision: str  # the UNets' compute precision (named when the latents overflow)

    def sampler_rng(self) -> Optional[np.random.Generator]:
        """The stochastic samplers' noise stream, apart from the initial-noise streams (seed, k)."""
        if not self.sampler.stochastic:
            return None
        return np.random.default_rng([self.seed, self.first_image_index, self.latent_shape[0], 1])

    def sample(self, denoise, z: np.ndarray, timesteps=None, callback: Optional[StepCallback] = None,
               final_timestep: int = CLEAN) -> np.ndarray:
        """The run's sampler through ``timesteps`` (default: the run's) with the run's noise stream; latents that
        become NaN/inf stop the run with an error naming the step and the settings most likely at fault."""
        try:
            return self.sampler.sample(denoise, z, self.timesteps if timesteps is None else timesteps,
                                       rng=self.sampler_rng(), callback=callback, final_timestep=final_timestep)
        except NonFiniteLatentsError as error:
            raise error.naming(self.suspects()) from None

    def suspects(self) -> str:
        """The settings that make latents overflow, with this run's values: a guidance (or style) scale far
        above the usual 1-15, guidance rescale, a half-precision compute dtype."""
        styles = "".join(f", {style} scale {scale:g}" for style, scale in self.style_scales.items())
        precision = f"precision {self.precision}" + (" (try fp32)" if self.precision != "fp32" else "")
        return (f"guidance_scale {self.guidance_scale:g} (usual: 1-15){styles}, guidance_rescale "
                f"{self.guidance_rescale:g}, {precision}")

    def info(self) -> Dict:
        return {"prompts": self.prompts, "negative_prompt": self.negative_prompt, "height": self.height,
                "width": self.width, "bucket_index": self.bucket_index, "num_inference_steps": self.num_inference_steps,
                "timesteps": [int(t) for t in self.timesteps], "sampler": self.sampler.name, "spacing": self.spacing,
                "guidance_scale": self.guidance_scale, "style_scales": self.style_scales,
                "guidance_rescale": self.guidance_rescale, "t_struct": self.t_struct, "switch_rule": self.switch_rule,
                "single_model": self.single_model, "seed": self.seed,
                "num_images_per_prompt": self.num_images_per_prompt,
                "strength": self.strength}


# Images per VAE decode call: as many as hold at most this many pixels - one 1024 x 1024 image, what a decode of one
# full-size image needs anyway (the decoder's full-resolution activations dominate its memory). The demo's four
# 64 x 64 images decode in one call: 14 ms instead of 22 ms one at a time (bench/README.md).
DECODE_PIXELS = 1024 * 1024


def decode_in_batches(vae, latents: np.ndarray) -> np.ndarray:
    """Latents -> images in [-1, 1] by ``vae`` (``decode_latents``), as many per call as hold :data:`DECODE_PIXELS`
    pixels (at least one); each image is the one its own decode gives (tested)."""
    pixels = latents.shape[2] * latents.shape[3] * vae.downsample_factor ** 2
    per_call = max(1, DECODE_PIXELS // pixels)
    return np.concatenate([vae.decode_latents(ms.Tensor(latents[i:i + per_call].astype(np.float32))).asnumpy()
                           for i in range(0, latents.shape[0], per_call)])


class PanGuDrawPipeline:
    """PanGu-Draw text-to-image / image-to-image.

    Build with :meth:`from_pretrained` (a model directory), or :meth:`from_config` (seeded random
    weights, or a ``files`` dict ``{component: path}``). ``memory="sequential"`` keeps only the active
    network resident (see :mod:`pangu_draw_ms.pipelines.components`).
    """

    def __init__(self, components: ComponentStore):
        self.components = components
        self.config: PanGuDrawConfig = components.config
        self.schedule = NoiseSchedule(self.config.num_train_timesteps)
        self.buckets = BucketTable(f"{self.config.name} structure buckets", tuple(self.config.structure_buckets))
        self.texture_buckets = BucketTable(f"{self.config.name} texture buckets", tuple(self.config.texture_buckets))
        self._tokenizers = None
        self._step_graphs: Dict[tuple, object] = {}  # compiled sampling steps, reused by later runs

    @classmethod
    def from_pretrained(cls, model_dir: str, **kwargs) -> "PanGuDrawPipeline":
        return cls(ComponentStore.from_pretrained(model_dir, **kwargs))

    @classmethod
    def from_config(cls, config: PanGuDrawConfig, files: Optional[Dict[str, str]] = None,
                    **kwargs) -> "PanGuDrawPipeline":
        return cls(ComponentStore(config, dict(files or {}), **kwargs))

    # ---- pieces of a run ------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompt: str, styles: Sequence[str], bucket_index: int
               ) -> Dict[str, Conditioning]:
        """Conditioning of every guidance branch: "cond", "uncond" (the real encoding of the negative
        prompt), and one per active style (its prefix + the prompt, for both encoders)."""
        if self._tokenizers is None:  # the vocabularies are read once per pipeline
            self._tokenizers = [build_tokenizer(e.tokenizer) for e in self.config.conditioner.encoders]
        encoder = PromptEncoder(self.components.get("conditioner"), self._tokenizers)
        texts = list(prompts) + [negative_prompt] + [STYLE_PREFIXES[s] + p for s in styles for p in prompts]
        everything = encoder(texts, bucket_index)
        n = len(prompts)

        def rows(start, count):
            return Conditioning(everything.context[start:start + count], everything.vector[start:start + count])

        branches = {"cond": rows(0, n), "uncond": rows(n, 1)}
        branches["uncond"] = Conditioning(np.repeat(branches["uncond"].context, n, 0),
                                          np.repeat(branches["uncond"].vector, n, 0))
        for i, style in enumerate(styles):
            branches[style] = rows(n + 1 + i * n, n)
        self.components.done_with("conditioner")
        return branches

    def experts(self, t_struct: int, switch_rule: str, control: Optional[ControlInput] = None,
                on_release: Optional[Callable[[], None]] = None) -> TimeDecoupledExperts:
        """The structure/texture router; in sequential memory mode an expert is released when the run
        switches away from it, after ``on_release()`` (which drops what else holds it: compiled steps)."""
        def eps_model(name):
            return UNetEpsModel(self.components.get(name), control)

        def release(expert):
            if on_release is not None:
                on_release()
            self.components.done_with(names[expert])

        sequential = self.components.memory == "sequential"
        structure = (lambda: eps_model("structure_unet")) if sequential else eps_model("structure_unet")
        texture = (lambda: eps_model("texture_unet")) if sequential else eps_model("texture_unet")
        names = {STRUCTURE: "structure_unet", TEXTURE: "texture_unet"}
        return TimeDecoupledExperts(structure, texture, t_struct=t_struct, rule=switch_rule, sequential=sequential,
                                    on_release=release)

    def load_lora(self, path: str, scale: float = 1.0, generators: Sequence[str] = ("structure", "texture")) -> None:
        """Merge a UNet LoRA file (diffusers/PEFT or kohya layout, :mod:`pangu_draw_ms.io.lora`) at ``scale``
        into the ``generators`` ("structure", "texture" or both: a LoRA can follow the time split too), or a
        folder of ``<generator>_lora.safetensors`` files (what training stage ``lora`` exports), each into its
        own generator. Several LoRAs add up; :meth:`unload_loras` restores the original weights exactly."""
        unknown = sorted(set(generators) - {"structure", "texture"})
        if unknown or not generators:
            raise ValueError(f"generators must name 'structure' and/or 'texture', got {list(generators)}")
        for generator, file in lora_files(path, generators).items():
            self.components.add_lora(file, scale, [f"{generator}_unet"])

    def unload_loras(self) -> None:
        self.components.remove_loras()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> images in [-1, 1] with this pipeline's VAE (see :func:`decode_in_batches`)."""
        images = decode_in_batches(self.components.get("vae"), latents)
        self.components.done_with("vae")
        return images

    def encode_image(self, image, height: int, width: int) -> np.ndarray:
        vae = self.components.get("vae")
        pixels = to_array(resize(load_image(image, "init_image"), (height, width)))
        latents = vae.encode_to_latents(ms.Tensor(pixels)).asnumpy()
        return latents

    # ---- a run ----------------------------------------------------------------------------------
    def plan(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Optional[str] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        ratio: Optional[str] = None,
        snap_to_bucket: bool = False,
        num_inference_steps: Optional[int] = None,
        sampler: Optional[str] = None,
        spacing: Optional[str] = None,
        guidance_scale: Optional[float] = None,
        style_scales: Optional[Dict[str, float]] = None,
        guidance_rescale: float = 0.0,
        t_struct: Optional[int] = None,
        switch_rule: Optional[str] = None,
        single_model: Optional[str] = None,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        first_image_index: int = 0,
        sampler_options: Optional[dict] = None,
        strength: Optional[float] = None,
        bucket_list: str = "structure",
    ) -> Run:
        """Resolve a request against ``config.sampling``'s defaults and check it (see :meth:`__call__`): types
        and ranges first (:mod:`~pangu_draw_ms.pipelines.requests`), then what depends on the model."""
        # locals() here is exactly the keyword arguments: every one is checked, none can be forgotten.
        check_settings({name: value for name, value in locals().items() if name not in ("self", "prompt")})
        prompts = check_prompts(prompt)
        defaults = self.config.sampling
        t_struct = self.config.t_struct if t_struct is None else t_struct
        if t_struct > self.config.num_train_timesteps:
            raise RequestError(f"t_struct must lie in [0, {self.config.num_train_timesteps}], got {t_struct}",
                               argument="t_struct")
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        styles = dict(defaults.style_scales if style_scales is None else style_scales)
        weights = guidance_weights(guidance_scale, styles)
        steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        spacing = spacing or defaults.spacing
        timesteps = self.schedule.timesteps(steps, spacing)
        if strength is not None:
            timesteps = self.schedule.strength_timesteps(timesteps, strength)
        # The texture list is index-aligned with the structure list: its bucket index conditions the same way.
        table = self.buckets if bucket_list == "structure" else self.texture_buckets
        bucket_index, (h, w) = table.select(height, width, ratio, snap=snap_to_bucket)
        f = self.config.vae.downsample_factor
        return Run(
            prompts=prompts, negative_prompt=defaults.negative_prompt if negative_prompt is None else negative_prompt,
            sampler=make_sampler(sampler or defaults.sampler, self.schedule, **(sampler_options or {})),
            spacing=spacing, num_inference_steps=steps, timesteps=timesteps, guidance_weights=weights,
            guidance_scale=guidance_scale, style_scales={k: v for k, v in styles.items() if weights.get(k)},
            guidance_rescale=guidance_rescale, t_struct=t_struct, switch_rule=switch_rule or defaults.switch_rule,
            single_model=single_model, seed=seed, num_images_per_prompt=num_images_per_prompt,
            first_image_index=first_image_index, bucket_index=bucket_index, height=h, width=w, strength=strength,
            latent_shape=(len(prompts) * num_images_per_prompt, self.config.unet.in_channels, h // f, w // f),
            precision=self.components.precision or default_precision())

    def initial_noise(self, run: Run, noise: Optional[np.ndarray] = None) -> np.ndarray:
        """The run's initial noise: given, or image k's from the generator seeded (seed, first index + k)."""
        if noise is None:
            # One generator per image: image k of a run gets the same noise whatever the batch around it.
            noise = np.stack([np.random.default_rng([run.seed, run.first_image_index + k]).standard_normal(
                run.latent_shape[1:], dtype=np.float32) for k in range(run.latent_shape[0])])
        noise = check_noise(noise)
        if noise.shape != run.latent_shape:
            raise RequestError(f"noise has shape {noise.shape}; this run needs {run.latent_shape}", argument="noise")
        return noise

    def denoiser(self, run: Run, control: Optional[ControlInput] = None,
                 on_release: Optional[Callable[[], None]] = None):
        """(the guided denoiser ``denoise(z, t) -> eps``, the expert router whose ``trace`` it fills).

        Encodes the prompts, the negative prompt and the style-prefixed prompts once. With ``control``
        every UNet call goes through the ControlNet too; in its guess mode the unconditional branch gets
        no control. ``on_release``: see :meth:`experts`."""
        conds = self.encode(run.prompts, run.negative_prompt, list(run.style_scales), run.bucket_index)
        branches = guidance_branches(conds, run.guidance_weights, run.num_images_per_prompt, control)
        if run.single_model is None:
            model = self.experts(run.t_struct, run.switch_rule, control, on_release)
        else:
            network = self.components.get(run.single_model + "_unet")
            model = SingleModel(UNetEpsModel(network, control), run.single_model)
        model.plan(run.timesteps)
        return GuidedDenoiser(model, branches, run.guidance_rescale), model

    def release_unets(self, model) -> None:
        model.release_all()
        for name in ("structure_unet", "texture_unet"):
            self.components.done_with(name)

    def __call__(self, prompt: Union[str, Sequence[str]], *, noise: Optional[np.ndarray] = None, init_image=None,
                 strength: float = 0.8, output_type: str = "pil", progress: Optional[ProgressCallback] = None,
                 compiled: Optional[bool] = None, **settings) -> PipelineOutput:
        """Generate ``num_images_per_prompt`` images for each prompt.

        Settings (defaults from ``config.sampling``): ``negative_prompt``, ``height``/``width`` (a bucket of
        the structure table unless ``snap_to_bucket``; ``bucket_list="texture"``: of the lower-resolution
        texture table, index-aligned, so the same bucket conditioning) or ``ratio`` ("W:H", nearest bucket),
        ``num_inference_steps``, ``sampler`` (+ ``sampler_options``), ``spacing``, ``guidance_scale``,
        ``style_scales`` ({aesthetic, anime, photography}), ``guidance_rescale``, ``t_struct``,
        ``switch_rule``, ``single_model`` ("structure"/"texture": that UNet for every t, the baseline of
        the time split), ``seed``, ``num_images_per_prompt``, ``first_image_index``.

        ``noise``: the initial noise (B, C, h, w) instead of drawing it from the seed (image k of the run
        draws from ``(seed, first_image_index + k)``, so a batch equals its images made one call at a
        time). ``init_image`` + ``strength``: image-to-image. ``output_type``: "pil" or "latent".

        ``compiled``: each denoising step as one graph (:mod:`pangu_draw_ms.diffusion.compiled`: every
        guidance branch in one UNet call, the guidance combination, the expert's network, and with Euler or
        DDIM (eta 0) the sampler's update), compiled once per expert and guidance weights and reused by
        later calls (with ``memory="sequential"``: within the call). None (default): compiled unless guidance
        rescale is on; True: compiled or an error; False: the host loop.
        """
        check_settings(dict(strength=strength, output_type=output_type, compiled=compiled))
        run = self.plan(prompt, strength=strength if init_image is not None else None, **settings)
        noise = self.initial_noise(run, noise)
        init_image = None if init_image is None else load_init_image(init_image)
        started = time.perf_counter()
        # Compiled steps are kept for later calls; a sequential run keeps them for itself only, and drops
        # them when it releases a UNet (a kept graph would hold it).
        sequential = self.components.memory == "sequential"
        graphs = {} if sequential else self._step_graphs
        denoiser, model = self.denoiser(run, on_release=graphs.clear if sequential else None)
        encoded = time.perf_counter()
        if init_image is None:
            z = noise
        else:
            z0 = np.repeat(self.encode_image(init_image, run.height, run.width), run.latent_shape[0], axis=0)
            z = add_noise(z0, noise, self.schedule.alpha_bar(run.timesteps[0])).astype(np.float32)

        def on_step(i, t, _z):
            if progress is not None:
                progress(i, len(run.timesteps), int(t), model.trace[-1][1])

        coop = CoopDenoiser(denoiser, run.latent_shape, [], self.schedule)  # Algorithm 1 with no partners
        denoise = step_denoiser(coop, compiled, graphs)
        latents = run.sample(denoise, z, callback=on_step)
        self.release_unets(model)
        sampled = time.perf_counter()
        images = [] if output_type == "latent" else to_pil(self.decode(latents))
        decoded = time.perf_counter()
        info = self.run_info(run, model, denoise, {"encode": encoded - started, "sample": sampled - encoded,
                                                   "decode": decoded - sampled})
        return PipelineOutput(images=images, latents=latents, info=info)

    def run_info(self, run: Run, model, denoise, seconds: Dict[str, float]) -> Dict:
        """``PipelineOutput.info``: the run's settings and what ran (bucket table, expert trace, whether each
        step was one compiled graph and held the sampler's update, timings); the same keys for every
        pipeline, Coop-Diffusion adding its own."""
        use_graph = isinstance(denoise, CompiledDenoiser)
        info = run.info()
        info.update(bucket_table=self.buckets.name, expert_trace=list(model.trace),
                    random_weights=self.components.random_weights, compiled_fused_steps=use_graph,
                    sampler_update_in_graph=use_graph and run.sampler.affine, seconds=seconds)
        return info
