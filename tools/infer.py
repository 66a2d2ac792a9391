"""Generate images with PanGu-Draw: time-decoupled sampling at any resolution bucket.

    python tools/infer.py --prompt "一个红色的圆形"                       # the embedded default model
    python tools/infer.py --model-dir converted/ --prompt "a cat" --ratio 16:9 --num-images 4
    python tools/infer.py --structure-ckpt pangu_high_timestamp-c6344411.ckpt \\
        --texture-ckpt pangu_low_timestamp-127da122.ckpt --device Ascend --prompt "..."

Every image is saved as a PNG whose text metadata holds the prompt and all settings; several images
also give a grid. Defaults (steps, sampler, guidance, style scales, switch rule) come from the model
config's ``sampling`` section.
"""
# The command lives in pangu_draw_ms.cli.infer (installed as `pangu-draw-infer`); this file keeps
# `python tools/infer.py` working from a checkout without installing the package.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.infer import main  # noqa: E402

if __name__ == "__main__":
    main()
