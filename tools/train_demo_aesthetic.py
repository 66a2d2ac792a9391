"""Train the demo aesthetic scorer: ``python tools/train_demo_aesthetic.py --help``.

The command lives in ``pangu_draw_ms.cli.train_demo_aesthetic``, installed as ``pangu-draw-train-demo-aesthetic``.
This wrapper keeps the documented ``python tools/train_demo_aesthetic.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.train_demo_aesthetic import main  # noqa: E402

if __name__ == "__main__":
    main()
