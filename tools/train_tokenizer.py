"""Train a SentencePiece tokenizer (with jieba segmentation for Chinese) on the captions of a manifest.

    python tools/train_tokenizer.py --manifest outputs/demo/data/train.jsonl \
        --out outputs/demo/data/tokenizer --vocab-size 160

Writes OUT.model. Reference it in a model config with ``tokenizer: {kind: sentencepiece, vocab: OUT.model,
jieba: true}`` and give the text encoders ``vocab_size`` = the vocabulary size and ``eot_token_id: 3``.
"""
# The command lives in pangu_draw_ms.cli.train_tokenizer (installed as `pangu-draw-train-tokenizer`); this file keeps
# `python tools/train_tokenizer.py` working from a checkout without installing the package.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    main()
