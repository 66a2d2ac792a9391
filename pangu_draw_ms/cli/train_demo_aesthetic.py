"""Train the demo world's aesthetic scorer (LAION's predictor architecture on the demo CLIP) on the stated rule
of a good demo picture (pangu_draw_ms.demo.aesthetic: big, centred, white or black background).

    python tools/train_demo_aesthetic.py --out pangu_draw_ms/demo/aesthetic

Writes OUT/config.yaml and OUT/aesthetic.safetensors and prints the held-out RMSE and correlation with the rule.
"""
from __future__ import annotations

import argparse
import json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=3000, help="renders (the last fifth held out)")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps on the whole training set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_images < 10 or args.steps < 1:
        parser.error("--num-images must be >= 10 and --steps >= 1")

    from pangu_draw_ms.runtime import quiet_mindspore

    quiet_mindspore()
    import mindspore as ms

    from pangu_draw_ms.demo.aesthetic import train_demo_aesthetic
    from pangu_draw_ms.evaluation.demo import load_demo_clip

    ms.set_context(mode=ms.PYNATIVE_MODE)
    result = train_demo_aesthetic(load_demo_clip(), args.out, args.num_images, args.steps, args.seed)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
