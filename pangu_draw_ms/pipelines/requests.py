"""Checks of a generation request - the arguments of :meth:`PanGuDrawPipeline.__call__
<pangu_draw_ms.pipelines.pangu_draw.PanGuDrawPipeline.__call__>` and ``plan`` - before any model is loaded
or any step computed; the Python API and tools/infer.py share them, so both refuse the same requests.

Every message names the option, the bad value and what is valid ("guidance_scale must be a finite number
>= 0, got nan"). Values are checked, not coerced: the string "2" is not a count, True is not a seed (bool is
an int in Python), NaN and inf are no guidance scale - each would otherwise run to the end and write a
black or saturated image, or fail deep inside with a generic TypeError. What depends on the model (bucket
sizes, the upper bound of t_struct, the shape of given noise) the pipeline's ``plan`` checks next, still
before any network is built. ``names`` maps an argument to the name its user typed (the CLI's flags).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..diffusion.experts import STRUCTURE, SWITCH_RULES, TEXTURE
from ..diffusion.guidance import STYLE_PREFIXES
from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedule import SPACINGS
from ..images import load_image

Names = Optional[Mapping[str, str]]


class RequestError(ValueError):
    """A generation request with an argument of the wrong type or out of its valid range.

    ``argument``: the API argument a model-dependent check refused, the first word of the message; a caller
    whose users typed other names (the CLI's flags) re-raises :meth:`named` so that the message uses theirs.
    """

    def __init__(self, message: str, argument: Optional[str] = None):
        super().__init__(message)
        self.argument = argument

    def named(self, names: Names) -> "RequestError":
        """This error with its argument called as ``names`` says (itself when there is nothing to rename)."""
        label = _label(self.argument, names) if self.argument else None
        if label is None or label == self.argument:
            return self
        return RequestError(label + str(self)[len(self.argument):], label)


def _shown(value) -> str:
    """``value`` as a message shows it: numpy scalars as the Python values they hold (nan, 1.5, '2')."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return _is_integer(value) or isinstance(value, (float, np.floating))


def check_integer(label: str, value, minimum: int) -> int:
    """``value`` as an int, when it is an integer (not a bool, float or string) >= ``minimum``."""
    if not _is_integer(value) or value < minimum:
        raise RequestError(f"{label} must be an integer >= {minimum}, got {_shown(value)}")
    return int(value)


def check_number(label: str, value, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False) -> float:
    """``value`` as a float, when it is a finite real number (not a bool or string) in the range."""
    if low is not None and high is not None:
        valid = f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        valid = "" if low is None else f" {'>' if low_open else '>='} {low:g}"
    if (not _is_number(value) or not math.isfinite(value)
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and value > high)):
        raise RequestError(f"{label} must be a finite number{valid}, got {_shown(value)}")
    return float(value)


def _choice(options):
    def check(label, value, names):
        if value not in options:
            raise RequestError(f"{label} must be one of {', '.join(map(str, options))}; got {_shown(value)}")
    return check


def _string(label, value, names):
    if not isinstance(value, str):
        raise RequestError(f"{label} must be a string, got {_shown(value)}")


def _flag(label, value, names):
    if not isinstance(value, (bool, np.bool_)):
        raise RequestError(f"{label} must be True or False, got {_shown(value)}")


def _integer(minimum):
    return lambda label, value, names: check_integer(label, value, minimum)


def _number(low=None, high=None, low_open=False):
    return lambda label, value, names: check_number(label, value, low, high, low_open)


def _scales(label, value, names):
    """style_scales: {style: scale >= 0}, each scale named as its own option (the CLI's --anime-scale ...)."""
    if not isinstance(value, Mapping):
        raise RequestError(f"{label} must be a dict {{style: scale}}, got {_shown(value)}")
    for style, scale in value.items():
        if style not in STYLE_PREFIXES:
            raise RequestError(f"{label} names the unknown style {_shown(style)}; valid: "
                               f"{', '.join(STYLE_PREFIXES)}")
        check_number(_label(f"style_scales[{style!r}]", names), scale, 0.0)


def _sampler_options(label, value, names):
    """sampler_options: {option: finite number} (the sampler itself checks which options and ranges it takes)."""
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise RequestError(f"{label} must be a dict {{option name: value}}, got {_shown(value)}")
    for key, option in value.items():
        check_number(_label(f"sampler_options[{key!r}]", names), option)


