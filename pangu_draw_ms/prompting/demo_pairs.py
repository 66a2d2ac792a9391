"""The demo world's (short -> enriched) prompt pairs, in English and Chinese, from its caption grammar.

The paper's enhancer learns from human-annotated pairs where the annotator added background and style to a
succinct prompt. In the demo world (:mod:`pangu_draw_ms.demo.shapes`) a short prompt names a colour and a
shape ("a red circle" / "一个红色的圆形"), sometimes one more attribute ("a big red circle"); its enriched
prompt is the full caption of a scene with those attributes kept and the missing ones - size, position,
background, all of which the demo model was trained to follow - filled in at random ("a big red circle on the
left on a white background" / "白色背景上左边有一个红色的大圆形").

Held out: one shape per colour (6 of the 24 colour x shape pairs, every colour and every shape still seen in
training), so the enhancer is measured on short prompts whose colour-shape combination it never rewrote.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..demo.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, captions

LANGUAGES = ("en", "zh")
TRAIN_PAIRS = "train.jsonl"
HELDOUT_PROMPTS = "heldout.jsonl"
TOKENIZER_PREFIX = "tokenizer"


def heldout_color_shapes() -> List[Tuple[str, str]]:
    """The (colour, shape) pairs no training pair shows: colour i with shape i mod 4."""
    shapes = list(SHAPES)
    return [(color, shapes[i % len(shapes)]) for i, color in enumerate(COLORS)]


def _caption(scene: Scene, mention: Sequence[bool], lang: str) -> str:
    english, chinese = captions(scene, tuple(mention))
    return english if lang == "en" else chinese


def short_prompt(color: str, shape: str, lang: str) -> str:
    """The bare short prompt of a colour and a shape ("a red circle" / "一个红色的圆形")."""
    return _caption(Scene(color, shape, "small", "center", "white", 0, 0), (False, False, False), lang)


def random_pair(rng: np.random.Generator, color: str, shape: str, lang: str) -> Dict[str, str]:
    """One pair for ``color`` ``shape``: the short prompt names nothing else (probability 1/2) or one of size,
    position, background; the enriched prompt names all three, keeping the one the short prompt named."""
    scene = Scene(color, shape, list(SIZES)[rng.integers(len(SIZES))], list(POSITIONS)[rng.integers(len(POSITIONS))],
                  list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], 0, 0)
    mention = [False, False, False]
    if rng.random() < 0.5:
        mention[int(rng.integers(3))] = True
    return {"short": _caption(scene, mention, lang), "enriched": _caption(scene, (True, True, True), lang),
            "lang": lang, "color": color, "shape": shape}


def heldout_prompt_rows() -> List[Dict[str, str]]:
    """The bare short prompts of the held-out colour-shape pairs, each in both languages (rows ``short``,
    ``lang``, ``color``, ``shape``): what the enhancers are measured on."""
    return [{"short": short_prompt(color, shape, lang), "lang": lang, "color": color, "shape": shape}
            for color, shape in heldout_color_shapes() for lang in LANGUAGES]


def write_pairs(directory: str, num_pairs: int, seed: int = 0, vocab_size: int = 200) -> Dict[str, object]:
    """``directory/train.jsonl`` (``num_pairs`` pairs of the non-held-out colour-shape pairs, both languages),
    ``directory/heldout.jsonl`` (the held-out bare short prompts, both languages) and ``directory/tokenizer.model``
    (SentencePiece BPE + jieba, whole-word pieces, trained on the training pairs' texts). Deterministic in ``seed``."""
    from ..tokenizers import train

    os.makedirs(directory, exist_ok=True)
    held = set(heldout_color_shapes())
    seen = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]
    rng = np.random.default_rng([seed, 19])
    rows = []
    for _ in range(num_pairs):
        color, shape = seen[int(rng.integers(len(seen)))]
        rows.append(random_pair(rng, color, shape, LANGUAGES[int(rng.integers(len(LANGUAGES)))]))
    with open(os.path.join(directory, TRAIN_PAIRS), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(os.path.join(directory, HELDOUT_PROMPTS), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in heldout_prompt_rows())
    texts = [row[key] for row in rows for key in ("short", "enriched")]
    tokenizer = train(texts, os.path.join(directory, TOKENIZER_PREFIX), vocab_size, jieba=True, model_type="bpe")
    return {"train": len(rows), "heldout": 2 * len(held), "tokenizer": tokenizer}
