"""Prompt following of a demo model: over held-out captions and several seeds, the fraction of generated
images whose colour and shape match the prompt, separately for English and Chinese prompts.

    python tools/eval_demo.py --model pangu_draw_ms/demo/model --heldout outputs/demo/data/heldout.jsonl \
        --seeds 0 1 2 --out outputs/demo/eval/decoupled

Colour: the median foreground colour named by the nearest palette colour; shape: a small classifier trained
on masks of images drawn by the dataset generator (pangu_draw_ms.demo.judge). Writes OUT/results.json and
OUT/samples.png (one row per prompt and language, one column per seed).

Images come from PanGuDrawPipeline.from_pretrained(--model): time-decoupled Euler sampling with
classifier-free guidance against the empty prompt.
"""
# The command lives in pangu_draw_ms.cli.eval_demo (installed as `pangu-draw-eval-demo`); this file keeps
# `python tools/eval_demo.py` working from a checkout without installing the package.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.eval_demo import main  # noqa: E402

if __name__ == "__main__":
    main()