# What each setting of a request may be; None (the config's default) is valid for the ones in _OPTIONAL.
_CHECKS: Dict[str, Callable] = {
    "negative_prompt": _string,
    "height": _integer(1),
    "width": _integer(1),
    "ratio": _string,
    "snap_to_bucket": _flag,
    "num_inference_steps": _integer(1),
    "sampler": _choice(tuple(sorted(SAMPLERS))),
    "spacing": _choice(SPACINGS),
    "guidance_scale": _number(0.0),
    "style_scales": _scales,
    "guidance_rescale": _number(0.0, 1.0),
    "t_struct": _integer(0),
    "switch_rule": _choice(SWITCH_RULES),
    "single_model": _choice((STRUCTURE, TEXTURE)),
    "seed": _integer(0),
    "num_images_per_prompt": _integer(1),
    "first_image_index": _integer(0),
    "sampler_options": _sampler_options,
    "strength": _number(0.0, 1.0, low_open=True),
    "output_type": _choice(("pil", "latent")),
    "compiled": _flag,
    "bucket_list": _choice(("structure", "texture")),
}
_OPTIONAL = {"negative_prompt", "height", "width", "ratio", "num_inference_steps", "sampler", "spacing",
             "guidance_scale", "style_scales", "t_struct", "switch_rule", "single_model", "sampler_options",
             "strength", "compiled"}


def _label(name: str, names: Names) -> str:
    return (names or {}).get(name, name)


def check_settings(settings: Mapping[str, object], names: Names = None) -> None:
    """Check every setting of a request (the keyword arguments of ``plan``, ``strength``, ``output_type``,
    ``compiled``); an unknown name is an error too."""
    for name, value in settings.items():
        if name not in _CHECKS:
            raise RequestError(f"unknown setting {name!r}; valid: {', '.join(sorted(_CHECKS))}")
        if value is None and name in _OPTIONAL:
            continue
        _CHECKS[name](_label(name, names), value, names)


def check_prompts(prompt, names: Names = None) -> List[str]:
    """The prompts of a request: one string or a non-empty list of strings, none of them blank."""
    label = _label("prompt", names)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError(f"{label} must be a string or a non-empty list of strings, got {_shown(prompt)}")
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise RequestError(f"{label} {i + 1} must be a string, got {_shown(text)}")
        if not text.strip():
            raise RequestError(f"{label} {i + 1} is empty: every prompt must be a non-empty string (the "
                               "negative prompt may be empty)")
    return list(prompts)


def load_init_image(source, names: Names = None) -> Image.Image:
    """The image-to-image starting image as a PIL RGB image (read once, before any model is built), or a
    RequestError saying why it is no image; a missing file stays a FileNotFoundError."""
    label = _label("init_image", names)
    try:
        return load_image(source, label)
    except TypeError as error:  # its message starts with the label
        raise RequestError(str(error)) from None
    except UnidentifiedImageError as error:
        raise RequestError(f"{label}: {error}") from None


def check_noise(noise, names: Names = None) -> np.ndarray:
    """Given initial noise as float32 (B, C, h, w): a real, finite 4-d array (its shape the run checks)."""
    label = _label("noise", names)
    array = np.asarray(noise) if isinstance(noise, (np.ndarray, list, tuple)) else None
    if array is None or array.ndim != 4 or not (np.issubdtype(array.dtype, np.floating)
                                                 or np.issubdtype(array.dtype, np.integer)):
        shown = f"an array of dtype {array.dtype} and shape {array.shape}" if array is not None \
            else f"a {type(noise).__name__}"
        raise RequestError(f"{label} must be a real array (B, C, h, w), got {shown}")
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise RequestError(f"{label} holds {bad} NaN or infinite value(s); initial noise must be finite")
    return array.astype(np.float32)


def check_noise_file(path: str, names: Names = None) -> np.ndarray:
    """The noise of a .npy file (pickles refused), checked as :func:`check_noise`; errors name the file."""
    label = _label("noise", names)
    if not os.path.isfile(path):
        raise RequestError(f"{label} {path!r} does not exist (or is not a file)")
    try:
        noise = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise RequestError(f"{label} {path!r} is not a numpy .npy array: {error}") from None
    return check_noise(noise[None] if noise.ndim == 3 else noise, {"noise": f"{label} {path!r}"})
