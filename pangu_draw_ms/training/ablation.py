"""The paper's ablations (Tables 4-6) as a plan of training runs: one config, every arm derived from it.

Every arm trains its generators from scratch, in the latent space and with the text encoders of one trained
base model (frozen, as the VAE), on one dataset, with one optimizer setting; arms differ only in what the
table varies:

* Table 6 (the split point): a time-decoupled pair per T_struct in ``t_structs`` (``pair_t<T>``), each
  generator ``steps`` steps on its own range, the structure generator on all data at the high-resolution
  bucket list, the texture generator on the high-resolution images at the low-resolution list;
* Table 5 (data and resolution): the pair at ``reference_t_struct`` against the same pair with the structure
  generator trained on the high-resolution images only (``structure_high_only``), and with the texture
  generator trained at the high resolution (``texture_high_res``); the generator an arm does not change is
  the reference pair's file;
* Table 4 (equal compute): the reference pair against Resolution Boost (``resolution_boost``): one UNet of
  the pair's combined size (``resolution_boost.model_channels``) over the whole timestep range, first at the
  low-resolution list, then at the high one, its step count set so that its training FLOPs equal the
  pair's (:func:`resolution_boost_steps`, counted by :mod:`~pangu_draw_ms.training.compute`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Tuple

from ..config import PanGuDrawConfig, _check
from .compute import generator_training_flops


@dataclass(frozen=True)
class ResolutionBoostConfig:
    """The Table 4 baseline: ``model_channels`` of its UNet (the rest of the architecture is the pair's) and
    the share of its steps at the low-resolution bucket list (the rest at the high one)."""

    model_channels: int = 48
    low_resolution_share: float = 0.5

    def __post_init__(self):
        _check(self.model_channels >= 1, "resolution_boost.model_channels must be >= 1")
        _check(0 < self.low_resolution_share < 1, "resolution_boost.low_resolution_share must lie in (0, 1)")


@dataclass(frozen=True)
class AblationConfig:
    """``base_model``: a model directory whose VAE and conditioner every arm uses frozen (and whose
    architecture the pairs' UNets take); ``manifest``: the training data; ``steps``: training steps of each
    generator of a pair, ``batch_size`` samples each; ``seeds``: sampling seeds of the evaluation (one image
    set each, for the spread); ``sampling_steps``: Euler steps per image; ``prompts``: the evaluation's prompts
    file ("": the demo world's held-out captions, en + zh); ``metrics``: tools/evaluate.py's metrics, the
    first three standing in for the paper's FID, IS and CLIP-score; ``train_overrides``: extra ``key=value``
    settings for every training run (e.g. ``precision=fp16`` on Ascend); ``evaluation_args``: extra
    tools/evaluate.py arguments (e.g. ``--inception FILE``, ``--fid-reference FILE`` for FID)."""

    base_model: str
    manifest: str
    work_dir: str = "outputs/ablation"
    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    seed: int = 0
    t_structs: Tuple[int, ...] = (200, 300, 500, 700)
    reference_t_struct: int = 500
    resolution_boost: ResolutionBoostConfig = field(default_factory=ResolutionBoostConfig)
    seeds: Tuple[int, ...] = (0, 1, 2)
    sampling_steps: int = 30
    prompts: str = ""
    metrics: Tuple[str, ...] = ("fd_democlip", "is_democlip", "democlip", "judge")
    train_overrides: Tuple[str, ...] = ()
    evaluation_args: Tuple[str, ...] = ()

    def __post_init__(self):
        _check(self.steps >= 2, f"steps must be >= 2, got {self.steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.reference_t_struct in self.t_structs,
               f"reference_t_struct {self.reference_t_struct} must be one of t_structs {list(self.t_structs)}")
        _check(len(self.seeds) >= 1, "seeds must name at least one sampling seed")
        _check(len(self.metrics) >= 3, "metrics must name at least three (in the roles of FID, IS, CLIP-score)")


@dataclass(frozen=True)
class TrainingRun:
    """One ``tools/train.py`` run of an arm: its stage and the overrides that make it that arm's."""

    stage: str
    overrides: Tuple[str, ...]


@dataclass(frozen=True)
class Arm:
    """A model to train and evaluate: its runs, and the component files it takes from another arm."""

    name: str
    runs: Tuple[TrainingRun, ...]
    borrowed: Dict[str, str] = field(default_factory=dict)  # component -> the arm it is copied from
    unet_channels: int = 0  # 0: the base model's UNet


def pair_name(t_struct: int) -> str:
    return f"pair_t{t_struct}"


def plan_arms(config: AblationConfig, resolution_boost_total_steps: int) -> List[Arm]:
    """Every arm of Tables 4-6, in the order they can be trained (arms that borrow come after the lender)."""
    reference = pair_name(config.reference_t_struct)

    def structure(t_struct, *extra):
        return TrainingRun("structure", (f"t_struct={t_struct}",) + extra)

    def texture(t_struct, *extra):
        return TrainingRun("texture", (f"t_struct={t_struct}", "data.upscale_small_images=false") + extra)

    arms = [Arm(pair_name(t), (structure(t), texture(t))) for t in config.t_structs]
    t = config.reference_t_struct
    arms += [Arm("structure_high_only", (structure(t, "data.upscale_small_images=false"),),
                 {"texture_unet": reference}),
             Arm("texture_high_res", (texture(t, "bucket_list=structure"),), {"structure_unet": reference})]
    boost = config.resolution_boost
    low_steps = max(1, round(boost.low_resolution_share * resolution_boost_total_steps))
    arms.append(Arm("resolution_boost", (TrainingRun("full_range", (
        f"steps={resolution_boost_total_steps}", f"resolution_boost_step={low_steps}")),),
        unet_channels=boost.model_channels))
    return arms


def resolution_boost_model(base: PanGuDrawConfig, config: AblationConfig) -> PanGuDrawConfig:
    """The base model with the Resolution Boost UNet's width."""
    return replace(base, unet=replace(base.unet, model_channels=config.resolution_boost.model_channels))


def resolution_boost_steps(base: PanGuDrawConfig, config: AblationConfig) -> Tuple[int, Dict[str, float]]:
    """Resolution Boost's total steps at the pair's training compute, and the accounting (FLOPs):

    pair = steps x batch x (F_pair(high) + F_pair(low)); boost = N x batch x (s F_boost(low) + (1 - s) F_boost(high))
    with s the low-resolution share; N = pair / (batch x (s F_boost(low) + (1 - s) F_boost(high))), rounded.
    """
    boost_model = resolution_boost_model(base, config)
    share = config.resolution_boost.low_resolution_share

    def per_step(model, buckets):
        return generator_training_flops(model, buckets, config.batch_size, 1)

    pair = config.steps * (per_step(base, base.structure_buckets) + per_step(base, base.texture_buckets))
    boost_step = share * per_step(boost_model, base.texture_buckets) \
        + (1 - share) * per_step(boost_model, base.structure_buckets)
    steps = max(2, int(round(pair / boost_step)))
    return steps, {"pair_flops": pair, "resolution_boost_flops": steps * boost_step,
                   "resolution_boost_flops_per_step": boost_step,
                   "pair_step_flops_high": per_step(base, base.structure_buckets),
                   "pair_step_flops_low": per_step(base, base.texture_buckets)}


def agreement(ours_better: float, spread: float) -> str:
    """How a measured difference (positive: the paper's preferred arm is better) compares with the seed spread."""
    if abs(ours_better) < 1e-9:  # equal up to float rounding (e.g. the same judge hit rate)
        return "no difference"
    if spread <= 0 or math.isnan(spread):
        return "agrees" if ours_better > 0 else "disagrees"
    margin = ours_better / spread
    if ours_better > 0:
        return f"agrees ({margin:.1f} x spread)" if margin >= 1 else f"agrees in direction, within the spread " \
                                                                      f"({margin:.1f} x)"
    return f"disagrees ({-margin:.1f} x spread)" if margin <= -1 else f"disagrees in direction, within the " \
                                                                        f"spread ({-margin:.1f} x)"
