"""Coop-Diffusion (PanGu-Draw sec. 3.2, Algorithm 1): fuse diffusion models that live in different latent
spaces or at different resolutions into one denoising process.

Sub-module 1, the latent-space bridge (Algorithm 1, per step t):
    eps'_t   = model_B(z'_t)                                  partner prediction in space B
    x0'      = (z'_t - sqrt(1 - a_t) eps'_t) / sqrt(a_t)       eq. (3) in B
    z0~      = E_A(D_B(x0'))                                   eq. (4): decode in B, (resize,) encode in A
    eps~_t   = (z_t - sqrt(a_t) z0~) / sqrt(1 - a_t)           eq. (5)
    eps_fuse = sum_i d_i eps~_i + (1 - sum_i d_i) eps_A(z_t)    over the partners active at t
    z_{t-1}  = S(z_t, t, eps_fuse);  z'_{t-1} = S(z'_t, t, eps'_fuse)
with eps'_fuse the fused prediction carried back to B the same way (x0 of eps_fuse -> D_A -> E_B -> eq. 5).
When both models share a latent space the bridge is the identity and is skipped.

The main latent and every partner latent are packed into ONE flat state vector, and the fused denoiser
returns the packed (eps_fuse, eps'_fuse...) - so any sampler (Euler, Heun, DPM-Solver++, ancestral)
applies S to all latents at once, exactly as the algorithm's two S lines.

Sub-module 2, the resolution bridge: a low-resolution model runs from T to T_low; its x0 at T_low is
decoded, upsampled in pixel space, encoded by the high-resolution VAE and re-noised with FRESH noise by
eq. (1), so the high-resolution latent at T_low holds i.i.d. noise; the high-resolution model continues
to 0. Upsampling the noisy latent itself (the paper's Fig. 3 baseline) correlates neighbouring noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .denoiser import ControlledUNet, give_unique_names
from .guidance import GuidedUNet
from .schedule import CLEAN, NoiseSchedule, add_noise, eps_from_x0, predict_x0

Denoise = Callable[[np.ndarray, int], np.ndarray]
RESIZE_MODES = ("bicubic", "bilinear", "nearest", "area")


class LatentBridge(nn.Cell):
    """Clean latents of space B -> images (D_B) -> resized to space A's pixel size -> clean latents of
    space A (E_A, the posterior mode): Algorithm 1's eq. (4), one compiled graph.

    ``source_vae`` / ``target_vae``: cells with ``decode_latents`` / ``encode_to_latents`` (our
    AutoencoderKL; the scaling factors are applied inside). ``target_size``: (H, W) pixels of space A.
    """

    def __init__(self, source_vae: nn.Cell, target_vae: nn.Cell, target_size: Tuple[int, int],
                 resize_mode: str = "bicubic"):
        # auto_prefix=False: the VAEs belong to their pipelines; holding them must not rename their parameters.
        super().__init__(auto_prefix=False)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize_mode!r}; valid: {', '.join(RESIZE_MODES)}")
        self.source_vae = source_vae
        self.target_vae = target_vae
        self.target_size = (int(target_size[0]), int(target_size[1]))
        self.resize_mode = resize_mode

    def construct(self, x0):
        image = self.source_vae.decode_latents(x0)
        if image.shape[-2] != self.target_size[0] or image.shape[-1] != self.target_size[1]:
            image = ops.interpolate(image, size=self.target_size, mode=self.resize_mode)
        return self.target_vae.encode_to_latents(image)

    def numpy(self, x0: np.ndarray) -> np.ndarray:
        """The bridge on the samplers' numpy arrays."""
        return self(ms.Tensor(np.ascontiguousarray(x0, np.float32))).asnumpy()


def bridged_eps(z_t, x0_source, bridge: Optional[Callable], alpha_bar):
    """eps~ (eq. 5) in the target space for a clean prediction made in the source space (eq. 4 first);
    ``bridge=None`` means both share one latent space and x0 carries over unchanged."""
    z0 = x0_source if bridge is None else bridge(x0_source)
    return eps_from_x0(z_t, z0, alpha_bar)


