"""Which options of a diffusers/transformers ``config.json`` a converter honours, and a check that refuses
the rest.

A converter that reads some options and silently skips others produces a model that computes something
else (a diffusers UNet with ``timestep_post_act: "silu"`` adds no weights, so skipping it loses nothing
but correctness). So every option a converter may meet is put in exactly one class:

* ``read``: turned into our config (the converter's parity tests cover it);
* ``fixed``: our model implements only the listed values; any other is refused;
* ``inert``: does not change the computation of the converted model, with the reason;
* anything else is refused as unknown (a newer library may have added it, and we cannot tell whether it
  matters). Names starting with ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``) are
  file metadata.

The tests compare each table with the installed diffusers/transformers classes, so a new option there
shows up as a failing test rather than as a silent difference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Tuple


class UnsupportedOptionError(ValueError):
    """A config option (or option value) the converted model would not honour."""


@dataclass(frozen=True)
class ConfigOptions:
    """The option table of one converter; :meth:`check` refuses a config that steps outside it."""

    what: str  # e.g. "diffusers UNet config", named in every message
    read: Tuple[str, ...]
    fixed: Mapping[str, Tuple[object, ...]] = field(default_factory=dict)  # option -> accepted values
    inert: Mapping[str, str] = field(default_factory=dict)  # option -> why it changes nothing

    def __post_init__(self):
        overlap = (set(self.read) & set(self.fixed)) | (set(self.read) & set(self.inert)) | (
            set(self.fixed) & set(self.inert))
        if overlap:
            raise ValueError(f"{self.what}: options in more than one class: {sorted(overlap)}")

    @property
    def known(self) -> frozenset:
        return frozenset(self.read) | frozenset(self.fixed) | frozenset(self.inert)

    def check(self, config: Mapping) -> None:
        """Raise :class:`UnsupportedOptionError` for a fixed option at another value, or an unknown option."""
        for key, value in config.items():
            accepted = self.fixed.get(key)
            if accepted is not None and not any(_same(value, a) for a in accepted):
                valid = " or ".join(repr(a) for a in accepted)
                raise UnsupportedOptionError(f"{self.what}: {key}={value!r} is not supported (only {valid}); "
                                             "converting anyway would give a model that computes something else")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in self.known)
        if unknown:
            raise UnsupportedOptionError(
                f"{self.what}: option(s) {', '.join(unknown)} unknown to this converter (a newer library version "
                "may have added them); whether they change the computation cannot be told, so the file is "
                "refused")


def _same(value, accepted) -> bool:
    # JSON has no tuples, and 1 == 1.0 == True in Python: compare types for bools, sequences as lists.
    if isinstance(value, bool) or isinstance(accepted, bool):
        return type(value) is type(accepted) and value == accepted
    if isinstance(value, (list, tuple)) and isinstance(accepted, (list, tuple)):
        return list(value) == list(accepted)
    return value == accepted
