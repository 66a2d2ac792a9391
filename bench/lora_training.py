"""What a LoRA costs against fine-tuning the whole generator: trainable parameters, checkpoint size and step
time of stage ``lora`` vs stage ``structure`` (text encoders frozen) on the demo structure generator, the same
data, batch and buckets, both trainers in one process, their steps interleaved in chunks.

    python bench/lora_training.py [--chunks 6] [--chunk-steps 10] [--rank 4] [--targets attention]

Needs the demo LoRA data (python tools/make_demo_data.py --out outputs/demo_lora/data --num 3000
--new-shapes star --new-share 0.5); the VAE posteriors and text features are cached under --work.
"""
import argparse
import csv
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def trainer(kind: str, work: str, steps: int, rank: int, targets: str):
    from pangu_draw_ms.training.config import load_train_config
    from pangu_draw_ms.training.trainer import Trainer

    overrides = [f"output_dir={work}/{kind}", f"steps={steps}", "save_every=0", "log_every=100000", 'export_dir=""',
                 f"data.cache_dir={work}/cache", f"lora.rank={rank}", f"lora.targets=[{targets}]"]
    if kind == "full":
        overrides.append("stage=structure")
    return Trainer(load_train_config("train/demo_lora_structure", tuple(overrides)))


def step_seconds(work: str, kind: str, batch: int, skip: int) -> list:
    with open(os.path.join(work, kind, "metrics.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [batch / float(row["samples_per_s"]) for row in rows[skip:]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--chunk-steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default="attention")
    parser.add_argument("--work", default="outputs/bench_lora")
    args = parser.parse_args()

    import mindspore as ms
    import numpy as np

    ms.set_context(mode=ms.GRAPH_MODE)
    steps = args.chunks * args.chunk_steps
    runs = {kind: trainer(kind, args.work, steps, args.rank, args.targets) for kind in ("lora", "full")}
    for chunk in range(1, args.chunks + 1):
        for run in runs.values():
            run.train(chunk * args.chunk_steps)
    unet_total = sum(int(np.prod(p.shape)) for p in runs["full"].cells["unet"].get_parameters())
    print("| run | trainable parameters | share of the UNet | checkpoint | median step (s) | ratio |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for kind, run in runs.items():
        trainable = sum(int(np.prod(p.shape)) for p in run.stage.trainable_params())
        checkpoint = os.path.getsize(run.checkpoints.latest()) / 2**20
        # The first step of each chunk after the first call holds nothing special, the very first the compile.
        medians[kind] = statistics.median(step_seconds(args.work, kind, run.global_batch, skip=1))
        print(f"| {kind} | {trainable:,} | {100 * trainable / unet_total:.2f} % | {checkpoint:.2f} MiB | "
              f"{medians[kind]:.3f} | {medians[kind] / medians['lora']:.2f} |")


if __name__ == "__main__":
    main()