def fuse_predictions(z, eps_main, partner_latents, partner_eps, weights, to_main, from_main, alpha_bar):
    """Algorithm 1 lines 2-9 up to the sampler: (eps_fuse, [eps'_fuse per partner]).

    ``partner_eps[i]`` is None for a partner inactive at t; ``to_main[i]`` / ``from_main[i]`` are the
    bridges (callables) or None for a shared latent space. Operators only, so the same code runs on
    numpy arrays (:class:`CoopDenoiser`) and inside the compiled :class:`FusedStep`.
    """
    fused = eps_main
    total = 0.0
    terms = []
    for z_p, eps_p, weight, bridge in zip(partner_latents, partner_eps, weights, to_main):
        if eps_p is not None:
            terms.append(weight * bridged_eps(z, predict_x0(z_p, eps_p, alpha_bar), bridge, alpha_bar))
            total += weight
    if terms:
        fused = (1.0 - total) * eps_main
        for term in terms:
            fused = fused + term
    # Carry the fused prediction back to every partner's space for its own update (line 9).
    x0_fused = predict_x0(z, fused, alpha_bar)
    carried = [fused if back is None else bridged_eps(z_p, x0_fused, back, alpha_bar)
               for z_p, back in zip(partner_latents, from_main)]
    return fused, carried


@dataclass
class CoopPartner:
    """A partner model B of sub-module 1.

    ``denoise``: (z', t) -> eps' on the partner's own latents (its guidance, prompt and conditioning
    inside); ``latent_shape``: (B, C, h, w) of its latents; ``weight``: d_i; active for
    ``t_min <= t <= t_max``; ``to_main`` / ``from_main``: the bridges B -> A and A -> B (None: shared
    latent space, identity shortcut).
    """

    name: str
    denoise: Denoise
    latent_shape: Tuple[int, ...]
    weight: float
    t_min: int = 0
    t_max: int = 999
    to_main: Optional[LatentBridge] = None
    from_main: Optional[LatentBridge] = None

    def __post_init__(self):
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"partner {self.name!r}: weight d must be in [0, 1], got {self.weight}")
        if self.t_min > self.t_max:
            raise ValueError(f"partner {self.name!r}: t_min {self.t_min} > t_max {self.t_max}")
        if (self.to_main is None) != (self.from_main is None):
            raise ValueError(f"partner {self.name!r}: give both bridges (to and from the main space) or neither")

    def active(self, t: int) -> bool:
        return self.t_min <= t <= self.t_max and self.weight > 0


