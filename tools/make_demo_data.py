"""Generate the demo's bilingual synthetic dataset: coloured shapes on plain backgrounds at several
aspect ratios, each image with an English and a Chinese caption. Deterministic in --seed.

    python tools/make_demo_data.py --out outputs/demo/data --num 6000 --seed 0

Writes OUT/images/*.png, OUT/train.jsonl (the training manifest) and OUT/heldout.jsonl (captions of
attribute combinations no training image shows, for evaluation).
"""
# The command lives in pangu_draw_ms.cli.make_demo_data (installed as `pangu-draw-make-demo-data`); this file keeps
# `python tools/make_demo_data.py` working from a checkout without installing the package.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.make_demo_data import main  # noqa: E402

if __name__ == "__main__":
    main()
