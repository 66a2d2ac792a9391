"""RAFT for the prompt enhancer: reward-ranked fine-tuning (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for
Generative Foundation Model Alignment", arXiv 2304.06767), as PanGu-Draw's supplement applies it.

One round: sample K expansions of each short prompt with the current enhancer, draw each with the image model,
score each image (reward = w_a x aesthetic score + w_c x CLIP-score against the SHORT prompt: the image should be
good and still show what the user asked for), keep the best expansion of each prompt, and fine-tune the enhancer
on those (short -> best) pairs with the supervised loss. Stage ``prompt_raft`` of ``tools/train.py`` runs the
rounds (:class:`~pangu_draw_ms.prompting.config.PromptTrainConfig`); this module holds what a round computes.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Sequence

import numpy as np

from .config import PromptTrainConfig
from .enhancer import PromptEnhancer

#: ``rewards(shorts, expansions, image_indices) -> (N,) rewards``: one image per expansion.
RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[int]], np.ndarray]


def best_pairs(prompts: Sequence[Dict[str, str]], candidates: Sequence[Sequence[str]],
               rewards: np.ndarray) -> List[Dict[str, object]]:
    """For each prompt row (``short``, ``lang``), the pair with its highest-reward candidate (the first on ties; an
    empty candidate, drawn as the short prompt itself, stands for it), with every candidate's reward recorded."""
    rewards = np.asarray(rewards, np.float64)
    pairs = []
    for row, options, scores in zip(prompts, candidates, rewards):
        best = int(np.argmax(scores))
        pairs.append({"short": row["short"], "enriched": options[best] or row["short"], "lang": row.get("lang", "en"),
                      "reward": float(scores[best]), "candidates": list(options), "rewards": scores.tolist()})
    return pairs


def round_prompts(rows: Sequence[Dict[str, str]], count: int, seed: int, round_index: int) -> List[Dict[str, str]]:
    """``count`` distinct short prompts (with their language) of the pair rows: a draw seeded by (seed, round)."""
    distinct = list({row["short"]: {"short": row["short"], "lang": row.get("lang", "en")} for row in rows}.values())
    order = np.random.default_rng([seed, round_index, 29]).permutation(len(distinct))
    return [distinct[i] for i in order[:count]]


def score_candidates(enhancer: PromptEnhancer, prompts: Sequence[Dict[str, str]], first_prompt_index: int,
                     settings: PromptTrainConfig, seed: int, reward: RewardFn):
    """``(candidates, rewards (P, K))`` of ``prompts``, prompt p of the round being number ``first_prompt_index +
    p``: candidate j of prompt n draws from ``(seed, n, j)`` and its image is image n of the round (the K images of
    a prompt share their initial noise)."""
    shorts = [row["short"] for row in prompts]
    candidates = enhancer.enhance(shorts, settings.decoding(seed), first_prompt_index)
    k = settings.candidates
    flat = [c or s for s, options in zip(shorts, candidates) for c in options]  # an empty rewrite draws the prompt
    indices = [first_prompt_index + p for p in range(len(shorts)) for _ in range(k)]
    rewards = np.asarray(reward([s for s in shorts for _ in range(k)], flat, indices), np.float64)
    return candidates, rewards.reshape(len(shorts), k)


class ImageReward:
    """RAFT's reward of drawn expansions: ``aesthetic_weight`` x the aesthetic scorer's score of the image's CLIP
    embedding + ``clip_weight`` x 100 max(cos(image, short prompt), 0) (torchmetrics' CLIP-score of one pair),
    both from the same demo CLIP. Images are drawn by ``pipe`` at its default size with ``sampling_steps`` and
    ``guidance_scale``; image n's noise comes from (seed, n)."""

    def __init__(self, pipe, clip, aesthetic, settings: PromptTrainConfig, seed: int):
        self.pipe, self.clip, self.aesthetic, self.settings, self.seed = pipe, clip, aesthetic, settings, seed

    @classmethod
    def for_model(cls, model_dir: str, settings: PromptTrainConfig, seed: int) -> "ImageReward":
        """The reward with the image model of ``model_dir`` (a model directory), the demo CLIP folder
        ``settings.clip`` and the aesthetic scorer folder ``settings.aesthetic`` (defaults: the shipped demo ones).
        Stage ``prompt_raft`` draws through this: the one place training reaches a pipeline."""
        from ..evaluation.aesthetic import DEMO_AESTHETIC_DIR, load_aesthetic
        from ..evaluation.demo import DEMO_CLIP_DIR, load_demo_clip
        from ..pipelines.pangu_draw import PanGuDrawPipeline

        return cls(PanGuDrawPipeline.from_pretrained(model_dir), load_demo_clip(settings.clip or DEMO_CLIP_DIR),
                   load_aesthetic(settings.aesthetic or DEMO_AESTHETIC_DIR), settings, seed)

    def images(self, expansions: Sequence[str], indices: Sequence[int]) -> List[np.ndarray]:
        """uint8 (H, W, 3) images of ``expansions``, expansion i drawn from the noise of image ``indices[i]``."""
        settings = dict(seed=self.seed, num_inference_steps=self.settings.sampling_steps,
                        guidance_scale=self.settings.guidance_scale)
        run = self.pipe.plan(list(expansions), **settings)
        noise = np.stack([np.random.default_rng([self.seed, int(i)]).standard_normal(
            run.latent_shape[1:], dtype=np.float32) for i in indices])
        return [np.asarray(image) for image in self.pipe(list(expansions), noise=noise, **settings).images]

    def __call__(self, shorts: Sequence[str], expansions: Sequence[str], indices: Sequence[int]) -> np.ndarray:
        from ..evaluation.clip_score import SCORE_SCALE, cosine_similarities

        images = self.images(expansions, indices)
        image_features = self.clip.image_features(images)
        text_features = self.clip.text_features(list(shorts))
        clip_scores = SCORE_SCALE * np.maximum(cosine_similarities(image_features, text_features), 0.0)
        aesthetic = self.aesthetic.score(image_features)
        return self.settings.aesthetic_weight * aesthetic + self.settings.clip_weight * clip_scores


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """Rows as JSON lines, atomically."""
    from ..io.checkpoint import atomic_output

    with atomic_output(path) as partial:
        with open(partial, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def round_files(directory: str, round_index: int, rank: int):
    """(this worker's scored candidates, the round's merged best pairs) of RAFT round ``round_index``."""
    os.makedirs(directory, exist_ok=True)
    return (os.path.join(directory, f"round_{round_index}.rank_{rank}.jsonl"),
            os.path.join(directory, f"round_{round_index}.jsonl"))
