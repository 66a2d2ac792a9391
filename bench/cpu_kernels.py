"""The package's CPU kernels (models/cpu_kernels.py: GroupNorm, GroupNorm + SiLU, LayerNorm, GEGLU's gated
GELU) against MindSpore's own ops for the same function and against torch, interleaved in one process,
1 thread each.

    python bench/cpu_kernels.py
    python bench/cpu_kernels.py --repeats 50 --chain 20

Each MindSpore side is a GRAPH_MODE cell that applies ``--chain`` ops in a row (so that the launch of one
graph is shared by many ops); times are per op.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import interleaved_medians  # noqa: E402

# (kind, input shape): the tiny UNet's first level and SDXL-sized attention tokens; GEGLU's input holds
# both halves (the feed-forward projection's output: tiny UNet 1024 tokens x 2 x 256, SDXL 4096 x 2 x 2560).
CASES = [("group", (2, 64, 32, 32)), ("group", (2, 320, 16, 16)), ("group", (2, 640, 32, 32)),
         ("group+silu", (2, 64, 32, 32)), ("group+silu", (2, 640, 32, 32)),
         ("layer", (2, 1024, 64)), ("layer", (2, 4096, 320)),
         ("geglu", (2, 1024, 512)), ("geglu", (2, 1024, 5120))]
GROUPS = 32


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--chain", type=int, default=10)
    args = parser.parse_args()

    import mindspore as ms
    import torch
    from mindspore import nn, ops

    from pangu_draw_ms import runtime
    from pangu_draw_ms.models import cpu_kernels
    from pangu_draw_ms.models.layers import GroupNorm, LayerNorm, gelu

    ms.set_context(mode=ms.GRAPH_MODE)
    runtime.set_cpu_threads(1)
    torch.set_num_threads(1)

    class GatedGelu(nn.Cell):
        """GEGLU without its projection: the kernel, or the layers' MindSpore path (split, GELU, product)."""

        def __init__(self):
            super().__init__()
            self.cpu_kernel = cpu_kernels.geglu()
            self.use_cpu_kernel = self.cpu_kernel is not None

        def construct(self, x):
            if self.use_cpu_kernel:
                return self.cpu_kernel(x)
            h, gate = ops.chunk(x, 2, axis=-1)
            return h * gelu(gate, False)

    def ours_and_torch(kind, shape):
        if kind == "geglu":
            def reference(x):
                h, gate = x.chunk(2, -1)
                return h * torch.nn.functional.gelu(gate)
            return GatedGelu, reference
        if kind == "layer":
            return (lambda: LayerNorm(shape[-1], 1e-5)), torch.nn.LayerNorm(shape[-1])
        silu = kind == "group+silu"
        norm = torch.nn.GroupNorm(GROUPS, shape[1])
        return ((lambda: GroupNorm(GROUPS, shape[1], activation="silu" if silu else None)),
                (lambda x: torch.nn.functional.silu(norm(x))) if silu else norm)

    class Chain(nn.Cell):
        """``--chain`` ops in a row; GEGLU halves its input, so each of its ops reads the same input."""

        def __init__(self, build, use_cpu_kernel, same_input):
            super().__init__()
            self.ops = nn.CellList([build() for _ in range(args.chain)])
            self.same_input = same_input
            for op in self.ops:
                op.use_cpu_kernel = use_cpu_kernel and op.cpu_kernel is not None

        def construct(self, x):
            outputs = ()
            y = x
            for op in self.ops:
                y = op(x if self.same_input else y)
                outputs = outputs + (y,)
            return outputs

    print(f"cpu_kernels library: {cpu_kernels.library()}")
    print("| op | input | ours ms | MindSpore ms | torch ms | MindSpore / ours | ours / torch |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for kind, shape in CASES:
        x = rng.standard_normal(shape).astype(np.float32)
        build, reference = ours_and_torch(kind, shape)
        same_input = kind == "geglu"
        ours, theirs, tx = Chain(build, True, same_input), Chain(build, False, same_input), torch.from_numpy(x)
        inputs = ms.Tensor(x)

        def run_torch():
            with torch.no_grad():
                y, outputs = tx, []
                for _ in range(args.chain):
                    y = reference(tx if same_input else y)
                    outputs.append(y.numpy())
                return outputs

        np.testing.assert_allclose(ours(inputs)[-1].asnumpy(), theirs(inputs)[-1].asnumpy(), rtol=1e-4, atol=1e-4)
        medians = interleaved_medians({"ours": lambda: [y.asnumpy() for y in ours(inputs)],
                                       "mindspore": lambda: [y.asnumpy() for y in theirs(inputs)],
                                       "torch": run_torch},
                                      warmup=2, repeats=args.repeats)
        per = {k: v / args.chain * 1e3 for k, v in medians.items()}
        print(f"| {kind} | {shape} | {per['ours']:.3f} | {per['mindspore']:.3f} | {per['torch']:.3f} | "
              f"{per['mindspore'] / per['ours']:.1f} | {per['ours'] / per['torch']:.2f} |")


if __name__ == "__main__":
    main()
