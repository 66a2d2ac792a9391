"""Generate the demo's synthetic dataset: ``python tools/make_demo_data.py --help``.

The command lives in ``pangu_draw_ms.cli.make_demo_data``, installed as ``pangu-draw-make-demo-data``.
This wrapper keeps the documented ``python tools/make_demo_data.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.make_demo_data import main  # noqa: E402

if __name__ == "__main__":
    main()
