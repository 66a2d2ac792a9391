"""Optimizer pieces: AdamW with a warmup-cosine learning rate, and an exponential moving average of weights."""
from __future__ import annotations

import math
from typing import Sequence

import mindspore as ms
from mindspore import Parameter, ParameterTuple, nn, ops

from .config import OptimConfig


class WarmupCosine(nn.learning_rate_schedule.LearningRateSchedule):
    """lr(step) = peak * (step + 1) / warmup during warmup, then a cosine from peak down to
    ``min_ratio * peak`` at ``total_steps`` (constant after). ``step`` counts optimizer updates from 0."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        super().__init__()
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.decay_steps = max(1, total_steps - warmup_steps)
        self.min_ratio = min_ratio

    def construct(self, global_step):
        step = global_step.astype(ms.float32)
        warmup = (step + 1.0) / max(1, self.warmup_steps)
        progress = ops.clamp((step - self.warmup_steps) / self.decay_steps, 0.0, 1.0)
        cosine = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return self.peak * ops.select(step < self.warmup_steps, warmup, cosine)

    def value(self, step: int) -> float:
        """The same schedule in plain Python (logging, tests)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / max(1, self.warmup_steps)
        progress = min(max((step - self.warmup_steps) / self.decay_steps, 0.0), 1.0)
        return self.peak * (self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(params: Sequence[Parameter], config: OptimConfig, total_steps: int) -> nn.AdamWeightDecay:
    """AdamW over ``params``; weight decay on matrices and kernels only (not on biases, norms or scalars)."""
    decay = [p for p in params if len(p.shape) >= 2]
    no_decay = [p for p in params if len(p.shape) < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    schedule = WarmupCosine(config.learning_rate, config.warmup_steps, total_steps, config.min_lr_ratio)
    return nn.AdamWeightDecay([g for g in groups if g["params"]], learning_rate=schedule,
                              beta1=config.beta1, beta2=config.beta2, eps=config.eps)


def _ema_update(decay, shadow, param):
    return ops.assign(shadow, shadow * decay + param * (1.0 - decay))


@ms.jit_class
class EMA:
    """Shadow copies ``ema.<name>`` of ``params``: after update n (counted from 0),
    ema <- d ema + (1 - d) param with d = min(decay, (1 + n) / (10 + n)), so early averages are not
    dominated by the random initial weights. :meth:`update` runs inside a compiled step."""

    def __init__(self, params: Sequence[Parameter], decay: float):
        self.decay = decay
        self.params = ParameterTuple(params)
        self.shadows = ParameterTuple([Parameter(p.data.copy(), name="ema." + p.name, requires_grad=False)
                                       for p in params])
        self.map = ops.HyperMap()

    def update(self, update_index):
        # A scalar decay, so that 0-d parameters (CLIP's logit_scale) keep their shape.
        n = update_index.reshape(()).astype(ms.float32)
        decay = ops.minimum(ops.scalar_to_tensor(self.decay, ms.float32), (1.0 + n) / (10.0 + n))
        self.map(ops.partial(_ema_update, decay), self.shadows, self.params)
        return decay
