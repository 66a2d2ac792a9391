"""Train one stage of PanGu-Draw (also under msrun): ``python tools/train.py --help``.

The command lives in ``pangu_draw_ms.cli.train``, installed as ``pangu-draw-train``.
This wrapper keeps the documented ``python tools/train.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.train import main  # noqa: E402

if __name__ == "__main__":
    main()
