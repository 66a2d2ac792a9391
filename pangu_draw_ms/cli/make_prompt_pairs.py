"""Generate the demo world's bilingual (short -> enriched) prompt pairs and the enhancer's tokenizer.

    python tools/make_prompt_pairs.py --out outputs/demo/prompt_pairs --num 6000 --seed 0

Writes OUT/train.jsonl (rows short, enriched, lang, color, shape: the training pairs of stage prompt_sft),
OUT/heldout.jsonl (the short prompts of the held-out colour-shape pairs, both languages) and OUT/tokenizer.model
(SentencePiece BPE + jieba trained on the training pairs). Deterministic in --seed.
"""
from __future__ import annotations

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, default=6000, help="training pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=200, help="tokenizer pieces (the enhancer's vocab_size)")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be >= 1")

    from pangu_draw_ms.prompting.demo_pairs import write_pairs

    counts = write_pairs(args.out, args.num, args.seed, args.vocab_size)
    print(f"wrote {counts['train']} training pairs, {counts['heldout']} held-out short prompts and "
          f"{counts['tokenizer']} to {args.out}")


if __name__ == "__main__":
    main()
