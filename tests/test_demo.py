"""The demo: its synthetic dataset, the judge of prompt following, and the shipped model drawing what it is told."""
import dataclasses
import json
import os

import numpy as np
import pytest

from pangu_draw_ms.demo import DEMO_MODEL_DIR
from pangu_draw_ms.demo.judge import ShapeClassifier, color_of, foreground, judge
from pangu_draw_ms.demo.shapes import (
    COLORS,
    SHAPES,
    Scene,
    all_combinations,
    captions,
    heldout_combinations,
    random_scene,
    render,
    write_dataset,
)

# Of the 12 colour prompts below: a model that ignores the prompt gets about 2 right (P(>= 8) < 0.1 % by
# chance); the shipped demo model draws all 12 right here and 82-83 % of the held-out prompts (README).
MIN_COLOR_HITS = 8


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_dataset_is_deterministic_bilingual_and_holds_out_its_eval_captions(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_dataset(str(tmp_path / name), 24, seed=seed, low_res_fraction=0.5, scale=0.5)
    a, b, c = (_rows(tmp_path / name / "train.jsonl") for name in "abc")
    assert a == b and a != c
    for row in a:
        assert (tmp_path / "a" / row["image"]).read_bytes() == (tmp_path / "b" / row["image"]).read_bytes()
        color_en, color_zh, _ = COLORS[row["color"]]
        shape_en, shape_zh = SHAPES[row["shape"]]
        assert f"{color_en} {shape_en}" in row["caption_en"].replace("big ", "").replace("small ", "")
        assert color_zh in row["caption_zh"] and shape_zh in row["caption_zh"]
    assert len({(r["height"], r["width"]) for r in a}) > 5  # several sizes and aspect ratios
    held = heldout_combinations(5)
    assert len(held) == len(COLORS) * len(SHAPES) == len({(h[0], h[1]) for h in held})
    seen = {(r["color"], r["shape"], r["size"], r["position"], r["background"]) for r in a}
    assert not seen & set(held)
    heldout = _rows(tmp_path / "a" / "heldout.jsonl")
    assert [(r["color"], r["shape"], r["size"], r["position"], r["background"]) for r in heldout] == held


def test_captions_name_the_same_attributes_in_both_languages():
    scene = Scene("orange", "cross", "big", "left", "white", 64, 64)
    assert captions(scene) == ("a big orange cross on the left on a white background",
                               "白色背景上左边有一个橙色的大十字形")
    assert captions(scene, (False, False, False)) == ("an orange cross", "一个橙色的十字形")
    assert captions(Scene("red", "circle", "small", "top", "black", 8, 8), (True, True, False)) == \
        ("a small red circle at the top", "上方有一个红色的小圆形")


def test_judge_reads_colour_and_shape_of_rendered_scenes():
    classifier = ShapeClassifier.trained_on_renders(num_images=600, seed=1)
    rng = np.random.default_rng(2)
    scenes = [random_scene(rng, all_combinations()) for _ in range(200)]
    colors, shapes = judge([render(s) for s in scenes], classifier)
    assert colors == [s.color for s in scenes]
    assert shapes == [s.shape for s in scenes]
    assert color_of(np.full((32, 32, 3), 128, np.uint8)) is None  # nothing drawn: no colour


def test_new_shape_data_teaches_the_star_and_keeps_the_world(tmp_path):
    """Data for the demo LoRA: about half the images stars (captioned "star" / "星形"), the rest the world's shapes;
    its held-out star captions appear in no training image; the world's own dataset is unchanged by the option;
    a judge told about the star recognises it among the world's shapes."""
    write_dataset(str(tmp_path / "plain"), 24, seed=5, low_res_fraction=0.5, scale=0.5, new_share=0.5)
    write_dataset(str(tmp_path / "world"), 24, seed=5, low_res_fraction=0.5, scale=0.5)
    assert _rows(tmp_path / "plain" / "train.jsonl") == _rows(tmp_path / "world" / "train.jsonl")
    write_dataset(str(tmp_path / "star"), 200, seed=5, low_res_fraction=0.5, scale=0.5, new_shapes=("star",),
                  new_share=0.5)
    rows, held = _rows(tmp_path / "star" / "train.jsonl"), _rows(tmp_path / "star" / "heldout.jsonl")
    stars = [r for r in rows if r["shape"] == "star"]
    assert 70 < len(stars) < 130 and all("star" in r["caption_en"] and "星形" in r["caption_zh"] for r in stars)
    assert {r["shape"] for r in rows} == set(SHAPES) | {"star"}
    assert len(held) == 2 * len(COLORS) and all(r["shape"] == "star" for r in held)
    attributes = ("color", "shape", "size", "position", "background")
    assert not {tuple(r[k] for k in attributes) for r in rows} & {tuple(r[k] for k in attributes) for r in held}
    with pytest.raises(ValueError, match="valid: \\['star'\\]"):
        write_dataset(str(tmp_path / "bad"), 2, new_shapes=("heart",))
    shapes = tuple(SHAPES) + ("star",)
    classifier = ShapeClassifier.trained_on_renders(num_images=600, seed=1, shapes=shapes)
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng, all_combinations(shapes)) for _ in range(200)]
    _, predicted = judge([render(s) for s in scenes], classifier)
    assert np.mean([p == s.shape for p, s in zip(predicted, scenes)]) >= 0.97


