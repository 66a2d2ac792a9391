"""PYNATIVE_MODE with MindSpore's asynchronous op launch vs blocking launch (``MS_DEV_HOST_BLOCKING_RUN``),
which ``import pangu_draw_ms`` turns on where the CPU is the only device (see pangu_draw_ms/runtime.py).

    python bench/pynative_launch.py

MindSpore reads the variable when the first op runs, so each setting runs in a child process of its own;
the children alternate (async, blocking, async, ...) and the medians over rounds are reported with ratios.
Measured per setting: one small Dense ((2, 64, 32) -> 32) call, and one forward of the tiny UNet (latents
(2, 4, 8, 8)), each the median of several calls after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"async (MindSpore's default)": "0", "blocking (the package's default on CPU hosts)": "1"}


def child(calls: int) -> None:
    """Time the two workloads in this process (its launch setting came from the environment)."""
    import time

    import numpy as np

    sys.path.insert(0, ROOT)
    import mindspore as ms

    from pangu_draw_ms.config import load_config
    from pangu_draw_ms.models.layers import Dense
    from pangu_draw_ms.models.unet import UNetModel

    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(0)
    dense, x = Dense(32, 32), ms.Tensor(rng.standard_normal((2, 64, 32), dtype=np.float32))
    config = load_config("tiny").unet
    unet = UNetModel(config)
    inputs = [ms.Tensor(rng.standard_normal((2, 4, 8, 8), dtype=np.float32)),
              ms.Tensor(np.full((2,), 500.0, np.float32)),
              ms.Tensor(rng.standard_normal((2, 77, config.context_dim), dtype=np.float32)),
              ms.Tensor(rng.standard_normal((2, config.adm_in_channels), dtype=np.float32))]

    def median_seconds(fn, n):
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    print(json.dumps({"dense_ms": 1e3 * median_seconds(lambda: dense(x).asnumpy(), 50 * calls),
                      "unet_s": median_seconds(lambda: unet(*inputs).asnumpy(), calls)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.calls)
    results = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, value in SETTINGS.items():
            env = dict(os.environ, MS_DEV_HOST_BLOCKING_RUN=value, GLOG_v="3")
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--calls", str(args.calls)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    first = None
    for name, runs in results.items():
        dense = statistics.median(r["dense_ms"] for r in runs)
        unet = statistics.median(r["unet_s"] for r in runs)
        first = first or (dense, unet)
        print(f"{name}: Dense {dense:.3f} ms ({dense / first[0]:.2f}x), tiny UNet forward {unet:.3f} s "
              f"({unet / first[1]:.2f}x)")


if __name__ == "__main__":
    main()
