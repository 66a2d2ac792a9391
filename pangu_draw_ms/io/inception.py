"""The FID Inception-v3 weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` onto our cell.

pytorch-fid's file is the state dict of its ``FIDInceptionV3`` (torchvision's ``Inception3`` with the FID
blocks, 1008 classes, no auxiliary classifier), as ``{name: tensor}``. Our
:class:`pangu_draw_ms.evaluation.inception.FIDInceptionV3` keeps torchvision's module names, so the map is a
renaming of the BatchNorm entries only (MindSpore's ``nn.BatchNorm2d`` names):

* ``<layer>.bn.weight`` -> ``<layer>.bn.gamma``, ``bn.bias`` -> ``bn.beta``,
  ``bn.running_mean`` -> ``bn.moving_mean``, ``bn.running_var`` -> ``bn.moving_variance``;
* ``<layer>.conv.weight``, ``fc.weight``, ``fc.bias`` keep their names;
* ``bn.num_batches_tracked`` (a training counter, absent from older files) is dropped.

The file is read with :func:`pangu_draw_ms.io.checkpoint.load_tensors`: ``.pth`` through
``torch.load(weights_only=True)`` only (never plain unpickling), ``.safetensors`` and ``.ckpt`` directly.
A ``.safetensors``/``.ckpt`` may hold either pytorch-fid's names or ours (what :func:`fid_inception_from_torch`
output saved with ``io.checkpoint.save_checkpoint``, which needs no torch to read).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Mapping

import numpy as np
from mindspore.nn.utils import no_init_parameters

from ..evaluation.inception import FIDInceptionV3
from .checkpoint import load_tensors
from .state import StateDictError, load_state

FID_WEIGHTS = "pt_inception-2015-12-05 FID Inception weights"
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

# torch BatchNorm2d entry -> MindSpore nn.BatchNorm2d parameter, and back
_OUR_BATCH_NORM_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                         "running_var": "moving_variance"}
_TORCH_BATCH_NORM_NAMES = {ours: torch for torch, ours in _OUR_BATCH_NORM_NAMES.items()}
_DROPPED = "num_batches_tracked"
_SHOW = 10  # how many names of each kind an error lists


def _renamed(name: str, batch_norm_names: Mapping[str, str]) -> str:
    module, _, leaf = name.rpartition(".")
    if module.endswith(".bn") and leaf in batch_norm_names:
        return f"{module}.{batch_norm_names[leaf]}"
    return name


def _listed(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


@lru_cache(maxsize=1)
def _expected_torch_shapes() -> Dict[str, tuple]:
    """``{pytorch-fid name: shape}`` of every parameter of :class:`FIDInceptionV3` (472 entries)."""
    with no_init_parameters():  # names and shapes only
        cell = FIDInceptionV3()
    return {_renamed(p.name, _TORCH_BATCH_NORM_NAMES): tuple(p.shape) for p in cell.get_parameters()}


def fid_inception_from_torch(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Rename pytorch-fid's ``FIDInceptionV3`` state dict (``{name: array}``) to our parameter names.

    Checked whole before anything is returned: an entry the FID network does not have, an entry it needs
    that is missing, or a shape that differs (torchvision's ImageNet Inception-v3 has 1000 classes and an
    ``AuxLogits`` head; other networks have other names) raises :class:`StateDictError` that says which
    and that the FID weights are expected.
    """
    expected = _expected_torch_shapes()
    given = {name for name in state if name.rpartition(".")[2] != _DROPPED}
    unexpected, missing = given - set(expected), set(expected) - given
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    mismatched = [f"{name} expected {expected[name]} got {tuple(np.shape(state[name]))}"
                  for name in sorted(given & set(expected)) if tuple(np.shape(state[name])) != expected[name]]
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listed(mismatched)}")
    if problems:
        raise StateDictError(f"not the FID Inception-v3: expected the {FID_WEIGHTS} ({FID_WEIGHTS_FILE}, "
                             f"pytorch-fid's FIDInceptionV3 state dict); {'; '.join(problems)}")
    return {_renamed(name, _OUR_BATCH_NORM_NAMES): np.asarray(state[name]) for name in sorted(given)}


def load_fid_inception(path: str) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the weights of ``path``: pytorch-fid's ``.pth`` (or the same tensors as
    ``.safetensors``/``.ckpt``, under pytorch-fid's names or ours). A file of another network raises
    :class:`StateDictError` naming the entries that do not fit."""
    state = load_tensors(path)
    cell = FIDInceptionV3()
    ours = {p.name for p in cell.get_parameters()}
    if not set(state) <= ours:
        state = fid_inception_from_torch(state)
    load_state(cell, state, what=f"{path} (expected the {FID_WEIGHTS})")
    return cell