@pytest.fixture(autouse=True)
def demo_in_graph_mode(graph_mode):
    """The demo draws dozens of 40-step images here: compiled once, they run faster than eagerly."""


@pytest.fixture(scope="module")
def demo_pipeline():
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    if not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "config.yaml")):
        pytest.fail(f"the demo model is not shipped in {DEMO_MODEL_DIR}")
    return PanGuDrawPipeline.from_pretrained(DEMO_MODEL_DIR)


def test_shipped_demo_model_draws_the_colour_it_is_asked_for(demo_pipeline):
    """Colour following in both languages, read from the pixels of generated images: far above the 1-in-6
    rate of a model that ignores the prompt (the demo model's measured rate is in the README)."""
    requests = [("一个红色的圆形", "red"), ("a blue square", "blue"), ("一个黄色的三角形", "yellow"),
                ("a green cross", "green"), ("一个紫色的正方形", "purple"), ("an orange circle", "orange"),
                ("一个红色的三角形", "red"), ("a blue cross", "blue"), ("一个黄色的圆形", "yellow"),
                ("a green square", "green"), ("一个紫色的十字形", "purple"), ("an orange triangle", "orange")]
    out = demo_pipeline([p for p, _ in requests], height=64, width=64, seed=0)
    images = [np.asarray(image.convert("RGB")) for image in out.images]
    assert all(image.shape == (64, 64, 3) for image in images)
    hits = [color_of(image) == color for image, (_, color) in zip(images, requests)]
    print("requested / drawn:", [(c, color_of(i)) for i, (_, c) in zip(images, requests)])
    assert sum(hits) >= MIN_COLOR_HITS, hits
    assert sum(hits[0::2]) >= 3 and sum(hits[1::2]) >= 3  # both languages (zh and en alternate)
    # The two generators really split the trajectory at t_struct.
    experts = {expert for _, expert in out.info["expert_trace"]}
    assert experts == {"structure", "texture"}


def test_shipped_demo_lora_teaches_the_model_stars(demo_pipeline):
    """The demo LoRA (stage lora, on both generators): asked for a big star in six colours and both languages, the
    base model draws crosses; with the LoRA its shapes are stars by the judge far more often (the judge's mean star
    probability and its count; unloading restores the weights bit for bit, tests/test_lora.py)."""
    from pangu_draw_ms.demo import DEMO_STAR_LORA_DIR

    classifier = ShapeClassifier.trained_on_renders(shapes=tuple(SHAPES) + ("star",))
    prompts = [f"a big {COLORS[c][0]} star" if i % 2 == 0 else f"一个{COLORS[c][1]}的大星形"
               for i, c in enumerate(COLORS)]

    def draw():  # 12 images in one batch: the batch size of the other tests here, whose step graphs it reuses
        images = [np.asarray(im.convert("RGB")) for im in demo_pipeline(prompts * 2, height=64, width=64).images]
        probabilities = [classifier.probabilities(im) for im in images]
        star = classifier.names.index("star")
        return np.mean([0.0 if p is None else p[star] for p in probabilities]), \
            sum(classifier.predict(im) == "star" for im in images)

    base_probability, base_stars = draw()
    demo_pipeline.load_lora(DEMO_STAR_LORA_DIR)
    try:
        lora_probability, lora_stars = draw()
    finally:
        demo_pipeline.unload_loras()
    print(f"P(star) {base_probability:.3f} -> {lora_probability:.3f}; stars {base_stars} -> {lora_stars} of 12")
    assert lora_probability > base_probability + 0.1 and lora_stars >= base_stars + 2


