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
from __future__ import annotations

import argparse
import os
import time

import numpy as np

POSITIONS = ("left", "right", "top", "bottom")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (the demo model)")
    parser.add_argument("--controlnet", required=True, help="ControlNet file written by tools/train.py")
    parser.add_argument("--weight", type=float, default=0.8, help="Coop-Diffusion weight d of the ControlNet partner")
    parser.add_argument("--t-min", type=int, default=None,
                        help="the partner is fused for t >= this (default: the model's t_struct, the structure "
                             "generator's range the ControlNet was trained on)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from pangu_draw_ms.runtime import quiet_mindspore

    quiet_mindspore()  # before MindSpore is imported: it reads its log level once
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    from PIL import Image

    from pangu_draw_ms.config import CoopRecipe, from_dict
    from pangu_draw_ms.demo.judge import color_of, foreground_centre, write_report
    from pangu_draw_ms.demo.shapes import COLORS, SHAPES, Scene, captions, edge_control
    from pangu_draw_ms.images import image_grid
    from pangu_draw_ms.pipelines.coop import CoopPipeline
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    start = time.time()
    os.makedirs(os.path.join(args.out, "controls"), exist_ok=True)
    main_pipe = PanGuDrawPipeline.from_pretrained(args.model)
    controls = {}
    for shape in SHAPES:
        for position in POSITIONS:
            edges, centre = edge_control(shape, position, args.height, args.width)
            path = os.path.join(args.out, "controls", f"{shape}_{position}.png")
            Image.fromarray(edges).save(path)
            controls[shape, position] = (path, centre)
    first = next(iter(controls.values()))[0]
    t_min = main_pipe.config.t_struct if args.t_min is None else args.t_min
    coop = CoopPipeline(main_pipe, from_dict(CoopRecipe, {"partners": [
        {"name": "edges", "kind": "controlnet", "base": "main", "path": args.controlnet, "control_image": first,
         "weight": args.weight, "t_min": t_min}]}))
    settings = dict(height=args.height, width=args.width, num_inference_steps=args.steps, sampler="euler",
                    guidance_scale=args.guidance, negative_prompt="")

    def judged(images, colors, centre):
        hits = []
        for image, color in zip(images, colors):
            array = np.asarray(image.convert("RGB"))
            found = foreground_centre(array)
            placed = found is not None and np.hypot(found[0] - centre[0], found[1] - centre[1]) <= args.tolerance
            hits.append((color_of(array) == color, bool(placed)))
        return hits

    colors = list(COLORS)
    scores = {}
    rows = []
    plain_images = {}  # the prompts name no position, so the text-only images do not depend on the control
    for language, index in (("en", 0), ("zh", 1)):
        tally = {"fused": [], "plain": []}
        for (shape, position), (path, centre) in controls.items():
            prompts = [captions(Scene(c, shape, "small", position, "black", 0, 0), (False, False, False))[index]
                       for c in colors]
            for seed in args.seeds:
                fused = coop(prompts, seed=seed, control_images={"edges": path}, **settings).images
                if (language, shape, seed) not in plain_images:
                    plain_images[language, shape, seed] = main_pipe(prompts, seed=seed, **settings).images
                plain = plain_images[language, shape, seed]
                tally["fused"] += judged(fused, colors, centre)
                tally["plain"] += judged(plain, colors, centre)
                if seed == args.seeds[0] and language == "en":
                    rows.append([path] + list(fused) + list(plain))
        scores[language] = {
            kind: {"color": float(np.mean([c for c, _ in hits])), "placed": float(np.mean([p for _, p in hits])),
                   "success": float(np.mean([c and p for c, p in hits])), "images": len(hits)}
            for kind, hits in tally.items()}
    samples = image_grid([image for row in rows for image in row], columns=len(rows[0]))
    samples.save(os.path.join(args.out, "samples.png"))
    report = {"model": args.model, "controlnet": args.controlnet, "weight": args.weight, "t_min": t_min,
              "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance, "tolerance": args.tolerance,
              "height": args.height, "width": args.width, "seconds": round(time.time() - start, 1), **scores}
    return write_report(args.out, report)


if __name__ == "__main__":
    main()
