"""Reproduce the paper's ablations (Tables 4-6) in miniature: train every arm, evaluate it, write the tables.

    python tools/ablate.py --config ablation/demo [--arms pair_t500 resolution_boost] [--plan]

Every arm's training runs are ``tools/train.py`` runs (resumed when stopped: run the same command again),
exported into ``WORK/models/<arm>``; each model is then measured by ``tools/evaluate.py`` (the demo
evaluators for a demo-world base model: FD-demoCLIP, IS-demoCLIP, demo CLIP-score, the judge) into
``WORK/eval/<arm>``, also resumable. ``WORK/tables.md`` and ``tables.json`` hold one table per paper table
(mean and spread over the sampling seeds, the paper's numbers beside ours); ``WORK/plan.json`` the arms and
the equal-compute accounting. ``--plan`` prints the plan and the accounting only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The paper's values (COCO, FID / IS / CLIP-score; Tables 4 and 5 as printed; Table 6 prints no values in
# our copy, only that 500 is best).
PAPER = {
    "table4": {"resolution_boost": (106.12, 10.46, 22.9), "pair_t500": (87.66, 11.07, 23.4)},
    "table5": {"pair_t500": (87.66, 11.07, 23.4), "structure_high_only": (89.52, 10.96, 23.2),
               "texture_high_res": (90.98, 10.59, 23.3)},
}
# The paper's metrics, in the order of config.metrics' first three, and which direction is better.
PAPER_METRICS = ("FID", "IS", "CLIP-score")
LOWER_IS_BETTER = ("fid", "fd_democlip")


def metric_columns(config) -> List[tuple]:
    """(our metric, the paper metric it stands in for or None, +1 / -1 when higher / lower is better)."""
    return [(m, PAPER_METRICS[k] if k < len(PAPER_METRICS) else None, -1 if m in LOWER_IS_BETTER else 1)
            for k, m in enumerate(config.metrics)]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ablation/demo", help="ablation YAML (path, or a name under configs/)")
    p.add_argument("--arms", nargs="+", help="train and evaluate only these arms (default: all)")
    p.add_argument("--plan", action="store_true", help="print the arms and the compute accounting, and stop")
    p.add_argument("--threads", type=int, default=0, help="host threads of each training run")
    p.add_argument("--mode", choices=("graph", "pynative"), default="graph")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    from .model_args import run_with_clear_errors

    args = parse_args(argv)
    args.verbose = False
    return run_with_clear_errors(run, args)


def run(args) -> dict:
    from pangu_draw_ms.config import load_config, to_dict
    from pangu_draw_ms.io.model_dir import load_model_config
    from pangu_draw_ms.models.layers import count_parameters
    from pangu_draw_ms.models.unet import UNetModel
    from pangu_draw_ms.training.ablation import (
        AblationConfig,
        plan_arms,
        resolution_boost_model,
        resolution_boost_steps,
    )

    config = load_config(args.config, AblationConfig)
    base = load_model_config(config.base_model)
    if not os.path.isfile(config.manifest):
        raise FileNotFoundError(f"manifest {config.manifest} does not exist (python tools/make_demo_data.py makes "
                                "the demo data)")
    boost = resolution_boost_model(base, config)
    total, accounting = resolution_boost_steps(base, config)
    accounting.update(pair_unet_parameters=count_parameters(UNetModel(base.unet)),
                      resolution_boost_unet_parameters=count_parameters(UNetModel(boost.unet)),
                      resolution_boost_steps=total, pair_steps_each=config.steps)
    arms = plan_arms(config, total)
    chosen = [arm for arm in arms if not args.arms or arm.name in args.arms]
    unknown = set(args.arms or ()) - {arm.name for arm in arms}
    if unknown:
        raise ValueError(f"unknown arm(s) {sorted(unknown)}; the arms: {[arm.name for arm in arms]}")
    plan = {"config": to_dict(config), "accounting": accounting,
            "arms": [{"name": a.name, "runs": [[r.stage, *r.overrides] for r in a.runs], "borrowed": a.borrowed}
                     for a in arms]}
    print(json.dumps(plan["accounting"], indent=1))
    if args.plan:
        print(json.dumps(plan["arms"], indent=1))
        return plan
    work = config.work_dir
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "plan.json"), "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1, ensure_ascii=False)
    boost_dir = os.path.join(work, "configs", "resolution_boost")
    if not os.path.isfile(os.path.join(boost_dir, "config.yaml")):
        from pangu_draw_ms.io.model_dir import write_model_config

        write_model_config(boost_dir, boost)
    for arm in chosen:
        train_arm(config, arm, boost_dir if arm.unet_channels else config.base_model, args)
    reports = {arm.name: evaluate_arm(config, arm.name) for arm in chosen}
    reports.update({name: report for name, report in _existing_reports(work).items() if name not in reports})
    tables = write_tables(config, reports, accounting)
    return {"plan": plan, "tables": tables}


def _run(command: List[str], log: str) -> None:
    """A tool as a child process, its output appended to ``log``; a failure names the log."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command[1:3])} failed (exit {code}); see {log}")