def test_shipped_demo_controlnet_puts_the_shape_where_its_outline_is(demo_pipeline):
    """Coop-Diffusion of the demo model with its edge ControlNet (the bundled recipe): the drawn shape lands
    on the outline of the control image, wherever that is - which the text alone does not do."""
    from pangu_draw_ms.config import CONFIG_DIR, CoopRecipe, load_config
    from pangu_draw_ms.demo.judge import foreground_centre
    from pangu_draw_ms.demo.shapes import edge_control
    from pangu_draw_ms.pipelines.coop import CoopPipeline

    recipe = load_config(os.path.join(CONFIG_DIR, "recipes", "demo_controlnet.yaml"), CoopRecipe)
    root = os.path.dirname(os.path.dirname(DEMO_MODEL_DIR))  # the recipe's paths are relative to the repository
    recipe = dataclasses.replace(recipe, partners=tuple(
        dataclasses.replace(p, path=os.path.join(root, p.path), control_image=os.path.join(root, p.control_image))
        for p in recipe.partners))
    coop = CoopPipeline(demo_pipeline, recipe)
    requests = [(prompt, shape, position) for position in ("left", "right", "top", "bottom")
                for prompt, shape in (("一个红色的圆形", "circle"), ("a blue square", "square"),
                                      ("一个黄色的三角形", "triangle"))]
    controls = [edge_control(shape, position, 64, 64) for _, shape, position in requests]
    prompts = [prompt for prompt, _, _ in requests]
    # One batch of 12 each (a control image per image): image k from the same noise with and without control.
    images = {"fused": coop(prompts, control_images={"edges": [edges for edges, _ in controls]}, height=64,
                            width=64).images,
              "text only": demo_pipeline(prompts, height=64, width=64).images}
    placed = {kind: sum(centre is not None and np.hypot(centre[0] - cy, centre[1] - cx) < 0.12
                        for image, (_, (cy, cx)) in zip(drawn, controls)
                        for centre in [foreground_centre(np.asarray(image.convert("RGB")))])
              for kind, drawn in images.items()}
    print("shapes on the outline, of 12:", placed)
    # Measured on this machine: 10 with the ControlNet, 2 from the text alone (images 0-11 of seed 0; with image 0
    # of seed 0 for every request it was 10 and 3); eval_controlnet.py has the rates.
    assert placed["fused"] >= 5 and placed["fused"] >= placed["text only"] + 3


def test_infer_cli_draws_with_the_demo_model_when_no_weights_are_given(demo_pipeline, tmp_path, capsys):
    """``python tools/infer.py --prompt "一个红色的圆形"`` draws with the shipped model: one shape on a plain
    background (colour following is measured above)."""
    from PIL import Image

    from pangu_draw_ms.cli import infer
    # PYNATIVE: a new pipeline in GRAPH_MODE would compile every network again (compiled sampling is tested apart).
    paths = infer.main(["--prompt", "一个红色的圆形", "--out", str(tmp_path / "circle.png"), "--quiet",
                        "--mode", "pynative"])
    assert "embedded demo model" in capsys.readouterr().err
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64) and json.loads(image.text["parameters"])
        mask, _ = foreground(np.asarray(image.convert("RGB")))
    assert 0.02 < mask.mean() < 0.5  # a shape, not noise and not an empty canvas
