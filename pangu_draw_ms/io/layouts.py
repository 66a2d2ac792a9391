"""Which entries of a checkpoint become which parameters of our cells, and streaming them there.

A *layout* is how a file names one component's weights:

* ``ours``: our parameter names (the files :func:`save_component` and ``tools/convert.py`` write);
* ``sgm``: the released PanGu-Draw files (and SDXL's original ones), a whole model per file under
  ``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE), ``conditioner.embedders.{i}.transformer.``
  (transformers CLIP names) and ``conditioner.embedders.{i}.model.`` (OpenCLIP names); ControlNets
  under ``control_model.``;
* ``diffusers`` (UNet, VAE, ControlNet), ``transformers`` and ``open_clip`` (a text encoder).

A layout is a list of routes: entries under a route's prefix are renamed by one of the mapping
functions of :mod:`pangu_draw_ms.io` (applied to one entry at a time: a fused q/k/v entry becomes three)
and placed under the route's target prefix. Torch-style ``weight``/``bias`` of norms and embeddings
become our ``gamma``/``beta``/``embedding_table`` where the cell has no parameter of the torch name, and a
Linear weight fills a 1x1 convolution (or the reverse).

:func:`plan_component` matches a file against a component's parameters from names and shapes alone (no
tensor data is read), trying every layout of the component and keeping the one that fills the most
parameters; entries of other components are skipped unread. :func:`load_component` then streams the
tensors into a cell one at a time; :func:`convert_component` streams them into a file of our layout.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn
from mindspore.nn.utils import no_init_parameters

from ..config import (
    ConditionerConfig,
    ControlNetConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    VisionEncoderConfig,
    from_dict,
    to_dict,
)
from ..models.clip_text import CLIPTextEncoder
from ..models.clip_vision import CLIPVisionEncoder
from ..models.conditioner import Conditioner
from ..models.controlnet import ControlNet
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL
from .checkpoint import (
    CheckpointReader,
    SaveSummary,
    TensorSource,
    open_checkpoint,
    output_dtype,
    save_checkpoint,
    write_tensors,
)
from .diffusers_controlnet import controlnet_from_diffusers
from .diffusers_unet import unet_from_diffusers
from .diffusers_vae import vae_from_diffusers
from .state import LoadReport, StateDictError, dtype_kind_error, numpy_dtype
from .transformers_clip import clip_text_from_open_clip, clip_text_from_transformers, clip_vision_from_transformers

logger = logging.getLogger(__name__)

Tensors = Dict[str, np.ndarray]

# component name -> (cell class, config class)
COMPONENTS = {
    "unet": (UNetModel, UNetConfig),
    "vae": (AutoencoderKL, VAEConfig),
    "conditioner": (Conditioner, ConditionerConfig),
    "text_encoder": (CLIPTextEncoder, TextEncoderConfig),
    "controlnet": (ControlNet, ControlNetConfig),
    "image_encoder": (CLIPVisionEncoder, VisionEncoderConfig),
}
# Where the released (sgm) files keep each component.
SGM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "conditioner": "conditioner.embedders.",
                "controlnet": "control_model."}
FILE_FORMAT = "pangu_draw_ms"  # metadata "format" of the files we write
_TORCH_TO_MS_LEAF = {"weight": ("gamma", "embedding_table"), "bias": ("beta",)}
_SHOW = 10


@dataclass(frozen=True)
class Route:
    """Entries under ``prefix`` (stripped) go through ``convert`` and land under ``target``."""

    prefix: str
    convert: Callable[[Tensors], Tensors]
    target: str = ""


@dataclass(frozen=True)
class Layout:
    name: str
    routes: Tuple[Route, ...]

    def route(self, key: str) -> Optional[Route]:
        return next((r for r in self.routes if key.startswith(r.prefix)), None)


def _same_names(state: Tensors) -> Tensors:
    return dict(state)


def layouts(component: str, config) -> Tuple[Layout, ...]:
    """The layouts a file may use for ``component`` of architecture ``config``."""
    ours = Layout("ours", (Route("", _same_names),))
    sgm_prefix = SGM_PREFIXES.get(component)
    if component == "unet":
        return (ours, Layout("sgm", (Route(sgm_prefix, _same_names),)),
                Layout("diffusers", (Route("", partial(unet_from_diffusers, config=config)),)))
    if component == "vae":
        return (ours, Layout("sgm", (Route(sgm_prefix, _same_names),)),
                Layout("diffusers", (Route("", partial(vae_from_diffusers, config=config)),)))
    if component == "conditioner":
        routes = []
        for i in range(len(config.encoders)):
            routes += [Route(f"{sgm_prefix}{i}.transformer.", clip_text_from_transformers, f"encoders.{i}."),
                       Route(f"{sgm_prefix}{i}.model.", clip_text_from_open_clip, f"encoders.{i}.")]
        return ours, Layout("sgm", tuple(routes))
    if component == "text_encoder":
        return (ours, Layout("transformers", (Route("", clip_text_from_transformers),)),
                Layout("open_clip", (Route("", clip_text_from_open_clip),)))
    if component == "controlnet":
        return (ours, Layout("sgm", (Route(sgm_prefix, _same_names),)),
                Layout("diffusers", (Route("", partial(controlnet_from_diffusers, config=config)),)))
    if component == "image_encoder":
        return ours, Layout("transformers", (Route("", clip_vision_from_transformers),))
    raise ValueError(f"unknown component {component!r}; valid: {', '.join(COMPONENTS)}")


def component_of(cell: nn.Cell) -> str:
    for name, (cell_class, _) in COMPONENTS.items():
        if isinstance(cell, cell_class):
            return name
    raise TypeError(f"{type(cell).__name__} is not a component; components are "
                    + ", ".join(f"{c.__name__} ({n})" for n, (c, _) in COMPONENTS.items()))


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; valid: {', '.join(COMPONENTS)}")


# ---- planning ------------------------------------------------------------------------------------

# A parameter's shape and MindSpore dtype, by name.
Expected = Mapping[str, Tuple[Tuple[int, ...], object]]


def cell_parameters(cell: nn.Cell) -> Dict[str, ms.Parameter]:
    """``cell``'s parameters by their names relative to ``cell``: a sub-cell such as
    ``conditioner.encoders[0]`` loads and saves like a stand-alone one."""
    return dict(cell.parameters_and_names())


def expected_parameters(cell: nn.Cell) -> Dict[str, Tuple[Tuple[int, ...], object]]:
    return {name: (tuple(p.shape), p.dtype) for name, p in cell_parameters(cell).items()}


def build_component(component: str, config, dtype=ms.float32, materialize: bool = True) -> nn.Cell:
    """The cell of ``component``; with ``materialize=False`` its parameters are not allocated (names and
    shapes only, for planning or for loading into)."""
    _check_component(component)
    cell_class, config_class = COMPONENTS[component]
    if not isinstance(config, config_class):
        raise TypeError(f"component {component!r} needs a {config_class.__name__}, got {type(config).__name__}")
    if materialize:
        return cell_class(config, dtype=dtype)
    with no_init_parameters():
        return cell_class(config, dtype=dtype)


@dataclass
class ComponentReport(LoadReport):
    """A :class:`LoadReport` for one component of one file, with the layout found and the entries left
    alone: ``skipped`` (outside this component, never read) and ``ignored`` (dropped by the mapping,
    e.g. OpenCLIP's ``logit_scale``)."""

    path: str = ""
    component: str = ""
    layout: str = ""
    skipped: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.component} from {os.path.basename(self.path)} ({self.layout} layout): {self.describe()}; "
                f"{len(self.skipped)} entries of other components skipped, {len(self.ignored)} ignored")


