"""The aesthetic scorer: LAION's improved-aesthetic-predictor layout converted and matched, and the demo scorer."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_laion_predictor_converts_and_matches_torch(tmp_path):
    """A LAION-layout torch MLP (Linear/Dropout x3, Linear, Linear; random weights) saved as .pth, converted by
    ``tools/convert.py aesthetic``: our scores of unit-normalised embeddings equal torch's within 1e-5."""
    from pangu_draw_ms.cli.convert import main as convert
    from pangu_draw_ms.evaluation.aesthetic import load_aesthetic

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                                 torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                 torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()
    torch.save({f"layers.{k}": v for k, v in layers.state_dict().items()}, tmp_path / "laion.pth")
    assert convert(["aesthetic", str(tmp_path / "laion.pth"), "--out", str(tmp_path / "scorer")]) == 0
    scorer = load_aesthetic(str(tmp_path / "scorer"))
    assert scorer.config.embed_dim == 768 and scorer.config.hidden_sizes == (1024, 128, 64, 16)
    embeddings = np.random.default_rng(0).standard_normal((5, 768)).astype(np.float32)
    with torch.no_grad():
        x = torch.tensor(embeddings)
        reference = layers(x / x.norm(dim=-1, keepdim=True)).squeeze(-1).numpy()
    np.testing.assert_allclose(scorer.score(embeddings), reference, rtol=1e-5, atol=1e-6)


def test_a_state_dict_of_another_layout_is_refused():
    from pangu_draw_ms.evaluation.aesthetic import aesthetic_from_torch

    with pytest.raises(ValueError, match="not an aesthetic predictor state dict"):
        aesthetic_from_torch({"fc.weight": np.zeros((1, 4))})


def test_shipped_demo_scorer_prefers_the_stated_good_picture():
    """The shipped demo scorer ranks renders as its rule does: big, centred, on white beats small, left, on gray."""

    from pangu_draw_ms.demo.shapes import Scene, render
    from pangu_draw_ms.evaluation.aesthetic import DEMO_AESTHETIC_DIR, load_aesthetic
    from pangu_draw_ms.evaluation.demo import load_demo_clip

    scorer = load_aesthetic(DEMO_AESTHETIC_DIR)
    clip = load_demo_clip()
    good = [render(Scene(c, "circle", "big", "center", "white", 64, 64)) for c in ("red", "blue", "green")]
    poor = [render(Scene(c, "circle", "small", "left", "gray", 64, 64)) for c in ("red", "blue", "green")]
    scores = scorer.score(clip.image_features(np.stack(good + poor)))
    assert scores[:3].min() > scores[3:].max()
