"""The demo world's evaluators: a small bilingual CLIP trained on the demo dataset, and what is measured with it.

No hub weights can be fetched here, so the demo model cannot be measured with OpenAI's CLIP or the FID
Inception network. The demo CLIP (``pangu_draw_ms/demo/clip``, trained by ``tools/train.py`` stage ``clip``
with ``configs/train/demo_clip.yaml``) stands in for both, under names that say so:

* demo CLIP-score: torchmetrics' CLIP-score definition (:func:`~pangu_draw_ms.evaluation.clip_score.clip_score`)
  with the demo CLIP, per prompt language (its one text tower reads both languages);
* FD-demoCLIP: the Fréchet distance (FID's formula) between the demo CLIP's image features of the generated
  images and of renders of the same prompts' scenes - NOT an FID, whose features are Inception-v3's;
* the judge: the share of images whose colour and shape are the prompt's (:mod:`pangu_draw_ms.demo.judge`);
* IS-demoCLIP: the Inception Score's formula over the demo CLIP's zero-shot class probabilities for the demo
  world's colour x shape classes (the role Inception-v3's ImageNet classes play in IS) - NOT an IS either.

The demo CLIP sees a whole image squashed to its ``image_size`` square (a centre crop, as CLIP's own
preprocessing does, would cut off shapes drawn at the left or right of a wide image), in [-1, 1].
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Sequence

import numpy as np

from ..config import CLIPConfig, load_config
from ..demo.shapes import COLORS, SHAPES, Scene, captions, heldout_combinations, render
from ..images import load_image, resize, to_array
from ..io.checkpoint import load_tensors
from ..io.state import load_state
from ..tokenizers import Tokenizer, build_tokenizer
from .clip_score import CLIPModel, image_list
from .prompts import EvalPrompt

DEMO_CLIP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "clip")
CLIP_WEIGHTS = "clip.safetensors"
CLIP_CONFIG = "config.yaml"
HELDOUT_SEED = 0  # the held-out combinations of the shipped demo data (tools/make_demo_data.py --seed 0)


class DemoCLIP(CLIPModel):
    """The demo world's CLIP: :class:`CLIPModel` towers, the demo's SentencePiece tokens, whole images in [-1, 1]."""

    def __init__(self, config: CLIPConfig):
        super().__init__(config.text, config.vision)
        self.config = config

    def preprocess(self, images) -> np.ndarray:
        size = (self.vision_config.image_size,) * 2
        return to_array([resize(load_image(image).convert("RGB"), size) for image in image_list(images)])

    def default_tokenizer(self) -> Tokenizer:
        return build_tokenizer(self.text_config.tokenizer)


def load_demo_clip(folder: str = DEMO_CLIP_DIR) -> DemoCLIP:
    """The demo CLIP of a folder holding ``config.yaml`` (a CLIPConfig) and ``clip.safetensors``."""
    for name in (CLIP_CONFIG, CLIP_WEIGHTS):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{os.path.join(folder, name)} not found: a demo CLIP folder holds {CLIP_CONFIG} "
                                    f"and {CLIP_WEIGHTS} (tools/train.py with configs/train/demo_clip.yaml writes one)")
    model = DemoCLIP(load_config(os.path.join(folder, CLIP_CONFIG), CLIPConfig))
    load_state(model, load_tensors(os.path.join(folder, CLIP_WEIGHTS)), what=f"demo CLIP {folder}")
    model.set_train(False)
    return model


def scene_key(scene: Scene) -> str:
    return "/".join((scene.color, scene.shape, scene.size, scene.position, scene.background))


def scene_of(key: str, height: int = 0, width: int = 0) -> Scene:
    """The scene a held-out prompt's key names (at a size, for rendering)."""
    color, shape, size, position, background = key.split("/")
    return Scene(color, shape, size, position, background, height, width)


def heldout_prompts(seed: int = HELDOUT_SEED) -> List[EvalPrompt]:
    """The full captions of the held-out attribute combinations (no training image shows one), English then
    Chinese; each prompt's key names its scene."""
    scenes = [Scene(*combo, 0, 0) for combo in heldout_combinations(seed)]
    return [EvalPrompt(captions(scene)[k], lang, scene_key(scene)) for k, lang in enumerate(("en", "zh"))
            for scene in scenes]


def reference_renders(prompts: Sequence[EvalPrompt], height: int, width: int, per_prompt: int = 4,
                      seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) renders of each prompt's scene (``per_prompt`` each, positions jittered as in the
    training data): the real images FD-demoCLIP compares generated ones with."""
    rng = np.random.default_rng([seed, 11])
    renders = []
    for prompt in dict((p.key, p) for p in prompts).values():
        for _ in range(per_prompt):
            jitter = tuple(float(v) for v in rng.uniform(-1.0, 1.0, 3))
            scene = scene_of(prompt.key, height, width)
            renders.append(render(Scene(scene.color, scene.shape, scene.size, scene.position, scene.background,
                                        height, width, jitter)))
    return np.stack(renders)


@functools.lru_cache(maxsize=1)
def _judge_classifier():
    """The judge's shape classifier, fitted once per process (seeded: every fit is the same; a fit takes
    seconds, and a report judges every seed's images)."""
    from ..demo.judge import ShapeClassifier

    return ShapeClassifier.trained_on_renders()


def judge_hits(images: Sequence[np.ndarray], prompts: Sequence[EvalPrompt]) -> Dict[str, List[bool]]:
    """Per image: colour right, shape right, both right (the demo judge against the prompt's scene)."""
    from ..demo.judge import judge

    colours, shapes = judge(images, _judge_classifier())
    scenes = [scene_of(p.key) for p in prompts]
    colour = [c == s.color for c, s in zip(colours, scenes)]
    shape = [h == s.shape for h, s in zip(shapes, scenes)]
    return {"colour": colour, "shape": shape, "both": [a and b for a, b in zip(colour, shape)]}


def zero_shot_classes() -> List[str]:
    """The demo world's colour x shape classes as English phrases ("a red circle"): 24 classes."""
    return [f"a {COLORS[c][0]} {SHAPES[s][0]}" for c in COLORS for s in SHAPES]


def zero_shot_logits(model: DemoCLIP, images) -> np.ndarray:
    """(N, classes) logits of CLIP's zero-shot classifier over :func:`zero_shot_classes`: exp(logit_scale) x
    the cosine of each image's and each class phrase's embeddings (Radford et al. 2021, sec. 3.1.2)."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    text = unit(model.text_features(zero_shot_classes()).astype(np.float64))
    image = unit(model.image_features(images).astype(np.float64))
    return np.exp(model.logit_scale.asnumpy()).item() * image @ text.T
