"""Time-decoupled denoising (PanGu-Draw sec. 3.1): the structure generator predicts eps for the high
timesteps t >= T_struct, the texture generator for the rest.

Two switch rules:
* ``exact``: structure iff t >= T_struct - the paper's definition (and diffusers' ``denoising_end``).
  The timesteps each expert evaluates partition the evaluated timesteps at T_struct, for any sampler.
* ``release``: the released PanGu-Draw 3.0 code picks the model from the PREVIOUS step's timestep
  (structure while the previous t >= T_struct; the first step uses the structure model). At n = 40 and
  T_struct = 500 that is 21 structure and 19 texture steps instead of 20 + 20.

Each expert is an eps model of its own (its own compiled graph), so switching never recompiles. With
``sequential=True`` only the active expert is resident: experts are given as loaders, built on first
use and released when the run switches away (timesteps only decrease, so each loads once per run).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Literal, Optional, Tuple, Union

import numpy as np

from .denoiser import Conditioning, EpsModel

SwitchRule = Literal["exact", "release"]
SWITCH_RULES = ("exact", "release")
STRUCTURE, TEXTURE = "structure", "texture"

ExpertSource = Union[EpsModel, Callable[[], EpsModel]]


class TimeDecoupledExperts:
    """An eps model that routes every call to the structure or the texture expert by timestep.

    ``structure`` / ``texture``: eps models, or (with ``sequential=True``) zero-argument loaders returning
    them. ``trace`` records (t, expert) for every evaluation of the current run.
    """

    def __init__(self, structure: ExpertSource, texture: ExpertSource, t_struct: int = 500,
                 rule: SwitchRule = "exact", sequential: bool = False,
                 on_release: Optional[Callable[[str], None]] = None):
        if rule not in SWITCH_RULES:
            raise ValueError(f"unknown switch rule {rule!r}; valid: {', '.join(SWITCH_RULES)}")
        if t_struct < 0:
            raise ValueError(f"t_struct must be >= 0, got {t_struct}")
        self.t_struct = int(t_struct)
        self.rule = rule
        self.sequential = sequential
        self._sources = {STRUCTURE: structure, TEXTURE: texture}
        self._resident: Dict[str, EpsModel] = {} if sequential else dict(self._sources)
        self._on_release = on_release
        self._plan: Optional[Dict[int, str]] = None
        self.trace: List[Tuple[int, str]] = []

    def plan(self, timesteps) -> Dict[int, str]:
        """Fix the expert of every timestep of a run (needed by the release rule) and clear the trace."""
        timesteps = [int(t) for t in timesteps]
        if self.rule == "exact":
            plan = {t: self.expert_for(t) for t in timesteps}
        else:
            previous = [timesteps[0]] + timesteps[:-1]
            plan = {t: STRUCTURE if p >= self.t_struct else TEXTURE for t, p in zip(timesteps, previous)}
        self._plan = plan
        self.trace = []
        return plan

    def expert_for(self, t: int) -> str:
        if self.rule == "release":
            if self._plan is None or t not in self._plan:
                raise ValueError(f"the release switch rule needs plan(timesteps) with t={t} before sampling")
            return self._plan[t]
        return STRUCTURE if t >= self.t_struct else TEXTURE

    def _model(self, name: str) -> EpsModel:
        if name not in self._resident:
            if self.sequential:
                for other in [n for n in self._resident if n != name]:
                    del self._resident[other]
                    if self._on_release is not None:
                        self._on_release(other)
            source = self._sources[name]
            self._resident[name] = source() if self.sequential else source
        return self._resident[name]

    def model_for(self, t: int) -> EpsModel:
        """The expert that evaluates timestep t (loaded if needed); the evaluation is recorded."""
        name = self.expert_for(int(t))
        self.trace.append((int(t), name))
        return self._model(name)

    def __call__(self, z: np.ndarray, t: int, cond: Conditioning) -> np.ndarray:
        return self.model_for(t)(z, t, cond)

    def release_all(self) -> None:
        """Drop resident experts of a sequential run (loaders stay; the next run reloads)."""
        if self.sequential:
            self._resident.clear()


class SingleModel:
    """One eps model for every timestep (the baseline the time split is compared with), with the same
    ``plan``/``trace`` interface as :class:`TimeDecoupledExperts`."""

    def __init__(self, model: EpsModel, name: str):
        self.model = model
        self.name = name
        self.trace: List[Tuple[int, str]] = []

    def plan(self, timesteps) -> Dict[int, str]:
        self.trace = []
        return {int(t): self.name for t in timesteps}

    def model_for(self, t: int) -> EpsModel:
        self.trace.append((int(t), self.name))
        return self.model

    def __call__(self, z: np.ndarray, t: int, cond: Conditioning) -> np.ndarray:
        return self.model_for(t)(z, t, cond)

    def release_all(self) -> None:
        """Nothing to release: the single model stays with its owner."""
