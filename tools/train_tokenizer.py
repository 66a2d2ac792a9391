"""Train a SentencePiece tokenizer on a caption manifest: ``python tools/train_tokenizer.py --help``.

The command lives in ``pangu_draw_ms.cli.train_tokenizer``, installed as ``pangu-draw-train-tokenizer``.
This wrapper keeps the documented ``python tools/train_tokenizer.py`` commands working from a checkout
without installing the package.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    main()
