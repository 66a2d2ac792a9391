"""3x3 and 1x1 convolutions of MindSpore's CPU backend under each oneDNN ISA cap, and the package's own AVX-512
convolution (models/cpu_kernels.py), against torch.

oneDNN reads ``DNNL_MAX_CPU_ISA`` once, so every cap runs in a child process of its own; inside it our
``Conv2d`` cell (GRAPH_MODE) with MindSpore's convolution, the package's kernel and
``torch.nn.functional.conv2d`` run interleaved on the same input and weights with the same thread count, and
the child reports the median milliseconds, the ratios, and the kernel oneDNN picked (from ``ONEDNN_VERBOSE``).
``default`` is MindSpore without our package's cap.

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
    from timing import interleaved_medians, pin_to_cores

    pin_to_cores(threads)  # before MindSpore's and torch's threads start: every side on the same cores
    import mindspore as ms
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pangu_draw_ms import runtime
    from pangu_draw_ms.models.layers import Conv2d

    ms.set_context(mode=ms.GRAPH_MODE)
    runtime.set_cpu_threads(threads)
    torch.set_num_threads(threads)
    b, c, h, w = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    conv = Conv2d(c, c, kernel, padding=kernel // 2)
    package_kernel = conv.cpu_kernel  # the package's AVX-512 convolution (None where the CPU lacks AVX-512)
    conv.use_cpu_kernel = False  # the cell itself: MindSpore's oneDNN convolution under this child's cap
    weight, bias = conv.weight.asnumpy(), conv.bias.asnumpy()
    x_ms, x_pt = ms.Tensor(x), torch.from_numpy(x)
    w_pt, b_pt = torch.from_numpy(weight), torch.from_numpy(bias)
    config = ms.Tensor(np.array([kernel // 2], np.float32))

    def mindspore():
        return conv(x_ms).asnumpy()

    def package():
        return package_kernel(x_ms, conv.weight, conv.bias, config).asnumpy()

    def theirs():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x_pt, w_pt, b_pt, padding=kernel // 2).numpy()

    first = mindspore()
    # MindSpore's oneDNN has read this child's cap; torch's own oneDNN reads the same variable on its first
    # kernel: without it, torch runs at its default ISA, as it does outside this benchmark.
    for name in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA"):
        os.environ.pop(name, None)
    reference = theirs()
    sides = {"mindspore": mindspore, "torch": theirs}
    if package_kernel is not None:
        sides["package"] = package
    medians = {name: 1e3 * t for name, t in interleaved_medians(sides, warmup=1, repeats=repeats).items()}
    result = {"max_abs_diff": float(np.abs(first - reference).max()),
              "gflops": 2 * b * c * c * kernel * kernel * h * w / (medians["mindspore"] * 1e-3) / 1e9, **medians}
    if package_kernel is not None:
        result["package_max_abs_diff"] = float(np.abs(package() - reference).max())
    print(json.dumps(result))


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
    print(f"conv {tuple(args.shape)} -> {args.shape[1]} ch, {args.threads} threads; ms = median milliseconds; "
          "MindSpore = its oneDNN convolution under the cap, package = the package's AVX-512 kernel (the same under "
          "any cap)")
    print("| cap | kernel | MindSpore ms | package ms | torch ms | MindSpore / torch | package / torch | "
          "MindSpore GFLOP/s | oneDNN implementation |")
    print("|---|---|---|---|---|---|---|---|---|")
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
            mindspore, torch, package = result["mindspore"], result["torch"], result.get("package")
            package_ms, package_ratio = (f"{package:.2f}", f"{package / torch:.2f}") if package else ("-", "-")
            print(f"| {cap} | {kernel}x{kernel} | {mindspore:.2f} | {package_ms} | {torch:.2f} | "
                  f"{mindspore / torch:.2f} | {package_ratio} | {result['gflops']:.1f} | {' '.join(kernels)} |")


if __name__ == "__main__":
    main()
