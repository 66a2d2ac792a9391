"""Measure whether the demo ControlNet, fused with the demo text-to-image model by Coop-Diffusion, draws the
prompted colour where its control image outlines the shape.

    python tools/eval_controlnet.py --model pangu_draw_ms/demo \\
        --controlnet pangu_draw_ms/demo/structure_controlnet.safetensors --out outputs/demo/eval/controlnet

For every shape of the demo world and every off-centre position (left, right, top, bottom) the control image
is the edge map (:func:`pangu_draw_ms.images.edge_map`) of that shape drawn there; the
prompts are "a <colour> <shape>" / "一个<颜色>的<形状>" for every colour, without a position. An image is a
success when its foreground colour is the prompted one and the foreground's centre lies within
``--tolerance`` (a fraction of the image side) of the outlined shape's centre. The same prompts and seeds
without the ControlNet give the rate at which the text alone lands there (made once per shape, language
and seed: the prompts name no position). Writes OUT/results.json,
OUT/controls/*.png and OUT/samples.png (per control: the control image, then fused and plain images).
"""
# The command lives in pangu_draw_ms.cli.eval_controlnet (installed as `pangu-draw-eval-controlnet`); this file keeps
# `python tools/eval_controlnet.py` working from a checkout without installing the package.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.eval_controlnet import main  # noqa: E402

if __name__ == "__main__":
    main()
