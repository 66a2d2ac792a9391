"""What bit-identical training costs: the demo structure stage run twice with each host-thread count, its
steady-state throughput and whether the two runs' final weights are identical (the weights digest
tools/train.py prints).

    python bench/train_determinism.py [--steps 60] [--threads 1 2] [--mode graph|pynative]

Needs the demo data (python tools/make_demo_data.py); caches VAE posteriors under --work. Run it on a
quiet machine: the numbers are throughputs.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "pangu_draw_ms", "demo")


def train(work: str, name: str, threads: int, steps: int, log_every: int, mode: str) -> dict:
    out = os.path.join(work, name)
    command = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "--config", "train/demo_structure",
               "--threads", str(threads), "--mode", mode, f"model={DEMO}", f"init.vae={DEMO}/vae.safetensors",
               f"output_dir={out}",
               f"export_dir={out}/export", f"data.cache_dir={work}/cache", f"steps={steps}",
               f"log_every={log_every}", f"save_every={steps}"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rates = [float(r) for r in re.findall(r"([\d.]+) samples/s", result.stdout)]
    # The first log line's step holds the graph compilation; the rest is the steady state.
    return {"digest": summary["digest"], "samples_per_s": sum(rates[1:]) / max(1, len(rates) - 1),
            "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mode", choices=("graph", "pynative"), default="graph")
    parser.add_argument("--work", default="/tmp/pangu_train_determinism")
    args = parser.parse_args()
    train(args.work, "warm-cache", 1, 2, 1, args.mode)  # builds the posterior cache outside the measurements
    runs = {}
    for repeat in ("a", "b"):  # interleaved, so that a change in machine load hits both thread counts
        for threads in args.threads:
            runs.setdefault(threads, []).append(train(args.work, f"{args.mode}-t{threads}{repeat}", threads,
                                                            args.steps, 10, args.mode))
    digests = {run["digest"] for pair in runs.values() for run in pair}
    print(f"mode {args.mode}, {args.steps} steps; {len(digests)} distinct final weights over all runs")
    print("| threads | samples/s (run a, b) | wall s (run a, b) | two runs bit-identical |")
    print("|---|---|---|---|")
    for threads, (a, b) in runs.items():
        print(f"| {threads} | {a['samples_per_s']:.1f}, {b['samples_per_s']:.1f} | {a['seconds']:.0f}, "
              f"{b['seconds']:.0f} | {'yes' if a['digest'] == b['digest'] else 'no'} |")


if __name__ == "__main__":
    main()
