"""Export a model as MindIR graphs: ``python tools/export.py --help``.

The command lives in ``pangu_draw_ms.cli.export``, installed as ``pangu-draw-export``.
This wrapper keeps the documented ``python tools/export.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.export import main  # noqa: E402

if __name__ == "__main__":
    main()
