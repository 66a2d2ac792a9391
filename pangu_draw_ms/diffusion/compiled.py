"""Every model evaluation of a sampling step as ONE compiled graph, for the main pipeline and for
Coop-Diffusion alike.

A :class:`~pangu_draw_ms.diffusion.coop.CoopDenoiser` describes one evaluation: the main model's guided
prediction, the partners active at t with their bridges, the fusion and carry-back of Algorithm 1. The
plain text-to-image pipeline is the same with no partners (the fusion is then the identity). A
:class:`StepGraph` is that evaluation as one graph - every guided UNet call (all guidance branches
batched), the bridges' VAE calls, the fusion - followed by the affine update ``z_next = A z + B eps`` of
every latent, so that first-order deterministic samplers (Euler, DDIM with eta 0) take their whole step in
the graph. :class:`CompiledDenoiser` is the sampler-facing side: called as a denoiser it returns the
predictions (A = 0, B = 1; Heun, DPM++ and the stochastic samplers update on the host around it), and
``affine_step`` is what :meth:`Sampler.sample <pangu_draw_ms.diffusion.samplers.Sampler.sample>` calls
for affine samplers. The host loop, its trace, callbacks and weight checks are the same either way.

Graphs are keyed by what they compute (the networks they run, the number of guidance branches, partner
weights, bridges; guidance weights and step coefficients are inputs), so a graph compiles once per
combination and input shape and serves later steps and later runs (a handful per pipeline: one per
expert, times the partner combinations).
"""
from __future__ import annotations

from typing import Dict, Optional

import mindspore as ms
import numpy as np
from mindspore import nn

from .coop import CoopDenoiser, fuse_predictions
from .denoiser import ControlledUNet, give_unique_names
from .guidance import GuidedUNet


class StepGraph(nn.Cell):
    """One denoising step as ONE compiled graph: the main model's guided UNet call, the active partners'
    guided UNet calls, the latent bridges (VAE decode, resize, encode), the fusion and carry-back
    (:func:`~pangu_draw_ms.diffusion.coop.fuse_predictions`) and the update z_next = A z + B eps for every
    latent. With no partners it is the main model's guided step alone.

    Built for one combination of expert networks and active partners, with the number of tensor inputs of
    each network (``main_arity``, ``partner_arities``: None for an inactive partner). Inputs, all flat: the
    main latents, the per-step scalars (alpha_bar, A, B) as a (3,) tensor, every partner's latents, the main
    network's inputs, then each active partner's inputs. (Flat on purpose: nested or empty input tuples - an
    inactive partner has no inputs - misplace the weights of the compiled graph on MindSpore 2.9's CPU
    backend, "could not execute a primitive".)
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

    @property
    def compile_phase(self):
        return nn.Cell.compile_phase.fget(self)

    @compile_phase.setter
    def compile_phase(self, value):
        # MindSpore's compile(), on every call of a cell in GRAPH_MODE (compiled already or not), sets compile_phase
        # on every sub-cell, each through Cell.__setattr__: for the demo's step about 250 cells, which took a fifth of
        # one image's time (bench/README.md). The phase names the inputs' shapes and types: it changes when the graph
        # compiles anew (or runs another of its compiled shapes), and only then is it handed down; the sub-cells'
        # phase is read only while a graph compiles.
        if value != self._compile_phase:
            nn.Cell.compile_phase.fset(self, value)

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
    """Whether a run's steps can compile: guided UNet models everywhere (no guidance rescale)."""
    denoisers = [coop.main] + [p.denoise for p in coop.partners]
    return all(getattr(d, "compilable", False) for d in denoisers)


def network_signature(cell) -> tuple:
    """What a guided graph computes, by the networks (weights) it runs: equal signatures compute the same
    function of their inputs, so a compiled graph can serve every run with that signature."""
    if cell is None:
        return (None,)
    if isinstance(cell, GuidedUNet):  # rebuilt every run around the same network; its weights are inputs
        return ("guided", cell.num_branches) + network_signature(cell.network)
    if isinstance(cell, ControlledUNet):  # rebuilt every run around the same UNet and ControlNet
        return ("controlled", id(cell.unet), id(cell.controlnet), cell.guess_mode)
    return ("network", id(cell))


class CompiledDenoiser:
    """``coop`` (a CoopDenoiser, with or without partners) as a denoiser over its packed state whose every
    evaluation is one :class:`StepGraph`. ``graphs``: a dict the caller keeps to reuse the compiled steps
    in later runs with the same networks, partner weights and bridges."""

    def __init__(self, coop: CoopDenoiser, graphs: Optional[Dict[tuple, StepGraph]] = None):
        if not compilable(coop):
            raise ValueError("a compiled fused step needs guided UNet models (no guidance rescale)")
        self.coop = coop
        self.graphs = {} if graphs is None else graphs

    def affine_step(self, state: np.ndarray, t: int, a: float, b: float) -> np.ndarray:
        """(A z_t + B eps_fuse, A z'_t + B eps'_fuse per partner), packed, at timestep t: one graph, built
        into ``graphs`` on first use for its combination of networks (reused by later steps and runs)."""
        coop = self.coop
        t = int(t)
        z, partner_latents = coop.unpack(state)
        coop.begin_step(t)
        main_cell, main_inputs = coop.main.graph(t)
        partners = [p.denoise.graph(t) if p.active(t) else (None, ()) for p in coop.partners]
        key = (network_signature(main_cell), tuple(network_signature(cell) for cell, _ in partners),
               tuple(p.weight for p in coop.partners), tuple(id(p.to_main) for p in coop.partners),
               tuple(id(p.from_main) for p in coop.partners), len(main_inputs),
               tuple(len(inputs) for _, inputs in partners))
        if key not in self.graphs:
            self.graphs[key] = StepGraph(main_cell, [cell for cell, _ in partners], [p.weight for p in coop.partners],
                                         [p.to_main for p in coop.partners], [p.from_main for p in coop.partners],
                                         len(main_inputs),
                                         [None if cell is None else len(inputs) for cell, inputs in partners])
        scalars = ms.Tensor(np.array([coop.schedule.alpha_bar(t), a, b], np.float32))
        inputs = [_tensor(z_p) for z_p in partner_latents] + list(main_inputs) + [x for _, xs in partners for x in xs]
        z_next, *latents_next = self.graphs[key](_tensor(z), scalars, *inputs)
        return coop.pack(z_next.asnumpy(), [z_p.asnumpy() for z_p in latents_next])

    def __call__(self, state: np.ndarray, t: int) -> np.ndarray:
        """The packed predictions (eps_fuse, eps'_fuse...) at t: the same graph with A = 0, B = 1."""
        return self.affine_step(state, t, 0.0, 1.0)


def _tensor(array: np.ndarray) -> ms.Tensor:
    return ms.Tensor(np.ascontiguousarray(array, np.float32))


def step_denoiser(coop: CoopDenoiser, compiled: Optional[bool], graphs: Optional[Dict[tuple, StepGraph]] = None):
    """The denoiser a run samples with: ``coop`` itself (the host loop) when ``compiled`` is False, or None
    and the run cannot compile; else a :class:`CompiledDenoiser` (``compiled=True`` and no compiled form is
    an error)."""
    if compiled is False or (compiled is None and not compilable(coop)):
        return coop
    return CompiledDenoiser(coop, graphs)
