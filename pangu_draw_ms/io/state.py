"""Putting named tensors into our cells and taking them out, with strict, readable checks."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn

logger = logging.getLogger(__name__)

_SHOW = 10  # how many names of each kind an error message lists


class StateDictError(ValueError):
    """A set of tensors does not fit a cell: missing, unexpected or mis-shaped entries."""


@dataclass
class LoadReport:
    """What happened when tensors were matched against a cell's parameters."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)  # name, expected, got
    wrong_dtype: List[Tuple[str, str, str]] = field(default_factory=list)  # name, expected kind, got dtype
    # our name -> the source file's entry it was mapped from, where they differ (named in messages)
    origins: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype)

    def _named(self, name: str) -> str:
        """Our parameter name, with the file's entry it came from when that is named otherwise."""
        origin = self.origins.get(name)
        return f"{name} (file entry {origin})" if origin and origin != name else name

    def describe(self) -> str:
        parts = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                parts.append(f"{len(items)} {title} key(s): {', '.join(items[:_SHOW])}{more}")
        if self.mismatched:
            shown = ", ".join(f"{self._named(n)} expected {tuple(e)} got {tuple(g)}"
                              for n, e, g in self.mismatched[:_SHOW])
            more = f" (+{len(self.mismatched) - _SHOW} more)" if len(self.mismatched) > _SHOW else ""
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {shown}{more}")
        if self.wrong_dtype:
            shown = ", ".join(f"{self._named(n)} expected {e} got {g}" for n, e, g in self.wrong_dtype[:_SHOW])
            more = f" (+{len(self.wrong_dtype) - _SHOW} more)" if len(self.wrong_dtype) > _SHOW else ""
            parts.append(f"{len(self.wrong_dtype)} dtype mismatch(es): {shown}{more}")
        return "; ".join(parts) if parts else f"all {len(self.loaded)} parameters loaded"


_NUMPY_DTYPES = {ms.float16: np.float16, ms.float32: np.float32, ms.float64: np.float64, ms.int8: np.int8,
                 ms.int16: np.int16, ms.int32: np.int32, ms.int64: np.int64, ms.uint8: np.uint8, ms.bool_: np.bool_}


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype of a MindSpore dtype (``ms.dtype_to_nptype`` is deprecated and logs a warning per
    call; bfloat16 has no numpy dtype here and is refused)."""
    if dtype not in _NUMPY_DTYPES:
        raise TypeError(f"no numpy dtype for MindSpore {dtype}; parameters are stored as float32 or float16")
    return np.dtype(_NUMPY_DTYPES[dtype])


def dtype_kind_error(param_dtype, value_dtype) -> str:
    """"" when numpy ``value_dtype`` may be cast into a parameter of MindSpore ``param_dtype`` (floats
    into float parameters, integers into integer ones), else what the parameter needs."""
    wants = numpy_dtype(param_dtype).kind
    got = np.dtype(value_dtype).kind
    if wants == "f":
        return "" if got == "f" else "a floating dtype"
    return "" if got in "iu" else "an integer dtype"


def cell_state(cell: nn.Cell) -> Dict[str, np.ndarray]:
    """A snapshot of the cell's parameters as ``{name: numpy array}`` (names as MindSpore reports them).

    Copies: on CPU ``asnumpy`` of a parameter that compiled steps update in place can share its memory."""
    return {p.name: p.asnumpy().copy() for p in cell.get_parameters()}


def load_state(cell: nn.Cell, state: Mapping[str, np.ndarray], strict: bool = True,
               what: str = "checkpoint") -> LoadReport:
    """Copy ``state`` into ``cell``'s parameters, keeping each parameter's dtype.

    Strict (default): any missing, unexpected or mis-shaped entry raises :class:`StateDictError` that
    lists the first few of each kind and the counts, before any parameter is touched. Non-strict: the
    matching entries are loaded and the rest is reported as a warning.
    """
    return load_parameters({p.name: p for p in cell.get_parameters()}, state, strict, what, type(cell).__name__)


def load_parameters(params: Mapping[str, Parameter], state: Mapping[str, np.ndarray], strict: bool = True,
                    what: str = "checkpoint", owner: str = "the parameters") -> LoadReport:
    """:func:`load_state` for a set of parameters by name (part of a cell: e.g. its LoRA adapters)."""
    report = LoadReport()
    report.missing = sorted(n for n in params if n not in state)
    report.unexpected = sorted(n for n in state if n not in params)
    for name, value in state.items():
        if name in params and tuple(params[name].shape) != tuple(np.shape(value)):
            report.mismatched.append((name, tuple(params[name].shape), tuple(np.shape(value))))
        elif name in params and dtype_kind_error(params[name].dtype, np.asarray(value).dtype):
            report.wrong_dtype.append((name, dtype_kind_error(params[name].dtype, np.asarray(value).dtype),
                                       str(np.asarray(value).dtype)))
    if not report.ok:
        message = f"{what} does not fit {owner}: {report.describe()}"
        if strict:
            raise StateDictError(message)
        logger.warning(message)
    bad = {n for n, _, _ in report.mismatched + report.wrong_dtype}
    for name, value in state.items():
        if name in params and name not in bad:
            param = params[name]
            param.set_data(ms.Tensor(np.ascontiguousarray(value), dtype=param.dtype))
            report.loaded.append(name)
    return report