def train_arm(config, arm, model: str, args) -> None:
    """Train the arm's runs (each resumed where it stopped; a finished run is skipped) into WORK/models/<arm>,
    and copy in the generator files it borrows."""
    work = config.work_dir
    target = os.path.join(work, "models", arm.name)
    base = config.base_model
    for run in arm.runs:
        output = os.path.join(work, "runs", arm.name, run.stage)
        summary = os.path.join(output, "summary.json")
        steps = next((int(o.split("=", 1)[1]) for o in run.overrides if o.startswith("steps=")), config.steps)
        if os.path.isfile(summary):
            with open(summary, encoding="utf-8") as f:
                if json.load(f).get("steps") == steps:
                    continue  # finished: rerunning the ablation keeps it
        overrides = [f"model={model}", f"stage={run.stage}", f"output_dir={output}", f"export_dir={target}",
                     f"steps={config.steps}", f"seed={config.seed}", f"data.manifest={config.manifest}",
                     f"data.batch_size={config.batch_size}", f"optim.learning_rate={config.learning_rate}",
                     f"optim.warmup_steps={config.warmup_steps}", f"optim.ema_decay={config.ema_decay}",
                     f"init.vae={os.path.join(base, 'vae.safetensors')}",
                     f"init.conditioner={os.path.join(base, 'conditioner.safetensors')}",
                     f"data.cache_dir={os.path.join(work, 'cache')}",  # one subfolder per bucket list and data
                     *run.overrides, *config.train_overrides]
        command = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "--config", "train/ablation", "--resume",
                   "--mode", args.mode] + (["--threads", str(args.threads)] if args.threads else []) + overrides
        print(f"{arm.name}: training {run.stage} ({steps} steps) -> {output}", flush=True)
        _run(command, os.path.join(output, "tool.log"))
    for component, lender in arm.borrowed.items():
        source = os.path.join(work, "models", lender, f"{component}.safetensors")
        if not os.path.isfile(source):
            raise FileNotFoundError(f"arm {arm.name} borrows {component} from arm {lender}, which is not trained "
                                    f"yet ({source}); train {lender} first")
        shutil.copyfile(source, os.path.join(target, f"{component}.safetensors"))


