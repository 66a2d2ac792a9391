"""3x3 and 1x1 convolutions of MindSpore's CPU backend under each oneDNN ISA cap, against torch.

oneDNN reads ``DNNL_MAX_CPU_ISA`` once, so every cap runs in a child process of its own; inside it our
``Conv2d`` cell (GRAPH_MODE) and ``torch.nn.functional.conv2d`` run interleaved on the same input and
weights with the same thread count, and the child reports the median milliseconds, the ratio, and the
kernel oneDNN picked (from ``ONEDNN_VERBOSE``). ``default`` is MindSpore without our package's cap.

    python bench/conv_isa.py                                   # every cap, (2, 64, 32, 32) -> 64 ch
    python bench/conv_isa.py --shape 1 320 64 64 --caps default AVX2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CAPS = ("default", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_AMX")


def child(shape, kernel, threads, repeats):
    import mindspore as ms
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pangu_draw_ms.models.layers import Conv2d

    from timing import interleaved_medians

    ms.set_context(mode=ms.GRAPH_MODE, runtime_num_threads=threads)
    torch.set_num_threads(threads)
    b, c, h, w = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    conv = Conv2d(c, c, kernel, padding=kernel // 2)
    weight, bias = conv.weight.asnumpy(), conv.bias.asnumpy()
    x_ms, x_pt = ms.Tensor(x), torch.from_numpy(x)
    w_pt, b_pt = torch.from_numpy(weight), torch.from_numpy(bias)

    def ours():
        return conv(x_ms).asnumpy()

    def theirs():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x_pt, w_pt, b_pt, padding=kernel // 2).numpy()

    first = ours()
    # MindSpore's oneDNN has read this child's cap; torch's own oneDNN reads the same variable on its first
    # kernel: without it, torch runs at its default ISA, as it does outside this benchmark.
    for name in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA"):
        os.environ.pop(name, None)
    error = float(np.abs(first - theirs()).max())
    medians = interleaved_medians({"ours": ours, "torch": theirs}, warmup=1, repeats=repeats)
    ms_ours, ms_torch = 1e3 * medians["ours"], 1e3 * medians["torch"]
    gflops = 2 * b * c * c * kernel * kernel * h * w / (ms_ours * 1e-3) / 1e9
    print(json.dumps({"ms_ours": ms_ours, "ms_torch": ms_torch, "gflops": gflops, "max_abs_diff": error}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=(2, 64, 32, 32), metavar=("B", "C", "H", "W"))
    parser.add_argument("--kernels", type=int, nargs="+", default=(3, 1))
    parser.add_argument("--caps", nargs="+", default=CAPS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(tuple(args.shape), args.kernels[0], args.threads, args.repeats)
        return
    print(f"conv {tuple(args.shape)} -> {args.shape[1]} ch, {args.threads} threads; ms = median milliseconds")
    print("| cap | kernel | ours ms | torch ms | ours / torch | GFLOP/s | oneDNN implementation |")
    print("|---|---|---|---|---|---|---|")
    for cap in args.caps:
        for kernel in args.kernels:
            env = dict(os.environ, ONEDNN_VERBOSE="1", GLOG_v="3", OMP_NUM_THREADS=str(args.threads))
            # "ALL" is oneDNN's "no cap": MindSpore's default, which our package would otherwise replace.
            env["DNNL_MAX_CPU_ISA"] = "ALL" if cap == "default" else cap
            command = [sys.executable, os.path.abspath(__file__), "--child", "--shape", *map(str, args.shape),
                       "--kernels", str(kernel), "--threads", str(args.threads), "--repeats", str(args.repeats)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
            result = json.loads(next(line for line in out if line.startswith("{")))
            kernels = sorted({line.split(",")[6] for line in out
                              if line.startswith("onednn_verbose") and ",exec,cpu,convolution," in line})
            print(f"| {cap} | {kernel}x{kernel} | {result['ms_ours']:.2f} | {result['ms_torch']:.2f} | "
                  f"{result['ms_ours'] / result['ms_torch']:.2f} | {result['gflops']:.1f} | {' '.join(kernels)} |")


if __name__ == "__main__":
    main()
