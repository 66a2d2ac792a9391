"""Atomic safetensors files for training checkpoints and exported weights.

A file is written to a temporary name in its destination folder, flushed to disk (fsync) and renamed
over the destination (``os.replace`` is atomic on POSIX): a run killed while saving leaves the previous
checkpoint intact, never a truncated one. Training checkpoints are ``step_<N>.safetensors`` files in one
folder, the newest ``keep`` of them kept; JSON-able run state travels in the safetensors metadata.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from safetensors.numpy import load_file, save

_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")
_STATE_KEY = "training_state"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_tensors(path: str, tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> None:
    """Atomically write ``{name: array}`` (and string metadata) as a safetensors file."""
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    atomic_write_bytes(path, save(arrays, metadata=metadata))


def load_tensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {os.path.abspath(path)!r}")
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        metadata = dict(f.metadata() or {})
    return load_file(path), metadata


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

    def save(self, step: int, tensors: Dict[str, np.ndarray], state: dict) -> str:
        path = self.path(step)
        save_tensors(path, tensors, {_STATE_KEY: json.dumps(state, sort_keys=True)})
        for old in self.steps()[:-self.keep]:
            os.remove(self.path(old))
        return path

    @staticmethod
    def load(path: str) -> Tuple[Dict[str, np.ndarray], dict]:
        tensors, metadata = load_tensors(path)
        if _STATE_KEY not in metadata:
            raise ValueError(f"{path!r} is not a training checkpoint of this package (no {_STATE_KEY!r} metadata); "
                             "resume from a step_<N>.safetensors file written by tools/train.py")
        return tensors, json.loads(metadata[_STATE_KEY])