@dataclass
class ComponentPlan:
    """How the entries of one file fill one component: which entries to read, in file order, and the
    parameters each produces (raw mapped name, our name, shape, dtype)."""

    report: ComponentReport
    reads: List[Tuple[str, Route, List[Tuple[str, str, Tuple[int, ...], np.dtype]]]]
    loadable: set
    duplicates: List[str]  # entries that map onto a parameter another entry already fills

    @property
    def matched(self) -> int:
        """How many of the component's parameters the file names (fitting or not)."""
        return len(self.report.mismatched) + len(self.report.wrong_dtype) + len(self.loadable)

    def sources(self, reader: CheckpointReader) -> List[TensorSource]:
        """One :data:`TensorSource` per loadable parameter, in file order. Each file entry is read (and
        mapped) once, when its first parameter is asked for; only the latest entry is kept."""
        latest: Dict[str, object] = {"key": None, "values": None}

        def load(key: str, route: Route, raw: str) -> np.ndarray:
            if latest["key"] != key:
                latest["key"], latest["values"] = None, None  # drop the previous entry before reading
                latest["values"] = route.convert({key[len(route.prefix):]: reader.get(key)})
                latest["key"] = key
            return latest["values"][raw]

        def load_as(key: str, route: Route, raw: str, shape: Tuple[int, ...]) -> np.ndarray:
            return np.reshape(load(key, route, raw), shape)

        return [(ours, shape, dtype, partial(load_as, key, route, raw, shape))
                for key, route, targets in self.reads
                for raw, ours, shape, dtype in targets if ours in self.loadable]

    def total_bytes(self, float_dtype=None) -> int:
        """Bytes of the loadable tensors, floating ones counted as ``float_dtype`` (None: as stored)."""
        def itemsize(dtype):
            if float_dtype is not None and np.dtype(dtype).kind == "f":
                return np.dtype(float_dtype).itemsize
            return np.dtype(dtype).itemsize

        return sum(int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)
                   for _, _, targets in self.reads for _, ours, shape, dtype in targets if ours in self.loadable)


