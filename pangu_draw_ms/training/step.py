"""The optimizer step: gradients of a loss, data-parallel mean, loss scaling, clipping, AdamW, EMA.

:class:`TrainStep` wraps any ``loss_fn(*inputs) -> scalar`` over a list of trainable parameters. One
optimizer step is ``grad_accumulation`` calls of :meth:`TrainStep.__call__`, one per micro-batch:

1. gradients of ``loss x scale`` (``scale`` is the dynamic loss scale in fp16, 1 otherwise);
2. with accumulation: summed until the last micro-batch;
3. at the last micro-batch: all-reduced to the mean over workers (msrun), divided by the accumulation
   count and the scale; if any gradient is inf/NaN the update is skipped (and an fp16 scale shrinks);
4. clipped to ``max_grad_norm`` (global L2 norm), AdamW update with the scheduled learning rate,
   EMA update.

In GRAPH_MODE every piece is compiled with ``ms.jit`` (one graph per input shape: a bucket compiles
once); in PYNATIVE_MODE it runs eagerly. MindSpore has no CPU kernel for TrainOneStepWithLossScaleCell,
so scaling uses the functional ``mindspore.amp`` scaler; the finiteness test is the global norm's (Ascend:
``mindspore.amp.all_finite``, which reads the NPU's overflow status).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .config import LossScaleConfig, OptimConfig
from .optim import EMA, build_optimizer


def _squared_sum(grad):
    return ops.reduce_sum(ops.square(grad.astype(ms.float32)))


def _scaled(factor, grad):
    return grad * factor.astype(grad.dtype)


@ms.jit_class
class _Update:
    """Steps 3-4 above, traced into the compiled step; holds no state of its own beyond the cells it uses."""

    def __init__(self, optimizer, ema, scaler, reducer, accumulation: int, max_grad_norm: float,
                 eager_optimizer: bool = False):
        self.optimizer = optimizer
        # The optimizer's own construct without the ms.jit MindSpore decorates it with (see TrainStep; ms.jit keeps
        # the function it wraps as __wrapped__, functools.wraps' attribute).
        self.eager_optimizer = eager_optimizer
        self.finite_by_norm = ms.get_context("device_target") != "Ascend"
        construct = type(optimizer).construct
        self.optimizer_step = functools.partial(getattr(construct, "__wrapped__", construct), optimizer)
        self.schedule = optimizer.learning_rate
        self.ema = ema
        self.scaler = scaler
        self.reducer = reducer
        self.has_ema = ema is not None
        self.has_scaler = scaler is not None
        self.has_reducer = reducer is not None
        self.divisor = float(accumulation)
        self.max_grad_norm = max_grad_norm
        self.map = ops.HyperMap()

    def apply(self, grads):
        if self.has_reducer:
            grads = self.reducer(grads)
        if self.has_scaler:
            grads = self.scaler.unscale(grads)
        if self.divisor != 1.0:
            grads = self.map(ops.partial(_scaled, ops.scalar_to_tensor(1.0 / self.divisor, ms.float32)), grads)
        norm = ops.sqrt(ops.addn(self.map(_squared_sum, grads)))
        if self.finite_by_norm:
            # Every gradient is finite iff their global norm is (an inf or NaN anywhere makes the sum of squares
            # inf or NaN; a finite sum beyond float32's range would make clipping zero the step, so skipping it is
            # right too). One scalar test instead of mindspore.amp.all_finite, which compiles a graph of its own
            # in PYNATIVE_MODE (1.5 s of every eager trainer's first step on a CPU).
            finite = ops.isfinite(norm)
        else:
            # Ascend: all_finite reads the NPU's overflow status, which also catches fp16 overflows that saturate
            # to finite values (saturation mode) and so never reach the norm.
            finite = ms.amp.all_finite(grads)
        lr = self.schedule(self.optimizer.global_step)
        if finite:
            if self.max_grad_norm > 0:
                factor = ops.minimum(self.max_grad_norm / (norm + 1e-6), 1.0)
                grads = self.map(ops.partial(_scaled, factor), grads)
            update_index = self.optimizer.global_step
            if self.eager_optimizer:
                self.optimizer_step(grads)
            else:
                self.optimizer(grads)
            if self.has_ema:
                self.ema.update(update_index)
        if self.has_scaler:
            self.scaler.adjust(finite)
        return finite, norm, lr


class TrainStep:
    """Compiled optimizer steps over ``loss_fn(*inputs)`` (see the module docstring).

    Args:
        loss_fn: function of tensors returning the scalar loss; it may read the trainable parameters.
        params: the trainable parameters.
        optim: optimizer, schedule, clipping, accumulation and EMA settings.
        total_steps: optimizer steps of the run (end of the cosine).
        loss_scale: dynamic loss scaling settings, or None for none (fp32/bf16).
        world_size: data-parallel workers (gradients are mean-reduced when > 1).

    Two graphs are compiled: the gradients (once per input shape) and the update (once); gradients
    pass between them as a mutable tuple, so the per-parameter update is not recompiled per bucket.
    """

    def __init__(self, loss_fn: Callable, params: Sequence[Parameter], optim: OptimConfig, total_steps: int,
                 loss_scale: Optional[LossScaleConfig] = None, world_size: int = 1):
        self.loss_fn = loss_fn
        self.params = list(params)
        self.optimizer = build_optimizer(self.params, optim, total_steps)
        self.ema = EMA(self.params, optim.ema_decay) if optim.ema_decay > 0 else None
        self.scaler = (ms.amp.DynamicLossScaler(loss_scale.initial, loss_scale.factor, loss_scale.window)
                       if loss_scale is not None else None)
        reducer = (nn.DistributedGradReducer(self.optimizer.parameters, mean=True, degree=world_size)
                   if world_size > 1 else None)
        self.accumulation = optim.grad_accumulation
        compile_ = ms.get_context("mode") == ms.GRAPH_MODE
        # MindSpore compiles AdamWeightDecay's construct (ms.jit) on a PYNATIVE_MODE trainer's first step: 1.2 s of
        # a tiny model's first step on a CPU, where eager op launch is blocking and cheap (runtime.py) and the
        # eager update took as long per step (0.47 vs 0.45 s, the same weights bit for bit). So on the CPU an
        # eager trainer runs the update eagerly; elsewhere launch costs more and the compiled update stays.
        eager_optimizer = not compile_ and ms.get_context("device_target") == "CPU"
        self.update = _Update(self.optimizer, self.ema, self.scaler, reducer, self.accumulation, optim.max_grad_norm,
                              eager_optimizer)
        self.grad_fn = ms.value_and_grad(self._scaled_loss, None, self.optimizer.parameters)
        self.map = ops.HyperMap()
        self.pending = None  # gradients summed over the micro-batches of the current step
        self.micro = 0
        wrap = ms.jit if compile_ else (lambda f: f)
        self._grads = wrap(self.grad_fn)
        self._sum = wrap(self._sum_grads)
        self._apply = wrap(self.update.apply)

    def _scaled_loss(self, *inputs):
        loss = self.loss_fn(*inputs)
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _sum_grads(self, a, b):
        return self.map(ops.add, a, b)

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.scale_value.asnumpy()) if self.scaler is not None else 1.0

    def __call__(self, *inputs: Tensor) -> Optional[Dict[str, float]]:
        """Feed one micro-batch. Returns None until the optimizer step completes, then
        ``{loss, finite, grad_norm, lr}`` (loss of the last micro-batch, unscaled)."""
        scale = self.loss_scale
        loss, grads = self._grads(*inputs)
        self.pending = grads if self.pending is None else self._sum(ms.mutable(self.pending), ms.mutable(grads))
        self.micro += 1
        if self.micro < self.accumulation:
            return None
        grads, self.pending, self.micro = self.pending, None, 0
        finite, norm, lr = self._apply(ms.mutable(grads))
        return {"loss": float(loss.asnumpy()) / scale, "finite": bool(finite.asnumpy()),
                "grad_norm": float(norm.asnumpy()), "lr": float(np.asarray(lr.asnumpy()).reshape(-1)[0])}
    # ---- state for checkpoints ------------------------------------------------------------------
    def state(self) -> Dict[str, np.ndarray]:
        """Optimizer moments and step, EMA shadows, loss scale: ``{name: array}``."""
        state = {f"optimizer/{p.name}": p.asnumpy() for p in self.optimizer.get_parameters()
                 if not any(p is q for q in self.params)}
        if self.ema is not None:
            state.update({f"ema/{p.name}": s.asnumpy() for p, s in zip(self.params, self.ema.shadows)})
        if self.scaler is not None:
            state["scaler/scale_value"] = self.scaler.scale_value.asnumpy()
            state["scaler/counter"] = self.scaler.counter.asnumpy()
        return state

    def load_state(self, state: Dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned (every entry must be present)."""
        targets: List[Tuple[str, Parameter]] = [
            (f"optimizer/{p.name}", p) for p in self.optimizer.get_parameters() if not any(p is q for q in self.params)]
        if self.ema is not None:
            targets += [(f"ema/{p.name}", s) for p, s in zip(self.params, self.ema.shadows)]
        if self.scaler is not None:
            targets += [("scaler/scale_value", self.scaler.scale_value), ("scaler/counter", self.scaler.counter)]
        missing = [name for name, _ in targets if name not in state]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} optimizer entries, e.g. {missing[:5]}; it was "
                             "written by a run with other trainable parameters or optimizer settings")
        for name, param in targets:
            param.set_data(Tensor(state[name], dtype=param.dtype))

    def ema_weights(self) -> Dict[str, np.ndarray]:
        """``{parameter name: EMA value}`` (the live weights when EMA is off)."""
        if self.ema is None:
            return {p.name: p.asnumpy() for p in self.params}
        return {p.name: s.asnumpy() for p, s in zip(self.params, self.ema.shadows)}