@dataclass
class CoopDenoiser:
    """Sub-module 1 as one denoiser over the packed state [z, z'_1, ..., z'_k] (see module docstring).

    ``trace`` records, per evaluated t, the names of the models that ran.
    """

    main: Denoise
    main_shape: Tuple[int, ...]
    partners: Sequence[CoopPartner]
    schedule: NoiseSchedule
    main_name: str = "main"
    trace: List[Tuple[int, Tuple[str, ...]]] = field(default_factory=list)

    def __post_init__(self):
        names = [p.name for p in self.partners]
        if len(set(names)) != len(names):
            raise ValueError(f"partner names must be unique, got {names}")
        shapes = [tuple(self.main_shape)] + [tuple(p.latent_shape) for p in self.partners]
        self._sizes = [int(np.prod(s)) for s in shapes]
        self._shapes = shapes

    def pack(self, z: np.ndarray, partner_latents: Sequence[np.ndarray]) -> np.ndarray:
        arrays = [z] + list(partner_latents)
        for a, shape in zip(arrays, self._shapes):
            if tuple(a.shape) != shape:
                raise ValueError(f"latent of shape {tuple(a.shape)} where {shape} is expected")
        return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])

    def unpack(self, state: np.ndarray) -> Tuple[np.ndarray, List[np.ndarray]]:
        parts = np.split(state, np.cumsum(self._sizes)[:-1])
        arrays = [p.reshape(s) for p, s in zip(parts, self._shapes)]
        return arrays[0], arrays[1:]

    def active(self, t: int) -> Tuple[bool, ...]:
        return tuple(p.active(t) for p in self.partners)

    def check_weights(self, t: int) -> None:
        total = sum(p.weight for p in self.partners if p.active(t))
        if total > 1.0 + 1e-6:
            raise ValueError(f"the active partners' weights sum to {total:.3f} > 1 at t={t}")

    def fuse(self, z: np.ndarray, partner_latents: Sequence[np.ndarray], t: int):
        """(eps_fuse, [eps'_fuse per partner]) at timestep t (Algorithm 1 lines 1-9)."""
        self.check_weights(t)
        a = self.schedule.alpha_bar(t)
        eps = self.main(z, t)
        partner_eps = [p.denoise(z_p, t) if p.active(t) else None for p, z_p in zip(self.partners, partner_latents)]
        self.trace.append((int(t), (self.main_name,) + tuple(p.name for p in self.partners if p.active(t))))
        fused, carried = fuse_predictions(
            z, eps, partner_latents, partner_eps, [p.weight for p in self.partners],
            [None if p.to_main is None else p.to_main.numpy for p in self.partners],
            [None if p.from_main is None else p.from_main.numpy for p in self.partners], a)
        return fused.astype(np.float32), [c.astype(np.float32) for c in carried]

    def __call__(self, state: np.ndarray, t: int) -> np.ndarray:
        z, partner_latents = self.unpack(state)
        fused, carried = self.fuse(z, partner_latents, int(t))
        return self.pack(fused, carried)


