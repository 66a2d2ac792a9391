"""Reproduce the paper's ablations (Tables 4-6) in miniature: ``python tools/ablate.py --help``.

The command lives in ``pangu_draw_ms.cli.ablate``, installed as ``pangu-draw-ablate``.
This wrapper keeps the documented ``python tools/ablate.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.ablate import main  # noqa: E402

if __name__ == "__main__":
    main()
