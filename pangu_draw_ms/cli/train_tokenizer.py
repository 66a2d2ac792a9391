"""Train a SentencePiece tokenizer (with jieba segmentation for Chinese) on the captions of a manifest.

    python tools/train_tokenizer.py --manifest outputs/demo/data/train.jsonl \
        --out outputs/demo/data/tokenizer --vocab-size 160

Writes OUT.model. Reference it in a model config with ``tokenizer: {kind: sentencepiece, vocab: OUT.model,
jieba: true}`` and give the text encoders ``vocab_size`` = the vocabulary size and ``eot_token_id: 3``.
"""
from __future__ import annotations

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="JSONL or CSV manifest with caption_en / caption_zh")
    parser.add_argument("--out", required=True, help="model prefix: writes OUT.model")
    parser.add_argument("--vocab-size", type=int, default=160)
    parser.add_argument("--model-type", choices=("unigram", "bpe", "word", "char"), default="unigram",
                        help="SentencePiece algorithm (bpe reaches whole-word pieces on small caption sets)")
    parser.add_argument("--no-jieba", action="store_true", help="do not segment Chinese with jieba")
    args = parser.parse_args(argv)

    from pangu_draw_ms.tokenizers import train
    from pangu_draw_ms.training.data import read_manifest

    samples, skipped = read_manifest(args.manifest)
    texts = [text for s in samples for text in (s.caption_en, s.caption_zh) if text]
    path = train(texts, args.out, args.vocab_size, jieba=not args.no_jieba, model_type=args.model_type)
    print(f"trained {path} ({args.vocab_size} pieces) on {len(texts)} captions; skipped samples: {skipped.describe()}")


if __name__ == "__main__":
    main()
