"""An aesthetic score of images: LAION's "improved aesthetic predictor" architecture (Schuhmann et al., LAION-5B,
the predictor trained on SAC + LAION-Logos + AVA ratings), an MLP on unit-normalised CLIP image embeddings.

The released predictor (``sac+logos+ava1-l14-linearMSE.pth``, on CLIP ViT-L/14's 768-d embeddings) is
``layers``: Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
Linear(64, 16), Linear(16, 1) - no nonlinearities, so its score is an affine function of the normalised
embedding, about 1 to 10. Its state dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``; this cell's parameter
names are the same, so ``tools/convert.py aesthetic FILE.pth`` only reads and re-saves them. PanGu-Draw's
supplement scores RAFT's images with such a predictor plus a CLIP text-image similarity.

A scorer folder holds ``config.yaml`` (:class:`AestheticConfig`) and ``aesthetic.safetensors``; the demo world's
stand-in scorer (``pangu_draw_ms/demo/aesthetic``, on the demo CLIP) is trained by
:func:`pangu_draw_ms.demo.aesthetic.train_demo_aesthetic`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from mindspore import Tensor, nn, ops

from ..config import _check, load_config
from ..io.checkpoint import load_tensors
from ..io.model_dir import write_config
from ..io.state import load_state

#: The demo world's stand-in scorer (tools/train_demo_aesthetic.py writes it).
DEMO_AESTHETIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "aesthetic")
AESTHETIC_CONFIG = "config.yaml"
AESTHETIC_WEIGHTS = "aesthetic.safetensors"


@dataclass(frozen=True)
class AestheticConfig:
    """``embed_dim``: the CLIP image embedding width (ViT-L/14: 768). ``hidden_sizes``: the widths of the Linear
    layers before the last (LAION: 1024, 128, 64, 16); ``dropouts``: the Dropout after each of the first three
    (LAION: 0.2, 0.2, 0.1; inactive when scoring)."""

    embed_dim: int = 768
    hidden_sizes: Tuple[int, ...] = (1024, 128, 64, 16)
    dropouts: Tuple[float, ...] = (0.2, 0.2, 0.1)

    def __post_init__(self):
        _check(self.embed_dim >= 1 and len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes),
               f"aesthetic: embed_dim and hidden_sizes must be >= 1, got {self.embed_dim}, {list(self.hidden_sizes)}")
        _check(len(self.dropouts) == len(self.hidden_sizes) - 1 and all(0 <= p < 1 for p in self.dropouts),
               f"aesthetic.dropouts: one rate in [0, 1) per hidden layer but the last ({len(self.hidden_sizes) - 1}), "
               f"got {list(self.dropouts)}")


class AestheticPredictor(nn.Cell):
    """Score (N,) of CLIP image embeddings (N, embed_dim), normalised to unit length first."""

    def __init__(self, config: AestheticConfig = AestheticConfig()):
        super().__init__()
        self.config = config
        widths = (config.embed_dim,) + tuple(config.hidden_sizes)
        cells = []
        for i in range(len(config.hidden_sizes)):
            cells.append(nn.Dense(widths[i], widths[i + 1]))
            if i < len(config.dropouts):
                cells.append(nn.Dropout(p=config.dropouts[i]))
        cells.append(nn.Dense(widths[-1], 1))
        self.layers = nn.SequentialCell(cells)

    def construct(self, embeddings):
        norm = ops.sqrt((embeddings * embeddings).sum(-1, keepdims=True))
        return self.layers(embeddings / ops.maximum(norm, 1e-12)).squeeze(-1)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """float64 scores of a numpy batch of embeddings."""
        return self(Tensor(np.asarray(embeddings, np.float32))).asnumpy().astype(np.float64)


def aesthetic_from_torch(state) -> Tuple[AestheticConfig, dict]:
    """``(config, weights)`` of a LAION improved-aesthetic-predictor state dict (``layers.N.weight/bias``); the
    widths come from the weights' shapes (the dropout rates are LAION's when there are three)."""
    dense = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not dense or any(f"layers.{i}.bias" not in state for i in dense):
        raise ValueError(f"not an aesthetic predictor state dict: expected layers.N.weight/bias keys, got "
                         f"{sorted(state)[:8]}")
    shapes = [tuple(np.shape(state[f"layers.{i}.weight"])) for i in dense]
    hidden = tuple(out for out, _ in shapes[:-1])
    dropouts = (0.2, 0.2, 0.1) if len(hidden) == 4 else (0.0,) * (len(hidden) - 1)
    config = AestheticConfig(embed_dim=shapes[0][1], hidden_sizes=hidden, dropouts=dropouts)
    names = [f"layers.{i}.{kind}" for i in dense for kind in ("weight", "bias")]
    expected = [p.name for p in AestheticPredictor(config).get_parameters()]
    if sorted(names) != sorted(expected):
        raise ValueError(f"aesthetic predictor layers {dense} do not follow LAION's layout (Linear, Dropout, ...); "
                         f"expected {expected}")
    return config, {name: np.asarray(state[name], np.float32) for name in names}


def save_aesthetic(directory: str, config: AestheticConfig, weights) -> dict:
    """``directory/{config.yaml, aesthetic.safetensors}``: a scorer folder :func:`load_aesthetic` reads."""
    from ..io.checkpoint import save_checkpoint

    os.makedirs(directory, exist_ok=True)
    config_path, weights_path = (os.path.join(directory, n) for n in (AESTHETIC_CONFIG, AESTHETIC_WEIGHTS))
    write_config(config, config_path)
    save_checkpoint(weights, weights_path, metadata={"component": "aesthetic_predictor"})
    return {"config": config_path, "weights": weights_path}


def load_aesthetic(directory: str) -> AestheticPredictor:
    """The predictor of a scorer folder (``config.yaml`` and ``aesthetic.safetensors``), in eval mode."""
    config_path = os.path.join(directory, AESTHETIC_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} is not an aesthetic scorer folder: it has no {AESTHETIC_CONFIG} "
                                f"(tools/convert.py aesthetic makes one from LAION's .pth)")
    model = AestheticPredictor(load_config(config_path, AestheticConfig))
    load_state(model, load_tensors(os.path.join(directory, AESTHETIC_WEIGHTS)), what=f"aesthetic scorer {directory}")
    model.set_train(False)
    return model
