"""Convert checkpoints into model directories: ``python tools/convert.py --help``.

The command lives in ``pangu_draw_ms.cli.convert``, installed as ``pangu-draw-convert``.
This wrapper keeps the documented ``python tools/convert.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
