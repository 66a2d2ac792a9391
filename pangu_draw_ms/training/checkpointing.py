"""Training checkpoints: ``step_<N>.safetensors`` files in one folder, the newest ``keep`` of them kept.

Each holds every tensor a run needs to continue (trainable weights, optimizer moments and step, EMA
shadows, loss scale) and its JSON-able run state (step, micro-batch count, batch layout) in the
safetensors metadata. Files are written atomically by :func:`pangu_draw_ms.io.checkpoint.save_checkpoint`
(temporary file in the same folder, fsync, rename): a run killed while saving keeps its previous
checkpoint intact, never a truncated one; the next run removes the temporary file it left
(:meth:`CheckpointFolder.remove_partial_files`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..io.checkpoint import load_tensors, open_checkpoint, save_checkpoint

_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")
# What a save killed mid-write leaves: io.checkpoint.atomic_output's ".<name>.<random>.partial.safetensors"
# (and MindSpore's staging ".tmp" beside it).
_PARTIAL_FILE = re.compile(r"^\.step_\d+\.safetensors\..+\.partial(\.safetensors|\.tmp)$")
_STATE_KEY = "training_state"


class CheckpointFolder:
    """``step_<N>.safetensors`` training checkpoints in ``directory``; saving keeps the newest ``keep``."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = directory
        self.keep = keep

    def steps(self) -> List[int]:
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, os.listdir(self.directory)) if m)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{step:08d}.safetensors")

    def latest(self) -> Optional[str]:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def remove_partial_files(self) -> List[str]:
        """Delete what saves killed mid-write left in the folder (each the size of a checkpoint); returns
        their names."""
        if not os.path.isdir(self.directory):
            return []
        stale = sorted(name for name in os.listdir(self.directory) if _PARTIAL_FILE.match(name))
        for name in stale:
            os.remove(os.path.join(self.directory, name))
        return stale

    def save(self, step: int, tensors: Dict[str, np.ndarray], state: dict) -> str:
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(step)
        save_checkpoint(tensors, path, metadata={_STATE_KEY: json.dumps(state, sort_keys=True)})
        for old in self.steps()[:-self.keep]:
            os.remove(self.path(old))
        return path

    @staticmethod
    def load(path: str) -> Tuple[Dict[str, np.ndarray], dict]:
        """``(tensors, run state)`` of a training checkpoint."""
        with open_checkpoint(path) as reader:
            metadata = dict(reader.metadata)
        if _STATE_KEY not in metadata:
            raise ValueError(f"{path!r} is not a training checkpoint of this package (no {_STATE_KEY!r} metadata); "
                             "resume from a step_<N>.safetensors file written by tools/train.py")
        return load_tensors(path), json.loads(metadata[_STATE_KEY])
