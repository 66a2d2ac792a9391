"""Measure prompt enhancement on the demo world: ``python tools/eval_enhancer.py --help``.

The command lives in ``pangu_draw_ms.cli.eval_enhancer``, installed as ``pangu-draw-eval-enhancer``.
This wrapper keeps the documented ``python tools/eval_enhancer.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.eval_enhancer import main  # noqa: E402

if __name__ == "__main__":
    main()
