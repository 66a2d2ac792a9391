"""Train one stage of PanGu-Draw (vae, structure, texture, full_range or controlnet) from a training YAML.

    python tools/train.py --config configs/train/demo_structure.yaml [--resume [CHECKPOINT]] [key=value ...]

Data-parallel on N workers (CPU or Ascend), the same script launched by msrun:

    msrun --worker_num=N --local_worker_num=N --master_port=8118 --join=True \\
        tools/train.py --config configs/train/demo_structure.yaml

Overrides after the options change config entries, e.g. ``steps=200 data.batch_size=8``.
"""
# The command lives in pangu_draw_ms.cli.train (installed as `pangu-draw-train`); this file keeps
# `python tools/train.py` working from a checkout without installing the package.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.train import main  # noqa: E402

if __name__ == "__main__":
    main()