def evaluation_prompts(config) -> str:
    """The prompts file of the evaluation: the config's, or the demo world's held-out captions written into
    WORK/heldout_prompts.jsonl (their scene keys as ids, which the demo evaluators read)."""
    if config.prompts:
        return config.prompts
    from pangu_draw_ms.evaluation.demo import heldout_prompts

    path = os.path.join(config.work_dir, "heldout_prompts.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for p in heldout_prompts():
            f.write(json.dumps({"prompt": p.text, "lang": p.lang, "id": p.key}, ensure_ascii=False) + "\n")
    return path


def evaluate_arm(config, name: str) -> dict:
    """tools/evaluate.py on the arm's model (resumes a stopped evaluation); its report."""
    out = os.path.join(config.work_dir, "eval", name)
    command = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--model-dir",
               os.path.join(config.work_dir, "models", name), "--prompts", evaluation_prompts(config),
               "--metrics", ",".join(config.metrics), "--seeds", *map(str, config.seeds),
               "--steps", str(config.sampling_steps), "--out", out, "--quiet", *config.evaluation_args]
    print(f"{name}: evaluating -> {out}", flush=True)
    _run(command, os.path.join(out, "tool.log"))
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def _existing_reports(work: str) -> Dict[str, dict]:
    folder = os.path.join(work, "eval")
    reports = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        path = os.path.join(folder, name, "report.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                reports[name] = json.load(f)
    return reports


def seed_values(report: dict, metric: str) -> List[float]:
    """A metric's value per sampling seed, over the whole image set: the ``all`` group where the metric has
    one, else the mean of its language groups."""
    import numpy as np

    groups = report["metrics"][metric]
    if "all" in groups:
        return list(groups["all"]["per_seed"])
    return list(np.mean([g["per_seed"] for g in groups.values()], axis=0))


def write_tables(config, reports: Dict[str, dict], accounting: dict) -> dict:
    """WORK/tables.json and tables.md: one table per paper table, ours beside the paper's."""
    import numpy as np

    from pangu_draw_ms.training.ablation import agreement, pair_name

    reference = pair_name(config.reference_t_struct)
    rows = {"table4": [("resolution_boost", "Resolution Boost (one UNet, low then high resolution)"),
                       (reference, f"Time-decoupled pair (T_struct {config.reference_t_struct})")],
            "table5": [(reference, "structure: all data; texture: low resolution"),
                       ("structure_high_only", "structure: only high-resolution data; texture: low resolution"),
                       ("texture_high_res", "structure: all data; texture: high resolution")],
            "table6": [(pair_name(t), f"T_struct {t}") for t in config.t_structs]}
    # (the arm the paper finds better, the arm it is better than) per claim
    claims = {"table4": [(reference, "resolution_boost")],
              "table5": [(reference, "structure_high_only"), (reference, "texture_high_res")],
              "table6": [(reference, pair_name(t)) for t in config.t_structs if t != config.reference_t_struct]}
    columns = metric_columns(config)
    tables, lines = {}, [f"Equal compute (Table 4): pair {accounting['pair_flops']:.3g} FLOPs "
                         f"({config.steps} steps each), Resolution Boost {accounting['resolution_boost_flops']:.3g} "
                         f"FLOPs ({accounting['resolution_boost_steps']} steps); UNet parameters: pair "
                         f"{accounting['pair_unet_parameters']:,} each, Resolution Boost "
                         f"{accounting['resolution_boost_unet_parameters']:,}", ""]
    for table, table_rows in rows.items():
        measured = {}
        for arm, _ in table_rows:
            if arm in reports:
                measured[arm] = {m: seed_values(reports[arm], m) for m, _, _ in columns}
        header = "| arm | " + " | ".join(f"{m} (ours)" + (f" / {paper} (paper)" if paper and table in PAPER else "")
                                         for m, paper, _ in columns) + " |"
        lines += [f"## {table}", "", header, "|---" * (len(columns) + 1) + "|"]
        for arm, title in table_rows:
            cells = []
            for k, (metric, paper, _) in enumerate(columns):
                values = measured.get(arm, {}).get(metric)
                ours = f"{np.mean(values):.2f} ± {np.std(values):.2f}" if values else "not run"
                printed = PAPER.get(table, {}).get(arm)
                cells.append(ours + (f" / {printed[k]}" if paper and printed else ""))
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        verdicts = []
        for better, worse in claims[table]:
            if better not in measured or worse not in measured:
                continue
            for metric, paper, sign in columns:
                a, b = measured[better][metric], measured[worse][metric]
                spread = float(np.sqrt((np.var(a) + np.var(b)) / 2))
                verdicts.append({"better": better, "than": worse, "metric": metric,
                                 "difference": sign * (float(np.mean(a)) - float(np.mean(b))), "spread": spread,
                                 "verdict": agreement(sign * (float(np.mean(a)) - float(np.mean(b))), spread)})
        lines += [""] + [f"- {v['better']} better than {v['than']} on {v['metric']}: {v['verdict']}" for v in verdicts]
        lines.append("")
        tables[table] = {"measured": measured, "verdicts": verdicts}
    with open(os.path.join(config.work_dir, "tables.json"), "w", encoding="utf-8") as f:
        json.dump({"accounting": accounting, "tables": tables}, f, indent=1)
    with open(os.path.join(config.work_dir, "tables.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return tables
