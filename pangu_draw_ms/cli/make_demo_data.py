"""Generate the demo's bilingual synthetic dataset: coloured shapes on plain backgrounds at several
aspect ratios, each image with an English and a Chinese caption. Deterministic in --seed.

    python tools/make_demo_data.py --out outputs/demo/data --num 6000 --seed 0

Writes OUT/images/*.png, OUT/train.jsonl (the training manifest) and OUT/heldout.jsonl (captions of
attribute combinations no training image shows, for evaluation).
"""
from __future__ import annotations

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, default=6000, help="training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--low-res-fraction", type=float, default=0.3,
                        help="share of low-resolution images (smaller than every structure bucket)")
    parser.add_argument("--size-scale", type=float, default=1.0, help="multiplies image sides (tiny test data)")
    parser.add_argument("--new-shapes", nargs="+", default=[], metavar="SHAPE",
                        help="shapes outside the demo world (star, which the demo LoRA teaches); heldout.jsonl then "
                             "holds their held-out captions")
    parser.add_argument("--new-share", type=float, default=0.5, help="share of the images with a --new-shapes shape")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be >= 1")
    if not 0.0 <= args.low_res_fraction <= 1.0:
        parser.error("--low-res-fraction must be in [0, 1]")
    if args.size_scale <= 0:
        parser.error("--size-scale must be > 0")
    if not 0.0 <= args.new_share <= 1.0:
        parser.error("--new-share must be in [0, 1]")

    from pangu_draw_ms.demo.shapes import NEW_SHAPES, write_dataset

    unknown = sorted(set(args.new_shapes) - set(NEW_SHAPES))
    if unknown:
        parser.error(f"--new-shapes {' '.join(unknown)}: not defined; valid: {', '.join(sorted(NEW_SHAPES))}")
    counts = write_dataset(args.out, args.num, args.seed, args.low_res_fraction, args.size_scale, args.new_shapes,
                           args.new_share)
    print(f"wrote {counts['train']} training images and {counts['heldout']} held-out captions to {args.out}")


if __name__ == "__main__":
    main()
