"""Evaluation prompts from the files people evaluate text-to-image models with.

* plain text: one prompt per line (blank lines skipped);
* JSONL: one object per line with ``prompt`` (or ``caption``), optionally ``lang`` (``en``/``zh``) and ``id``;
* COCO captions JSON (``captions_val2014.json``): every entry of ``annotations`` (``image_id``, ``caption``);
* COCO-CN (``*.txt`` whose lines are ``<image id>#<n><TAB><caption>``, the COCO-CN release's caption files).

Every prompt gets a language: the file's, else ``zh`` when it holds a CJK character, else ``en``. The paper
evaluates FID on 30k COCO captions and CN-CLIP-score on COCO-CN: :func:`sample_prompts` draws such a subset,
the same for every run with the same seed.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

LANGUAGES = ("en", "zh")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_COCO_CN_LINE = re.compile(r"^([^\t#]+)#(\d+)\t(.+)$")


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to draw: its text, language, and an id in its source (a COCO image id, a line number)."""

    text: str
    lang: str
    key: str


def language_of(text: str) -> str:
    """``zh`` when the text holds a CJK ideograph, else ``en``."""
    return "zh" if _CJK.search(text) else "en"


def _prompt(text: str, key: str, lang: Optional[str], where: str) -> EvalPrompt:
    text = str(text).strip()
    if not text:
        raise ValueError(f"{where}: empty prompt")
    lang = lang or language_of(text)
    if lang not in LANGUAGES:
        raise ValueError(f"{where}: language {lang!r} is not one of {', '.join(LANGUAGES)}")
    return EvalPrompt(text, lang, key)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_prompts(path: str, lang: Optional[str] = None) -> List[EvalPrompt]:
    """The prompts of ``path`` (format from its content and suffix, see the module docstring); ``lang``
    overrides every prompt's language."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} does not exist")
    text = _read_text(path)
    if path.endswith(".json"):
        prompts = _coco_captions(text, path, lang)
    elif path.endswith(".jsonl"):
        prompts = _jsonl(text, path, lang)
    else:
        lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if lines and all(_COCO_CN_LINE.match(line) for _, line in lines):
            prompts = [_prompt(m.group(3), f"{m.group(1)}#{m.group(2)}", lang or "zh", f"{path}:{n}")
                       for n, m in ((n, _COCO_CN_LINE.match(line)) for n, line in lines)]
        else:
            prompts = [_prompt(line, str(n), lang, f"{path}:{n}") for n, line in lines]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt")
    return prompts


def _jsonl(text: str, path: str, lang: Optional[str]) -> List[EvalPrompt]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt", row.get("caption")), str):
            raise ValueError(f"{path}:{n}: each line must be an object with a 'prompt' (or 'caption') string")
        prompts.append(_prompt(row.get("prompt", row.get("caption")), str(row.get("id", n)), lang or row.get("lang"),
                               f"{path}:{n}"))
    return prompts


def _coco_captions(text: str, path: str, lang: Optional[str]) -> List[EvalPrompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: a COCO captions file has an 'annotations' list of {{image_id, caption}}; "
                         "for one prompt per line use .txt or .jsonl")
    return [_prompt(a.get("caption", ""), f"{a.get('image_id')}#{a.get('id', i)}", lang, f"{path}: annotation {i}")
            for i, a in enumerate(annotations)]


def sample_prompts(prompts: Sequence[EvalPrompt], count: Optional[int], seed: int = 0) -> List[EvalPrompt]:
    """``count`` prompts drawn without replacement (seeded; their order in the source kept), or all of them."""
    if count is None or count >= len(prompts):
        return list(prompts)
    if count < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {count}")
    chosen = np.sort(np.random.default_rng(seed).choice(len(prompts), size=count, replace=False))
    return [prompts[i] for i in chosen]
