"""Train one stage of PanGu-Draw (vae, structure, texture, full_range or controlnet) from a training YAML.

    python tools/train.py --config configs/train/demo_structure.yaml [--resume [CHECKPOINT]] [key=value ...]

Data-parallel on N workers (CPU or Ascend), the same script launched by msrun:

    msrun --worker_num=N --local_worker_num=N --master_port=8118 --join=True \\
        tools/train.py --config configs/train/demo_structure.yaml

Overrides after the options change config entries, e.g. ``steps=200 data.batch_size=8``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pangu_draw_ms.runtime import freeze_heap, launched_by_msrun, set_cpu_threads


def supervise(args) -> dict:
    """Run this script without --restart-on-stall (and with --resume) in a child process, restarting it on a stall."""
    from pangu_draw_ms.training.config import load_train_config
    from pangu_draw_ms.training.metrics import METRICS_FILE
    from pangu_draw_ms.training.supervisor import run_with_restarts

    config = load_train_config(args.config, tuple(args.overrides))
    child = ["--config", args.config, "--mode", args.mode] + (["--device", args.device] if args.device else []) \
        + (["--threads", str(args.threads)] if args.threads else []) + list(args.overrides)
    # The command that started this process: tools/train.py, the pangu-draw-train script, or this module.
    script = [sys.executable, os.path.abspath(sys.argv[0])]
    first = script + (["--resume", args.resume] if args.resume not in (None, "latest") else
                      ["--resume"] if args.resume else []) + child
    code = run_with_restarts(first, os.path.join(config.output_dir, METRICS_FILE), args.restart_on_stall,
                             restart_command=script + ["--resume"] + child)
    if code != 0:
        raise SystemExit(code)
    with open(os.path.join(config.output_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML (path, or a name under configs/)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest checkpoint of the output folder, or from CHECKPOINT")
    parser.add_argument("--device", default=None, help="CPU, Ascend or GPU (default: MindSpore's default)")
    parser.add_argument("--mode", choices=("graph", "pynative"), default="graph",
                        help="graph (compiled, default) or pynative (eager, for debugging)")
    parser.add_argument("--threads", type=int, default=0,
                        help="host threads per worker (default: CPU cores / local workers)")
    parser.add_argument("--restart-on-stall", type=float, default=0, metavar="SECONDS",
                        help="single process: when no step completes for SECONDS, kill the run and resume it from "
                             "its newest checkpoint (works around rare MindSpore CPU kernel stalls)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a configuration, data or "
                                                                 "checkpoint error (default: one line, exit 2)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (YAML values)")
    args = parser.parse_args(argv)
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        # "--resume steps=10": argparse gave --resume the override that followed it; it was meant as one.
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError, CheckpointError, StateDictError, data errors
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args) -> dict:
    if args.restart_on_stall > 0:
        if launched_by_msrun():
            raise SystemExit("error: --restart-on-stall supervises one process; under msrun restart the job instead")
        return supervise(args)

    from pangu_draw_ms.runtime import quiet_mindspore

    quiet_mindspore()  # before MindSpore is imported: it reads its log level once
    import mindspore as ms

    from pangu_draw_ms.training.config import load_train_config
    from pangu_draw_ms.training.trainer import Trainer

    config = load_train_config(args.config, tuple(args.overrides))  # a bad config fails before anything starts
    if args.device:
        ms.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    rank, world = 0, 1
    if launched_by_msrun():
        from mindspore.communication import get_group_size, get_rank, init

        init()
        if os.environ["MS_ROLE"] == "MS_SCHED":
            return {}  # msrun's scheduler process coordinates the workers and trains nothing
        rank, world = get_rank(), get_group_size()
    local_workers = int(os.environ.get("MS_LOCAL_WORKER", "0") or 0) or world
    # MindSpore takes its thread count once per process: a second run in one process keeps the first's.
    set_cpu_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, local_workers)))

    os.makedirs(config.output_dir, exist_ok=True)
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(os.path.join(config.output_dir, "train.log"), encoding="utf-8"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(message)s")
    logger = logging.getLogger("pangu_draw_ms.train")
    if rank == 0:
        logger.info("stage %s, %d worker(s), config %s", config.stage, world, args.config)

    trainer = Trainer(config, rank=rank, world=world)
    freeze_heap()  # the trainer lives as long as the tool: MindSpore's per-compile gc.collect() skips it
    if args.resume:
        if not trainer.resume(None if args.resume == "latest" else args.resume):
            logger.warning("--resume: no checkpoint in %s, starting from step 0", trainer.checkpoints.directory)
    summary = trainer.train()
    # Every worker reports its weights' digest: a data-parallel run is correct when they are all equal.
    print(f"rank {rank} of {world}: weights sha256 {summary['digest']}", flush=True)
    if rank == 0:
        print(json.dumps(summary, ensure_ascii=False), flush=True)
    return summary


if __name__ == "__main__":
    main()
