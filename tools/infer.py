"""Generate images with PanGu-Draw: ``python tools/infer.py --help``.

The command lives in ``pangu_draw_ms.cli.infer``, installed as ``pangu-draw-infer``.
This wrapper keeps the documented ``python tools/infer.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.infer import main  # noqa: E402

if __name__ == "__main__":
    main()
