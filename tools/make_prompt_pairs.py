"""Generate the demo prompt pairs: ``python tools/make_prompt_pairs.py --help``.

The command lives in ``pangu_draw_ms.cli.make_prompt_pairs``, installed as ``pangu-draw-make-prompt-pairs``.
This wrapper keeps the documented ``python tools/make_prompt_pairs.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.make_prompt_pairs import main  # noqa: E402

if __name__ == "__main__":
    main()
