"""Does prompt enhancement help? The paper's Fig. 8 in miniature: held-out short prompts drawn as they are and
after each enhancer's rewrite, with the same seeds, measured against what the user asked for.

Per arm (``raw``: the short prompt itself; each named enhancer: its greedy rewrite) and seed: the RAFT reward
(``aesthetic_weight`` x demo aesthetic score + ``clip_weight`` x demo CLIP-score against the SHORT prompt), the
demo aesthetic score, the demo CLIP-score against the SHORT prompt per language, and the demo judge's colour and
shape agreement with the SHORT prompt's colour and shape. A rewrite that drops or changes what the short prompt
asked for shows up as a lower CLIP-score and judge agreement.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np

from ..demo.judge import ShapeClassifier, judge
from .clip_score import SCORE_SCALE, cosine_similarities


def measure_arm(pipe, clip, aesthetic, prompts: Sequence[Mapping[str, str]], drawn: Sequence[str],
                seeds: Sequence[int], settings: Mapping[str, object], aesthetic_weight: float, clip_weight: float,
                classifier: ShapeClassifier) -> Dict[str, object]:
    """Draw ``drawn[i]`` (the text given to the image model for short prompt ``prompts[i]``) once per seed and
    measure each image against ``prompts[i]`` (rows ``short``, ``lang``, ``color``, ``shape``). Returns the
    per-seed means of every metric and the images (seed-major)."""
    per_seed: Dict[str, List[float]] = {}
    images_by_seed = []
    short_features = clip.text_features([p["short"] for p in prompts])
    for seed in seeds:
        images = [np.asarray(image) for image in pipe(list(drawn), seed=seed, **settings).images]
        images_by_seed.append(images)
        features = clip.image_features(images)
        clip_scores = SCORE_SCALE * np.maximum(cosine_similarities(features, short_features), 0.0)
        beauty = aesthetic.score(features)
        colours, shapes = judge(images, classifier)
        both = np.array([c == p["color"] and s == p["shape"] for c, s, p in zip(colours, shapes, prompts)], float)
        values = {"reward": aesthetic_weight * beauty + clip_weight * clip_scores, "aesthetic": beauty,
                  "judge_both_pct": 100.0 * both}
        for lang in sorted({p["lang"] for p in prompts}):
            mask = np.array([p["lang"] == lang for p in prompts])
            values[f"clip_score_{lang}"] = clip_scores[mask]
        for name, value in values.items():
            per_seed.setdefault(name, []).append(float(np.mean(value)))
    return {"per_seed": per_seed, "images": images_by_seed}


def summary_rows(results: Mapping[str, Mapping[str, object]]) -> List[Dict[str, object]]:
    """One row per (metric, arm): mean and std over seeds, and the per-seed values."""
    rows = []
    metrics = list(next(iter(results.values()))["per_seed"])
    for metric in metrics:
        for arm, result in results.items():
            values = result["per_seed"][metric]
            rows.append({"metric": metric, "arm": arm, "mean": float(np.mean(values)), "std": float(np.std(values)),
                         "per_seed": values})
    return rows
