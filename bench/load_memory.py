"""Peak host memory of streaming a full-size UNet checkpoint into our cell.

Generates a released-size UNet (``UNetConfig()``: 2,565,825,284 parameters) in the sgm layout
(``model.diffusion_model.*``, MindSpore suffixes) as float16 random values, ~5.1 GB, then loads it in a
FRESH process into a float32 ``UNetModel`` built without allocating its initial values, with
``load_component``. Reports the file size, the cell size, the process's RSS before loading, its peak
(``ru_maxrss``) and the time. The file is deleted afterwards.

    python bench/load_memory.py --format ckpt --dir /tmp
    python bench/load_memory.py --format safetensors --dir /tmp

The .ckpt is generated as MindSpore's writer lays it out (one protobuf ``Checkpoint`` record per
tensor), record by record, so generating it needs no 5 GB of memory either.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PREFIX = "model.diffusion_model."


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def unet_shapes():
    from mindspore.nn.utils import no_init_parameters

    from pangu_draw_ms.config import UNetConfig
    from pangu_draw_ms.models.unet import UNetModel

    with no_init_parameters():
        unet = UNetModel(UNetConfig())
    return [(p.name, tuple(p.shape)) for p in unet.get_parameters()]


def random_fp16(shape, rng):
    import numpy as np

    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def generate(path: str) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = unet_shapes()
    if path.endswith(".safetensors"):
        from pangu_draw_ms.io.checkpoint import write_tensors

        write_tensors(path, [(PREFIX + name, shape, np.dtype(np.float16), lambda shape=shape: random_fp16(shape, rng))
                             for name, shape in shapes])
        return
    from mindspore.train.checkpoint_pb2 import Checkpoint

    with open(path, "wb") as f:
        for name, shape in shapes:
            record = Checkpoint()
            value = record.value.add()
            value.tag = PREFIX + name
            value.tensor.dims.extend(shape)
            value.tensor.tensor_type = "Float16"
            value.tensor.tensor_content = random_fp16(shape, rng).tobytes()
            f.write(record.SerializeToString())


def load(path: str) -> dict:
    import numpy as np

    from pangu_draw_ms.config import UNetConfig
    from pangu_draw_ms.io.checkpoint import open_checkpoint
    from pangu_draw_ms.io.layouts import build_component, load_component
    from pangu_draw_ms.models.layers import count_parameters

    unet = build_component("unet", UNetConfig(), materialize=False)
    before = rss_bytes()
    start = time.perf_counter()
    report = load_component(unet, path)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = rss_bytes()
    with open_checkpoint(path) as reader:  # spot check: a loaded parameter equals the file's tensor
        name = "output_blocks.4.1.transformer_blocks.1.ff.net.0.proj.weight"
        expected = reader.get(PREFIX + name).astype(np.float32)
    got = next(p for p in unet.get_parameters() if p.name == name).asnumpy()
    return {"file_bytes": os.path.getsize(path), "cell_bytes": 4 * count_parameters(unet),
            "parameters": count_parameters(unet), "tensors": len(report.loaded), "rss_before_load": before,
            "peak_rss": peak, "rss_after_load": after, "load_seconds": round(seconds, 1),
            "spot_check_equal": bool(np.array_equal(got, expected))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=["ckpt", "safetensors"], default="ckpt")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--step", choices=["all", "generate", "load"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "generate":
        generate(args.path)
        return
    if args.step == "load":
        print(json.dumps(load(args.path)))
        return
    path = os.path.join(args.dir, f"bench_unet_fp16.{args.format}")
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--step", "generate", "--path", path], check=True)
        print(f"generated {path} ({os.path.getsize(path) / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s")
        out = subprocess.run([sys.executable, __file__, "--step", "load", "--path", path], check=True,
                             capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if os.path.exists(path):
            os.remove(path)
    gib = {k: f"{v / 2**30:.2f} GiB" for k, v in result.items() if k.endswith(("bytes", "rss", "load"))}
    print(json.dumps({**result, **gib}, indent=2))


if __name__ == "__main__":
    main()