def _our_name(name: str, expected: Expected) -> str:
    if name in expected:
        return name
    module, _, leaf = name.rpartition(".")
    for alternative in _TORCH_TO_MS_LEAF.get(leaf, ()):
        if f"{module}.{alternative}" in expected:
            return f"{module}.{alternative}"
    return name


def _same_but_unit_axes(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    """Shapes equal up to trailing axes of size 1: (C, C) and (C, C, 1, 1) hold the same weight, as a
    Linear layer and as a 1x1 convolution (VAE attention and UNet proj_in/proj_out come both ways)."""
    def strip(shape):
        while shape and shape[-1] == 1:
            shape = shape[:-1]
        return shape

    return len(a) != len(b) and strip(a) == strip(b)


def _match(reader: CheckpointReader, component: str, layout: Layout, expected: Expected) -> ComponentPlan:
    """Map every entry's name and shape through ``layout`` (on zero-stride stand-ins: no data is read)."""
    report = ComponentReport(path=reader.path, component=component, layout=layout.name)
    reads = []
    produced: Dict[str, str] = {}  # our name -> the file entry it comes from
    duplicates: List[str] = []
    for key in reader.keys():
        route = layout.route(key)
        if route is None:
            report.skipped.append(key)
            continue
        info = reader.info(key)
        dtype = np.dtype(np.float32 if info.dtype == "bfloat16" else info.dtype)
        stand_in = np.broadcast_to(np.zeros((), dtype), info.shape)
        try:
            mapped = route.convert({key[len(route.prefix):]: stand_in})
        except (ValueError, KeyError):  # a name the mapping does not know
            report.unexpected.append(key)
            continue
        if not mapped:
            report.ignored.append(key)
            continue
        targets = []
        for raw, value in mapped.items():
            ours = _our_name(route.target + raw, expected)
            if ours in produced:
                duplicates.append(f"{produced[ours]!r} and {key!r} both map onto {ours!r}")
                continue
            produced[ours] = key
            shape = tuple(np.shape(value))
            if ours in expected and _same_but_unit_axes(tuple(expected[ours][0]), shape):
                shape = tuple(expected[ours][0])  # a Linear weight for a 1x1 conv, or the reverse
            targets.append((raw, ours, shape, dtype))
            if ours not in expected:
                if report.unexpected[-1:] != [key]:  # a fused entry reports once
                    report.unexpected.append(key)
            elif tuple(expected[ours][0]) != shape:
                report.mismatched.append((ours, tuple(expected[ours][0]), shape))
                report.origins[ours] = key
            elif dtype_kind_error(expected[ours][1], dtype):
                report.wrong_dtype.append((ours, dtype_kind_error(expected[ours][1], dtype), dtype.name))
                report.origins[ours] = key
        reads.append((key, route, targets))
    report.missing = sorted(n for n in expected if n not in produced)
    bad = {n for n, _, _ in report.mismatched + report.wrong_dtype}
    loadable = {n for n in produced if n in expected and n not in bad}
    return ComponentPlan(report, reads, loadable, duplicates)


def group_names(names, shown: int = 6) -> str:
    """``a.b.* (count), ...``: names summarised by their first two parts, the largest groups first."""
    groups = Counter(".".join(name.split(".")[:2]) for name in names)
    text = ", ".join(f"{group}.* ({count})" for group, count in groups.most_common(shown))
    return text + (f", +{len(groups) - shown} more groups" if len(groups) > shown else "")


def _describe_contents(reader: CheckpointReader) -> str:
    return f"its {len(reader)} entries are {group_names(reader.keys())}" if len(reader) else "it is empty"


def plan_component(reader: CheckpointReader, component: str, expected: Expected, config,
                   layout: Optional[str] = None) -> ComponentPlan:
    """Match ``reader``'s entries against the parameters ``expected`` of ``component`` (``config``).

    Tries each layout of the component (or only ``layout``) and keeps the one that fills the most
    parameters. Raises :class:`StateDictError` when the file is one of our files of another component,
    or when no layout finds any of the component's weights (a missing component or another model's file).
    """
    _check_component(component)
    recorded = reader.metadata.get("component")
    if reader.metadata.get("format") == FILE_FORMAT and recorded and recorded != component:
        raise StateDictError(f"{reader.path} is a {FILE_FORMAT} {recorded} file, not a {component} file")
    candidates = layouts(component, config)
    if layout is not None:
        candidates = tuple(c for c in candidates if c.name == layout)
        if not candidates:
            raise ValueError(f"layout {layout!r} is not a layout of {component}; valid: "
                             f"{', '.join(c.name for c in layouts(component, config))}")
    best = None
    for candidate in candidates:
        plan = _match(reader, component, candidate, expected)
        if best is None or plan.matched > best.matched:
            best = plan
    if best.matched == 0:
        raise StateDictError(f"{reader.path} holds no {component} weights in the "
                             f"{'/'.join(c.name for c in candidates)} layout(s): {_describe_contents(reader)}")
    if best.duplicates:
        raise StateDictError(f"{reader.path}: in the {best.report.layout} layout, {'; '.join(best.duplicates[:_SHOW])} "
                             "(a file holding two copies of one weight, e.g. new and legacy names?)")
    return best


def _enforce(plan: ComponentPlan, strict: bool, target: str) -> None:
    report = plan.report
    if report.ok:
        return
    message = (f"{report.path}: the {report.layout}-layout {report.component} weights do not fit {target}: "
               f"{report.describe()}. Is the config the file's architecture, and the file the right model?")
    if strict:
        raise StateDictError(message)
    logger.warning(message)


def _start(progress, plan: ComponentPlan, float_dtype=None) -> None:
    if progress is not None:
        progress.total = (progress.total or 0) + plan.total_bytes(float_dtype)
        if hasattr(progress, "refresh"):
            progress.refresh()


def _opened(source: Union[str, CheckpointReader]):
    """A reader for ``source``, and whether we opened it (and must close it)."""
    if isinstance(source, CheckpointReader):
        return source, False
    return open_checkpoint(source), True


def _contiguous(value: np.ndarray, dtype) -> np.ndarray:
    value = np.asarray(value, dtype=dtype)
    return value if value.flags.c_contiguous else value.copy(order="C")


def load_component(cell: nn.Cell, source: Union[str, CheckpointReader], component: Optional[str] = None,
                   strict: bool = True, layout: Optional[str] = None, progress=None) -> ComponentReport:
    """Load ``cell``'s weights from a checkpoint file of any known layout, one tensor at a time.

    ``source``: a path (``.safetensors``, ``.ckpt``, shard index, model folder, safe ``.bin``) or an open
    reader. ``component`` defaults to the cell's kind. Each tensor is read, mapped, cast to its
    parameter's dtype and set before the next is read: peak memory is the cell plus one tensor. Build
    the cell with ``build_component(..., materialize=False)`` to skip allocating its random init.

    Strict (default): a missing, unexpected, mis-shaped or wrongly typed entry raises
    :class:`StateDictError` listing the first few of each kind with counts, before any parameter is
    touched. Non-strict: those are logged as a warning and the rest is loaded. ``progress``: a tqdm bar
    (anything with ``total`` and ``update(n)``), given the bytes to load and advanced per tensor.
    """
    component = component or component_of(cell)
    reader, owned = _opened(source)
    try:
        plan = plan_component(reader, component, expected_parameters(cell), cell.config, layout)
        _enforce(plan, strict, type(cell).__name__)
        _start(progress, plan)
        params = cell_parameters(cell)
        for name, _, _, load in plan.sources(reader):
            param = params[name]
            stored = load()
            param.set_data(Tensor.from_numpy(_contiguous(stored, numpy_dtype(param.dtype))))
            plan.report.loaded.append(name)
            if progress is not None:
                progress.update(stored.nbytes)
    finally:
        if owned:
            reader.close()
    logger.info(plan.report.summary())
    return plan.report


def component_metadata(component: str, config, **extra) -> Dict[str, str]:
    """The metadata our files carry: format, component and its config (JSON), plus ``extra``."""
    metadata = {"format": FILE_FORMAT, "component": component, "config": json.dumps(to_dict(config))}
    metadata.update({k: str(v) for k, v in extra.items()})
    return metadata


def component_config(metadata: Mapping[str, str]):
    """``(component, config)`` recorded in the metadata of one of our files."""
    component = metadata.get("component")
    if metadata.get("format") != FILE_FORMAT or component not in COMPONENTS or "config" not in metadata:
        raise StateDictError(f"the metadata does not describe a {FILE_FORMAT} component file (format "
                             f"{metadata.get('format')!r}, component {component!r})")
    return component, from_dict(COMPONENTS[component][1], json.loads(metadata["config"]), where=component)


def save_component(cell: nn.Cell, path: str, dtype: Optional[str] = None,
                   metadata: Optional[Mapping[str, str]] = None) -> SaveSummary:
    """Atomically save ``cell`` in our layout, recording its component and config in the metadata."""
    merged = component_metadata(component_of(cell), cell.config)
    merged.update(metadata or {})
    return save_checkpoint(cell, path, dtype=dtype, metadata=merged)


def convert_component(source: Union[str, CheckpointReader], component: str, config, path: str,
                      dtype: Optional[str] = None, strict: bool = True, layout: Optional[str] = None,
                      metadata: Optional[Mapping[str, str]] = None, progress=None
                      ) -> Tuple[ComponentReport, SaveSummary]:
    """Convert ``component`` of a file in any known layout into a file of our layout at ``path``.

    Checked like :func:`load_component` against the parameters of ``config``'s cell (built without
    allocating them); tensors stream from the source to a ``.safetensors`` output one at a time (a
    ``.ckpt`` output is written by MindSpore from all tensors at once). ``dtype``: ``fp32``/``fp16``.
    ``progress``: as in :func:`load_component`. Any failure leaves an existing ``path`` untouched.
    """
    reader, owned = _opened(source)
    try:
        expected = expected_parameters(build_component(component, config, materialize=False))
        plan = plan_component(reader, component, expected, config, layout)
        _enforce(plan, strict, f"{COMPONENTS[component][0].__name__}({type(config).__name__})")
        merged = component_metadata(component, config, source=os.path.basename(reader.path),
                                    source_layout=plan.report.layout)
        merged.update(metadata or {})
        sources = plan.sources(reader)
        _start(progress, plan, output_dtype(dtype))
        summary = write_tensors(path, sources, dtype=dtype, metadata=merged,
                                progress=None if progress is None else lambda name, n: progress.update(n))
        plan.report.loaded = [name for name, _, _, _ in sources]
    finally:
        if owned:
            reader.close()
    return plan.report, summary
