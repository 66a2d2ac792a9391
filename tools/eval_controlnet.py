"""Measure the demo ControlNet's placement: ``python tools/eval_controlnet.py --help``.

The command lives in ``pangu_draw_ms.cli.eval_controlnet``, installed as ``pangu-draw-eval-controlnet``.
This wrapper keeps the documented ``python tools/eval_controlnet.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.eval_controlnet import main  # noqa: E402

if __name__ == "__main__":
    main()
