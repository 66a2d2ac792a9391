"""Coop-Diffusion runs: the PanGu-Draw main model (model A) with partner models (Algorithm 1, sub-module 1)
and/or another model for one part of the schedule (sub-module 2).

A run: plan the main request (bucket, steps, guidance); build every partner's guided denoiser; if the
recipe has a resolution bridge with ``order: partner_first``, that partner samples from T down to the
switch timestep, its x0 is carried to the main space in pixel space and re-noised with fresh noise; then
the main latent and the fused partners' latents, packed into one state, are denoised together by the
sampler (down to 0, or with ``order: main_first`` down to the switch timestep, where the main x0 is carried
to the bridge partner, which finishes alone); the last model's VAE decodes. ``info["coop_trace"]`` lists
which models ran at every timestep.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Union

import numpy as np

from ..config import CoopRecipe
from ..diffusion.compiled import step_denoiser
from ..diffusion.coop import CoopDenoiser, CoopPartner, LatentBridge, resolution_bridge
from ..diffusion.denoiser import give_unique_names
from ..diffusion.schedule import CLEAN, add_noise
from ..images import to_pil
from .pangu_draw import PanGuDrawPipeline, PipelineOutput, ProgressCallback, decode_in_batches
from .partners import Partner, build_partner
from .requests import check_settings

# Seed streams apart from the main image's (seed, k): partner i's latents and the bridge's fresh noise.
_PARTNER_STREAM, _BRIDGE_STREAM = 1000, 2000


class CoopPipeline:
    """``CoopPipeline(main, recipe)(prompt, **settings)``; ``settings`` as :class:`PanGuDrawPipeline`'s."""

    def __init__(self, main: PanGuDrawPipeline, recipe: CoopRecipe):
        self.main = main
        self.recipe = recipe
        self._partners: Dict[tuple, Dict[str, Partner]] = {}
        self._bridge_cells: Dict[tuple, LatentBridge] = {}
        self._fused_steps: Dict[tuple, object] = {}  # compiled fused steps, reused by later runs

    def partners(self, main_size) -> Dict[str, Partner]:
        """Every partner of the recipe, built once per main image size."""
        key = tuple(main_size)
        if key not in self._partners:
            built: Dict[str, Partner] = {}
            for config in self.recipe.partners:
                built[config.name] = build_partner(config, self.main, built, main_size,
                                                   self.main.components.compute_dtype)
            self._partners[key] = built
        return self._partners[key]

    def _noise(self, seed: int, stream: int, first: int, shape) -> np.ndarray:
        return np.stack([np.random.default_rng([seed, stream, first + k]).standard_normal(shape[1:], dtype=np.float32)
                         for k in range(shape[0])])

    def _bridge(self, source_vae, target_vae, size, mode) -> LatentBridge:
        """One bridge cell per (source, target, size, mode), so its graph compiles once across runs."""
        key = (id(source_vae), id(target_vae), tuple(size), mode)
        if key not in self._bridge_cells:
            self._bridge_cells[key] = LatentBridge(source_vae, target_vae, size, mode)
        return self._bridge_cells[key]

    def _bridges(self, partner: Partner, main_vae, main_size, resize_mode):
        """(to main, from main) bridges; None for both when the partner shares the main latent space."""
        if partner.vae is main_vae and tuple(partner.pixel_size) == tuple(main_size):
            return None, None
        give_unique_names([main_vae], [(partner.name, partner.vae)])  # one bridge graph holds both VAEs
        return (self._bridge(partner.vae, main_vae, main_size, resize_mode),
                self._bridge(main_vae, partner.vae, partner.pixel_size, resize_mode))

    def __call__(self, prompt: Union[str, Sequence[str]], *, output_type: str = "pil",
                 progress: Optional[ProgressCallback] = None, compiled: Optional[bool] = None,
                 control_images: Optional[Dict[str, object]] = None, **settings) -> PipelineOutput:
        """Generate with the recipe. ``compiled``: run each fused step as one graph
        (:class:`~pangu_draw_ms.diffusion.compiled.StepGraph`, compiled once per pipeline and combination of
        active models, then reused): the UNet calls, bridges and fusion, and with Euler or DDIM (eta 0) the
        sampler's update too (other samplers update on the host around the graph). None (default): compiled
        unless guidance rescale is on; True: compiled or an error; False: the host loop (numpy between the
        networks' graphs).
        ``control_images``: {ControlNet partner name: image (path, PIL, HxWx3 uint8), or a list of one image per
        image of the run (prompt by prompt)} replacing the recipe's control images for this call (the
        ControlNets stay loaded and compiled)."""
        check_settings(dict(output_type=output_type, compiled=compiled))
        control_images = self._check_control_images(control_images)
        main = self.main
        run = main.plan(prompt, **settings)
        partners = self.partners((run.height, run.width))
        started = time.perf_counter()
        # Compiled steps are kept for later calls; a sequential run keeps them for itself only, and drops them
        # when it releases a UNet (a kept graph would hold it).
        sequential = main.components.memory == "sequential"
        graphs = {} if sequential else self._fused_steps
        main_denoise, main_model = main.denoiser(run, on_release=graphs.clear if sequential else None)
        encoded = time.perf_counter()

        def partner_denoiser(config):
            prompts = run.prompts if config.prompt is None else [config.prompt] * len(run.prompts)
            if config.name in control_images:
                return partners[config.name].denoiser(prompts, run.num_images_per_prompt,
                                                      control_image=control_images[config.name])
            return partners[config.name].denoiser(prompts, run.num_images_per_prompt)

        bridge_cfg = self.recipe.resolution_bridge
        main_first = bridge_cfg is not None and bridge_cfg.order == "main_first"
        if main_first:
            k = self._switch_index(run.timesteps)
            z, z0_main, timesteps, first_trace = main.initial_noise(run), None, [int(t) for t in run.timesteps][:k], []
        else:
            z, z0_main, timesteps, first_trace = self._partner_first_stage(run, partners, partner_denoiser, compiled,
                                                                           graphs, progress)
        coop, latents0 = self._fuse_partners(run, partners, partner_denoiser, main_denoise, z, z0_main, timesteps)
        offset = 0 if main_first else len(run.timesteps) - len(timesteps)

        def on_step(i, t, _state):
            if progress is not None:
                progress(offset + i, len(run.timesteps), t, "+".join(coop.trace[-1][1]))

        denoise = step_denoiser(coop, compiled, graphs)
        switch = int(run.timesteps[len(timesteps)]) if main_first else CLEAN
        state = run.sample(denoise, coop.pack(z, latents0), timesteps, callback=on_step, final_timestep=switch)
        latents, _ = coop.unpack(state)
        last_trace, decode = [], main.decode
        if main_first:
            latents, last_trace, decode = self._partner_last_stage(run, partners, partner_denoiser, main_denoise,
                                                                   latents, len(timesteps), compiled, graphs,
                                                                   progress)
        main.release_unets(main_model)
        sampled = time.perf_counter()
        images = [] if output_type == "latent" else to_pil(decode(latents))
        info = main.run_info(run, main_model, denoise, {"encode": encoded - started, "sample": sampled - encoded,
                                                        "decode": time.perf_counter() - sampled})
        trace = first_trace + [(t, list(names)) for t, names in coop.trace] + last_trace
        info.update(coop_trace=trace,
                    recipe={"partners": [p.name for p in self.recipe.partners],
                            "resolution_bridge": None if bridge_cfg is None else
                            {"partner": bridge_cfg.partner, "t_low": bridge_cfg.t_low,
                             "upsample": bridge_cfg.upsample, "order": bridge_cfg.order}},
                    unet_evaluations={name: sum(name in names for _, names in trace)
                                      for name in ["main"] + [p.name for p in self.recipe.partners]})
        return PipelineOutput(images=images, latents=latents, info=info)

    def _check_control_images(self, control_images: Optional[Dict[str, object]]) -> Dict[str, object]:
        control_images = dict(control_images or {})
        controlled = [p.name for p in self.recipe.partners if p.kind == "controlnet"]
        unknown = sorted(set(control_images) - set(controlled))
        if unknown:
            raise ValueError(f"control_images names {unknown}, which are not ControlNet partners of the recipe; "
                             f"its ControlNet partners: {controlled}")
        return control_images

    def _switch_index(self, timesteps) -> int:
        """The index of the switch timestep (the first <= t_low); the first model runs the timesteps before it."""
        t_low = self.recipe.resolution_bridge.t_low
        k = next((i for i, t in enumerate(timesteps) if t <= t_low), None)
        if not k:
            raise ValueError(f"resolution_bridge.t_low {t_low} leaves the first model no step in "
                             f"{[int(t) for t in timesteps[:3]]}...; pick a t_low below the first timestep")
        return k

    def _carry(self, run, z, eps, t, source_vae, target_vae, target_size, target_shape):
        """Sub-module 2 at the switch timestep t: (the next model's z_t, its x0), from the first model's z_t
        and eps - by the pixel-space bridge and fresh noise, or the recipe's latent_bilinear baseline."""
        mode = self.recipe.resolution_bridge.upsample
        if mode == "latent_bilinear":
            if source_vae is not target_vae:
                raise ValueError("latent_bilinear upsampling needs one latent space, but the two models of the "
                                 "resolution bridge have their own VAEs; use a pixel-space upsample (bicubic, ...)")
            return resolution_bridge(z, eps, t, self.main.schedule, None, None, latent_upsample=target_shape[2:])
        fresh = self._noise(run.seed, _BRIDGE_STREAM + 1, run.first_image_index, target_shape)
        return resolution_bridge(z, eps, t, self.main.schedule, self._bridge(source_vae, target_vae, target_size, mode),
                                 fresh)

    def _bridge_partner(self, partners, partner_denoiser, run):
        """(the resolution bridge's partner, its guided denoiser, its CoopDenoiser alone)."""
        partner = partners[self.recipe.resolution_bridge.partner]
        denoise = partner_denoiser(next(p for p in self.recipe.partners if p.name == partner.name))
        alone = CoopDenoiser(denoise, partner.latent_shape(run.latent_shape[0]), [], self.main.schedule,
                             main_name=partner.name)
        return partner, denoise, alone

    def _partner_first_stage(self, run, partners, partner_denoiser, compiled, graphs, progress):
        """Sub-module 2, partner first: the bridge partner from T to the switch timestep, its x0 carried to the
        main space and re-noised. Returns (main latents at the first main timestep, the main space's x0 there
        or None, the main model's timesteps, the partner's trace); without a resolution bridge: (initial noise,
        None, every timestep, [])."""
        timesteps = [int(t) for t in run.timesteps]
        z = self.main.initial_noise(run)
        if self.recipe.resolution_bridge is None:
            return z, None, timesteps, []
        k = self._switch_index(timesteps)
        low, low_denoise, low_coop = self._bridge_partner(partners, partner_denoiser, run)

        def low_step(i, t, _z):
            if progress is not None:
                progress(i, len(timesteps), t, low.name)

        z_low = self._noise(run.seed, _BRIDGE_STREAM, run.first_image_index, low_coop.main_shape)
        z_low = run.sample(step_denoiser(low_coop, compiled, graphs), z_low, timesteps[:k], callback=low_step,
                           final_timestep=timesteps[k])
        t_low = timesteps[k]
        z, z0_main = self._carry(run, z_low, low_denoise(z_low, t_low), t_low, low.vae,
                                 self.main.components.get("vae"), (run.height, run.width), run.latent_shape)
        return z, z0_main, timesteps[k:], [(t, list(names)) for t, names in low_coop.trace]

    def _partner_last_stage(self, run, partners, partner_denoiser, main_denoise, z, k, compiled, graphs, progress):
        """Sub-module 2, main first ("and vice versa"): the main latents at timestep k carried to the bridge
        partner's space, which denoises alone to 0. Returns (its clean latents, its trace, its decoder)."""
        timesteps = [int(t) for t in run.timesteps]
        partner, _, alone = self._bridge_partner(partners, partner_denoiser, run)
        t = timesteps[k]
        z_partner, _ = self._carry(run, z, main_denoise(z, t), t, self.main.components.get("vae"), partner.vae,
                                   partner.pixel_size, alone.main_shape)

        def step(i, t, _z):
            if progress is not None:
                progress(k + i, len(timesteps), t, partner.name)

        latents = run.sample(step_denoiser(alone, compiled, graphs), z_partner, timesteps[k:], callback=step)
        return latents, [(t, list(names)) for t, names in alone.trace], lambda x: decode_in_batches(partner.vae, x)

    def _fuse_partners(self, run, partners, partner_denoiser, main_denoise, z, z0_main, timesteps):
        """Sub-module 1: the CoopDenoiser of the main model and every partner but the low-resolution one, and
        the partners' initial latents (their own noise, or the main latents where they share its space;
        after a resolution bridge, the main x0 carried over and re-noised by eq. 1)."""
        schedule, main_vae = self.main.schedule, self.main.components.get("vae")
        main_size, batch = (run.height, run.width), run.latent_shape[0]
        bridge_cfg = self.recipe.resolution_bridge
        fused, latents0 = [], []
        for i, config in enumerate(self.recipe.partners):
            if bridge_cfg is not None and config.name == bridge_cfg.partner:
                continue
            partner = partners[config.name]
            to_main, from_main = self._bridges(partner, main_vae, main_size, config.resize_mode)
            shape = partner.latent_shape(batch)
            noise = self._noise(run.seed, _PARTNER_STREAM + i, run.first_image_index, shape)
            if z0_main is None:
                # Algorithm 1 starts every partner from the main model's z_T (z'_T = z_T) - possible wherever the
                # partner's latents have the main latents' shape, even in another latent space.
                latents0.append(z.copy() if shape == tuple(z.shape) else noise)
            else:
                a = schedule.alpha_bar(timesteps[0])
                start = z0_main if from_main is None else from_main.numpy(z0_main)
                latents0.append(add_noise(start, noise, a).astype(np.float32))
            fused.append(CoopPartner(config.name, partner_denoiser(config), shape, config.weight, config.t_min,
                                     config.t_max, to_main, from_main))
        return CoopDenoiser(main_denoise, run.latent_shape, fused, schedule), latents0