def resolution_bridge(z_low: np.ndarray, eps_low: np.ndarray, t: int, schedule: NoiseSchedule,
                      bridge: Optional[LatentBridge], noise: np.ndarray, latent_upsample: Optional[Tuple[int, int]] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Sub-module 2 at T_low: the high-resolution latent z_t and its clean latent z0 (for measurements).

    Default: x0 of the low-resolution model (eq. 3), D_low, pixel upsampling and E_high (``bridge``), then
    eq. (1) with FRESH ``noise``. ``latent_upsample=(h, w)``: the paper's Fig. 3 baseline instead -
    bilinear upsampling of the noisy latent itself (same latent space only).
    """
    a = schedule.alpha_bar(t)
    x0_low = predict_x0(z_low, eps_low, a)
    if latent_upsample is not None:
        def up(v):
            return ops.interpolate(ms.Tensor(np.ascontiguousarray(v, np.float32)), size=tuple(latent_upsample),
                                   mode="bilinear").asnumpy()
        return up(z_low), up(x0_low)
    z0_high = bridge.numpy(x0_low)
    if noise.shape != z0_high.shape:
        raise ValueError(f"noise shape {noise.shape} != high-resolution latent shape {z0_high.shape}")
    return add_noise(z0_high, noise, a).astype(np.float32), z0_high


class FusedStep(nn.Cell):
    """One Coop-Diffusion step of a first-order deterministic sampler as ONE compiled graph: the main
    model's guided UNet call, the active partners' guided UNet calls, the latent bridges (VAE decode,
    resize, encode), the fusion and carry-back (:func:`fuse_predictions`) and the update
    z_next = A z + B eps for every latent.

    Built for one combination of expert networks and active partners (a run needs a handful), with the
    number of tensor inputs of each network (``main_arity``, ``partner_arities``: None for an inactive
    partner). Inputs, all flat: the main latents, the per-step scalars (alpha_bar, A, B) as a (3,) tensor,
    every partner's latents, the main network's inputs, then each active partner's inputs. (Flat on
    purpose: nested or empty input tuples - an inactive partner has no inputs - misplace the weights of
    the compiled graph on MindSpore 2.9's CPU backend, "could not execute a primitive".)
    """

    def __init__(self, main, partners, weights, to_main, from_main, main_arity: int, partner_arities):
        super().__init__(auto_prefix=False)  # every network keeps its own parameter names
        # The bridges' VAEs are unique already (CoopPipeline names a partner's VAE apart from the main one).
        give_unique_names([main] + [b for b in list(to_main) + list(from_main) if b is not None],
                          [(f"partner{i}", p) for i, p in enumerate(partners) if p is not None])
        self.main = main
        self.active = tuple(p is not None for p in partners)
        # auto_prefix=False on the lists too: a CellList prefixes its items' parameter names ("0.", ...), which
        # would rename the networks it holds (the main UNet among them) for every later graph.
        self.partner_nets = nn.CellList([p for p in partners if p is not None], auto_prefix=False)
        self.net_index = tuple(sum(self.active[:i]) for i in range(len(partners)))
        self.weights = tuple(float(w) for w in weights)
        bridges = [b for b in list(to_main) + list(from_main) if b is not None]
        self.bridges = nn.CellList(bridges, auto_prefix=False)
        positions = {id(b): i for i, b in enumerate(bridges)}
        self.to_index = tuple(-1 if b is None else positions[id(b)] for b in to_main)
        self.from_index = tuple(-1 if b is None else positions[id(b)] for b in from_main)
        self.num_partners = len(partners)
        self.main_arity = int(main_arity)
        starts, start = [], len(partners) + self.main_arity
        for arity in partner_arities:
            starts.append(start)
            start += arity or 0
        self.input_spans = tuple((b, b + (a or 0)) for b, a in zip(starts, partner_arities))

    def construct(self, z, scalars, *tensors):
        alpha_bar, a, b = scalars[0], scalars[1], scalars[2]
        n = self.num_partners
        partner_latents = tensors[:n]
        eps_main = self.main(z, *tensors[n:n + self.main_arity])
        partner_eps = []
        for i in range(n):
            if self.active[i]:
                begin, end = self.input_spans[i]
                partner_eps.append(self.partner_nets[self.net_index[i]](partner_latents[i], *tensors[begin:end]))
            else:
                partner_eps.append(None)
        to_main = [None if j < 0 else self.bridges[j] for j in self.to_index]
        from_main = [None if j < 0 else self.bridges[j] for j in self.from_index]
        fused, carried = fuse_predictions(z, eps_main, partner_latents, partner_eps, self.weights, to_main, from_main,
                                          alpha_bar)
        return (a * z + b * fused,) + tuple(a * z_p + b * c for z_p, c in zip(partner_latents, carried))


def compilable(coop: CoopDenoiser) -> bool:
    """Whether a run's fused steps can compile: guided UNet models everywhere (no guidance rescale)."""
    denoisers = [coop.main] + [p.denoise for p in coop.partners]
    return all(getattr(d, "compilable", False) for d in denoisers)


def network_signature(cell) -> tuple:
    """What a guided graph computes, by the networks (weights) it runs: equal signatures compute the same
    function of their inputs, so a compiled graph can serve every run with that signature."""
    if cell is None:
        return (None,)
    if isinstance(cell, GuidedUNet):  # rebuilt every run around the same network
        return ("guided", cell.weights) + network_signature(cell.network)
    if isinstance(cell, ControlledUNet):  # rebuilt every run around the same UNet and ControlNet
        return ("controlled", id(cell.unet), id(cell.controlnet), cell.guess_mode)
    return ("network", id(cell))


def fused_step(coop: CoopDenoiser, t: int, a: float, b: float, z_t: ms.Tensor, latents: Sequence[ms.Tensor],
               graphs: dict) -> Tuple[ms.Tensor, List[ms.Tensor]]:
    """(A z_t + B eps_fuse, [A z'_t + B eps'_fuse per partner]) at timestep t as one :class:`FusedStep`
    graph, built into ``graphs`` on first use for its combination of networks, weights and bridges
    (reused by later steps and runs). A = 0, B = 1 gives the fused predictions themselves."""
    coop.check_weights(t)
    main_cell, main_inputs = coop.main.graph(t)
    partner_graphs = [p.denoise.graph(t) if p.active(t) else (None, ()) for p in coop.partners]
    key = (network_signature(main_cell), tuple(network_signature(cell) for cell, _ in partner_graphs),
           tuple(p.weight for p in coop.partners), tuple(id(p.to_main) for p in coop.partners),
           tuple(id(p.from_main) for p in coop.partners), len(main_inputs),
           tuple(len(inputs) for _, inputs in partner_graphs))
    if key not in graphs:
        graphs[key] = FusedStep(main_cell, [cell for cell, _ in partner_graphs], [p.weight for p in coop.partners],
                                [p.to_main for p in coop.partners], [p.from_main for p in coop.partners],
                                len(main_inputs), [None if cell is None else len(inputs)
                                                   for cell, inputs in partner_graphs])
    coop.trace.append((t, (coop.main_name,) + tuple(p.name for p in coop.partners if p.active(t))))
    scalars = ms.Tensor(np.array([coop.schedule.alpha_bar(t), a, b], np.float32))
    inputs = list(latents) + list(main_inputs) + [x for _, xs in partner_graphs for x in xs]
    z_next, *latents_next = graphs[key](z_t, scalars, *inputs)
    return z_next, latents_next


def sample_compiled(coop: CoopDenoiser, sampler, z: np.ndarray, partner_latents: Sequence[np.ndarray], timesteps,
                    callback: Optional[Callable[[int, int], None]] = None, graphs: Optional[dict] = None):
    """The same denoising as ``sampler.sample(coop, coop.pack(z, partner_latents), timesteps)`` for a
    first-order deterministic sampler (Euler, DDIM with eta 0: z_next = A z + B eps), every step ONE
    :class:`FusedStep` graph, the update included; the latents stay tensors between steps.
    ``graphs``: a dict the caller keeps to reuse the compiled steps in later runs with the same networks,
    guidance weights, partner weights and bridges (a new run otherwise compiles its graphs again).
    Returns (z_0, partner latents)."""
    if not sampler.affine:
        raise ValueError(f"sampler {sampler.name!r} is not one affine step per timestep; wrap the denoiser in "
                         "CompiledFusion and run the sampler instead")
    timesteps = [int(t) for t in timesteps]
    graphs = {} if graphs is None else graphs
    z_t = ms.Tensor(np.ascontiguousarray(z, np.float32))
    latents = [ms.Tensor(np.ascontiguousarray(l, np.float32)) for l in partner_latents]
    for i, t in enumerate(timesteps):
        a, b = sampler.linear_coefficients(t, timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN)
        z_t, latents = fused_step(coop, t, a, b, z_t, latents, graphs)
        if callback is not None:
            callback(i, t)
    return z_t.asnumpy(), [l.asnumpy() for l in latents]


class CompiledFusion:
    """``coop`` as a denoiser over the packed state whose every evaluation - the main and partner UNet calls,
    bridges, fusion and carry-back - is one compiled :class:`FusedStep` (A = 0, B = 1), for samplers that
    are not one affine step (Heun, DPM++, ancestral, stochastic DDIM): they update on the host around it."""

    def __init__(self, coop: CoopDenoiser, graphs: Optional[dict] = None):
        self.coop = coop
        self.graphs = {} if graphs is None else graphs

    def __call__(self, state: np.ndarray, t: int) -> np.ndarray:
        z, partner_latents = self.coop.unpack(state)
        fused, carried = fused_step(self.coop, int(t), 0.0, 1.0, ms.Tensor(np.ascontiguousarray(z, np.float32)),
                                    [ms.Tensor(np.ascontiguousarray(l, np.float32)) for l in partner_latents],
                                    self.graphs)
        return self.coop.pack(fused.asnumpy(), [c.asnumpy() for c in carried])
