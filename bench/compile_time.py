"""First-call (graph compile + run) and second-call time of the released-layout UNet (2.57B parameters, the
SDXL layout of PanGu-Draw 3.0) in GRAPH_MODE, with MindSpore's options for compile time.

    python bench/compile_time.py                                  # the full released layout
    python bench/compile_time.py --narrow                         # same graph, 64 base channels (fits anywhere)
    python bench/compile_time.py --narrow --jit-level O0          # MindSpore's jit levels O0 / O1 / O2
    python bench/compile_time.py --narrow --lazy-inline           # @lazy_inline on the transformer blocks
    python bench/compile_time.py --compile-cache /tmp/cc          # run twice: the second process reads the cache

``--narrow`` keeps every block, depth and op of the layout (so the graph the compiler sees is the same)
with 64 instead of 320 base channels, so that it builds in seconds and needs little memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--narrow", action="store_true")
    parser.add_argument("--latent", type=int, default=16, help="latent side (16 = 128 px)")
    parser.add_argument("--jit-level", choices=["O0", "O1", "O2"])
    parser.add_argument("--lazy-inline", action="store_true", help="mindspore.lazy_inline on BasicTransformerBlock")
    parser.add_argument("--compile-cache", metavar="DIR")
    args = parser.parse_args()

    import mindspore as ms

    from pangu_draw_ms.config import load_config
    from pangu_draw_ms.models import layers as L
    from pangu_draw_ms.models import unet as U

    ms.set_context(mode=ms.GRAPH_MODE)
    if args.jit_level:
        ms.set_context(jit_config={"jit_level": args.jit_level})
    if args.compile_cache:
        ms.set_context(enable_compile_cache=True, compile_cache_path=args.compile_cache)
    if args.lazy_inline:
        U.BasicTransformerBlock.__init__ = ms.lazy_inline(U.BasicTransformerBlock.__init__)
    config = load_config("pangu_draw_v3").unet
    if args.narrow:
        config = dataclasses.replace(config, model_channels=64, num_head_channels=32)
    started = time.perf_counter()
    net = U.UNetModel(config)
    built = time.perf_counter() - started
    rng = np.random.default_rng(0)
    h = args.latent
    inputs = [ms.Tensor(rng.standard_normal((1, 4, h, h), dtype=np.float32)),
              ms.Tensor(np.full((1,), 500.0, np.float32)),
              ms.Tensor(rng.standard_normal((1, 77, config.context_dim), dtype=np.float32)),
              ms.Tensor(rng.standard_normal((1, config.adm_in_channels), dtype=np.float32))]
    times = []
    for _ in range(2):
        started = time.perf_counter()
        net(*inputs).asnumpy()
        times.append(time.perf_counter() - started)
    print(f"layout={'narrow' if args.narrow else 'released'} params={L.count_parameters(net):,} latent={h}x{h} "
          f"jit_level={args.jit_level or 'default'} lazy_inline={args.lazy_inline} "
          f"compile_cache={bool(args.compile_cache)}: build {built:.1f} s, first call {times[0]:.1f} s, "
          f"second call {times[1]:.2f} s")


if __name__ == "__main__":
    main()
