"""Measure a demo model's prompt following: ``python tools/eval_demo.py --help``.

The command lives in ``pangu_draw_ms.cli.eval_demo``, installed as ``pangu-draw-eval-demo``.
This wrapper keeps the documented ``python tools/eval_demo.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.eval_demo import main  # noqa: E402

if __name__ == "__main__":
    main()
