"""An evaluation run's report: ``report.json`` (everything, machine-readable) and ``report.md`` (one table).

A metric is measured once per sampling seed, over that seed's images, per prompt language where it is a
per-language measure (CLIP-scores) and over all images otherwise (``all``); the report gives each seed's
value and their mean and standard deviation, so a difference between two models can be held against the
spread between seeds.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Sequence

import numpy as np

from ..io.checkpoint import atomic_output

# metric name -> what the report calls it (the demo measures say what they are: not FID, not CLIP-score)
METRIC_TITLES = {
    "fid": "FID (Inception-v3 pool features)",
    "is": "Inception Score",
    "clip": "CLIP-score",
    "cnclip": "CN-CLIP-score",
    "democlip": "demo CLIP-score (demo CLIP, not OpenAI CLIP)",
    "fd_democlip": "FD-demoCLIP (Fréchet distance in demo-CLIP image features, not FID)",
    "is_democlip": "IS-demoCLIP (the IS formula over demo-CLIP zero-shot colour x shape classes, not IS)",
    "judge": "demo judge: colour and shape both right (%)",
}


def summarise(per_seed: Sequence[float]) -> Dict[str, object]:
    """Mean and (population) standard deviation of one metric's per-seed values."""
    values = [float(v) for v in per_seed]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}


def collect(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> Dict[str, Dict[str, Dict[str, object]]]:
    """``[{metric: {group: value}} per seed]`` -> ``{metric: {group: summary}}``."""
    metrics: Dict[str, Dict[str, List[float]]] = {}
    for values in per_seed:
        for metric, groups in values.items():
            for group, value in groups.items():
                metrics.setdefault(metric, {}).setdefault(group, []).append(value)
    return {metric: {group: summarise(values) for group, values in groups.items()}
            for metric, groups in metrics.items()}


def markdown(report: Mapping) -> str:
    """``report.md``: what was evaluated, then one row per metric and group."""
    settings = ", ".join(f"{k} {v}" for k, v in report["settings"].items() if v is not None)
    lines = [f"# Evaluation of {report['model']}", "",
             f"{report['images']} images: {report['prompts']['count']} prompts ({report['prompts']['source']}; "
             + ", ".join(f"{n} {lang}" for lang, n in report["prompts"]["languages"].items())
             + f") x seeds {report['seeds']}; {settings}.", "",
             "| metric | prompts | mean | std | per seed |", "|---|---|---|---|---|"]
    for metric, groups in report["metrics"].items():
        for group, summary in groups.items():
            per_seed = ", ".join(f"{v:.3f}" for v in summary["per_seed"])
            lines.append(f"| {METRIC_TITLES.get(metric, metric)} | {group} | {summary['mean']:.3f} | "
                         f"{summary['std']:.3f} | {per_seed} |")
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    lines += ["", f"Time: {seconds}."]
    return "\n".join(lines) + "\n"


def write_report(folder: str, report: Mapping) -> Dict[str, str]:
    """Write ``report.json`` and ``report.md`` into ``folder`` (each atomically); returns their paths."""
    paths = {"json": os.path.join(folder, "report.json"), "md": os.path.join(folder, "report.md")}
    for kind, text in (("json", json.dumps(report, ensure_ascii=False, indent=1) + "\n"), ("md", markdown(report))):
        with atomic_output(paths[kind]) as partial, open(partial, "w", encoding="utf-8") as f:
            f.write(text)
    return paths
