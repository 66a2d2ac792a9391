"""GroupNorm and LayerNorm on the CPU: the package's kernels (models/cpu_kernels.py), MindSpore's own and
torch's, interleaved in one process, 1 thread each.

    python bench/norm_kernels.py
    python bench/norm_kernels.py --repeats 50 --chain 20

Each MindSpore side is a GRAPH_MODE cell that applies ``--chain`` norms in a row (so that the launch of one
graph is shared by many norms); times are per norm.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import interleaved_medians  # noqa: E402

# (kind, input shape, groups): the tiny UNet's first level and its SDXL-sized attention tokens.
CASES = [("group", (2, 64, 32, 32), 32), ("group", (2, 320, 16, 16), 32), ("group", (2, 640, 32, 32), 32),
         ("layer", (2, 1024, 64), None), ("layer", (2, 4096, 320), None)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--chain", type=int, default=10)
    args = parser.parse_args()

    import mindspore as ms
    import torch
    from mindspore import nn

    from pangu_draw_ms.models import cpu_kernels
    from pangu_draw_ms.models.layers import GroupNorm, LayerNorm

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.device_context.cpu.op_tuning.threads_num(1)
    torch.set_num_threads(1)

    class Chain(nn.Cell):
        def __init__(self, build, use_cpu_kernel):
            super().__init__()
            self.norms = nn.CellList([build() for _ in range(args.chain)])
            for norm in self.norms:
                norm.use_cpu_kernel = use_cpu_kernel and norm.cpu_kernel is not None

        def construct(self, x):
            for norm in self.norms:
                x = norm(x)
            return x

    print(f"cpu_kernels library: {cpu_kernels.library()}")
    print("| norm | input | ours ms | MindSpore ms | torch ms | MindSpore / ours | ours / torch |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for kind, shape, groups in CASES:
        x = rng.standard_normal(shape).astype(np.float32)
        if kind == "group":
            def build():
                return GroupNorm(groups, shape[1])
            reference = torch.nn.GroupNorm(groups, shape[1])
        else:
            def build():
                return LayerNorm(shape[-1], 1e-5)
            reference = torch.nn.LayerNorm(shape[-1])
        ours, theirs, tx = Chain(build, True), Chain(build, False), torch.from_numpy(x)
        inputs = ms.Tensor(x)

        def run_torch():
            with torch.no_grad():
                y = tx
                for _ in range(args.chain):
                    y = reference(y)
                return y.numpy()

        np.testing.assert_allclose(ours(inputs).asnumpy(), theirs(inputs).asnumpy(), rtol=1e-4, atol=1e-4)
        medians = interleaved_medians({"ours": lambda: ours(inputs).asnumpy(),
                                       "mindspore": lambda: theirs(inputs).asnumpy(), "torch": run_torch},
                                      warmup=2, repeats=args.repeats)
        per = {k: v / args.chain * 1e3 for k, v in medians.items()}
        print(f"| {kind} | {shape} | {per['ours']:.3f} | {per['mindspore']:.3f} | {per['torch']:.3f} | "
              f"{per['mindspore'] / per['ours']:.1f} | {per['ours'] / per['torch']:.2f} |")


if __name__ == "__main__":
    main()
