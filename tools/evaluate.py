"""Evaluate a model (FID, IS, CLIP-scores, the demo evaluators): ``python tools/evaluate.py --help``.

The command lives in ``pangu_draw_ms.cli.evaluate``, installed as ``pangu-draw-evaluate``.
This wrapper keeps the documented ``python tools/evaluate.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
