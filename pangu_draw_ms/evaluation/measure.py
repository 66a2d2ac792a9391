"""The metrics of an evaluation run (``tools/evaluate.py``), measured over one seed's images at a time.

Each metric gives ``{group: value}``: ``all`` for a measure of the whole image set (FID, IS), the prompt
language for per-language ones (CLIP-score on English prompts, CN-CLIP-score on Chinese ones, the demo
measures on each language the run has). The networks are loaded once per run, from the paths the run
names; :func:`check_metric_inputs` says what is missing before any image is drawn.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np

from .generation import ImageJob

Groups = Dict[str, float]


def check_metric_inputs(metrics: Sequence[str], settings: Mapping[str, object]) -> None:
    """One clear error for the first metric whose inputs are missing (``settings``: the run's arguments)."""
    needs = {"fid": ("fid_reference", "inception"), "is": ("inception",), "clip": ("clip_model",),
             "cnclip": ("cn_clip_model",)}
    what = {"fid_reference": "--fid-reference (a folder of reference images or a pytorch-fid .npz of mu/sigma)",
            "inception": "--inception (the FID Inception weights, pt_inception-2015-12-05-6726825d.pth)",
            "clip_model": "--clip-model (a transformers CLIPModel folder)",
            "cn_clip_model": "--cn-clip-model (a Chinese-CLIP checkpoint of the cn_clip package)"}
    for metric in metrics:
        for name in needs.get(metric, ()):
            path = settings.get(name)
            if not path:
                raise ValueError(f"metric {metric} needs {what[name]}")
            if not os.path.exists(path):
                raise FileNotFoundError(f"metric {metric}: {path} does not exist ({what[name]})")


def _by_language(jobs: Sequence[ImageJob]) -> Dict[str, List[int]]:
    groups: Dict[str, List[int]] = {}
    for k, job in enumerate(jobs):
        groups.setdefault(job.prompt.lang, []).append(k)
    return groups


class RunMeasures:
    """Measures one seed's images at a time; loads each network the first time a metric needs it."""

    def __init__(self, settings: Mapping[str, object]):
        self.settings = settings
        self._networks: Dict[str, object] = {}
        self._inception_outputs = None

    def _network(self, name: str, load: Callable[[], object]):
        if name not in self._networks:
            self._networks[name] = load()
        return self._networks[name]

    def inception(self):
        from ..io.inception import load_fid_inception

        return self._network("inception", lambda: load_fid_inception(self.settings["inception"]))

    def clip_model(self):
        from .clip_score import load_clip_model

        return self._network("clip", lambda: load_clip_model(self.settings["clip_model"]))

    def cn_clip_model(self):
        from .cn_clip import load_cn_clip

        return self._network("cnclip", lambda: load_cn_clip(self.settings["cn_clip_model"],
                                                             self.settings.get("cn_clip_arch") or "ViT-B-16"))

    def demo_clip(self):
        from .demo import DEMO_CLIP_DIR, load_demo_clip

        return self._network("democlip", lambda: load_demo_clip(self.settings.get("demo_clip") or DEMO_CLIP_DIR))

    def __call__(self, metrics: Sequence[str], jobs: Sequence[ImageJob]) -> Dict[str, Groups]:
        """``{metric: {group: value}}`` of the images of ``jobs`` (their PNGs on disk, read a batch at a time)."""
        paths = [job.path for job in jobs]
        texts = [job.prompt.text for job in jobs]
        languages = _by_language(jobs)
        self._inception_outputs = None  # (pool features, logits) of these images, shared by FID and IS
        return {metric: getattr(self, f"_{metric}")(paths, texts, jobs, languages) for metric in metrics}

    def _inception_of(self, paths):
        from .fid import inception_outputs

        if self._inception_outputs is None:
            self._inception_outputs = inception_outputs(paths, self.inception())
        return self._inception_outputs

    # ---- one method per metric: (image paths, texts, jobs, languages) -> {group: value} ----
    def _fid(self, paths, texts, jobs, languages) -> Groups:
        from .fid import FeatureStatistics, frechet_distance, statistics_of

        generated = FeatureStatistics.from_features(self._inception_of(paths)[0])
        reference = self._network("fid_reference", lambda: statistics_of(self.settings["fid_reference"],
                                                                         self.inception()))
        return {"all": frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)}

    def _is(self, paths, texts, jobs, languages) -> Groups:
        from .inception_score import inception_score_from_logits

        return {"all": inception_score_from_logits(self._inception_of(paths)[1]).mean}

    def _clip(self, paths, texts, jobs, languages) -> Groups:
        from .clip_score import clip_score

        english = languages.get("en")
        if not english:
            raise ValueError("metric clip scores English prompts (OpenAI CLIP reads English); this run has none: "
                             "use cnclip for Chinese prompts")
        return {"en": clip_score([paths[k] for k in english], [texts[k] for k in english], self.clip_model())}

    def _cnclip(self, paths, texts, jobs, languages) -> Groups:
        from .cn_clip import cn_clip_score

        chinese = languages.get("zh")
        if not chinese:
            raise ValueError("metric cnclip scores Chinese prompts; this run has none: use clip for English prompts")
        return {"zh": cn_clip_score([paths[k] for k in chinese], [texts[k] for k in chinese], self.cn_clip_model())}

    def _democlip(self, paths, texts, jobs, languages) -> Groups:
        from .clip_score import clip_score

        model = self.demo_clip()
        return {lang: clip_score([paths[k] for k in ks], [texts[k] for k in ks], model)
                for lang, ks in languages.items()}

    def _fd_democlip(self, paths, texts, jobs, languages) -> Groups:
        """Per language and over all images; a group of fewer than 2 images has no covariance and is left out."""
        from ..images import image_size
        from .demo import reference_renders
        from .fid import FeatureStatistics, frechet_distance

        model = self.demo_clip()
        height, width = image_size(paths[0])
        reference = FeatureStatistics.from_features(
            model.image_features(reference_renders([job.prompt for job in jobs], height, width)))
        features = model.image_features(paths)
        groups = dict(languages, all=list(range(len(paths)))) if len(languages) > 1 else dict(languages)
        results = {}
        for group, ks in groups.items():
            if len(ks) >= 2:
                stats = FeatureStatistics.from_features(features[ks])
                results[group] = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
        return results

    def _is_democlip(self, paths, texts, jobs, languages) -> Groups:
        """Over all images, one split: a seed's image set is small (tens), and IS splits shrink it further."""
        from .demo import zero_shot_logits
        from .inception_score import inception_score_from_logits

        return {"all": inception_score_from_logits(zero_shot_logits(self.demo_clip(), paths), splits=1).mean}

    def _judge(self, paths, texts, jobs, languages) -> Groups:
        from ..images import load_image
        from .demo import judge_hits

        images = [np.asarray(load_image(path).convert("RGB")) for path in paths]
        hits = judge_hits(images, [job.prompt for job in jobs])["both"]
        return {lang: 100.0 * float(np.mean([hits[k] for k in ks])) for lang, ks in languages.items()}
