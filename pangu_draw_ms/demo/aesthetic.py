"""The demo world's stand-in for aesthetic quality, and the demo aesthetic scorer trained on it.

No human ratings exist for the demo world, so "a good picture" is a rule, stated plainly (a stand-in for LAION's
SAC/AVA ratings, nothing like human taste): a good demo picture shows its shape BIG, in the CENTRE, on a WHITE or
BLACK (high-contrast) background. Its score on LAION's 1-10 scale is

    1 + 4 [size is big] + 3 [position is center] + 2 [background is white or black].

The demo scorer is LAION's predictor architecture (:class:`~pangu_draw_ms.evaluation.aesthetic.AestheticPredictor`)
on the demo CLIP's image embeddings, fitted (mean squared error, Adam) to that rule on renders of random scenes;
it scores generated images the way LAION's scores photographs, through their CLIP embedding.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from .shapes import Scene, all_combinations, random_scene, render

GOOD_BACKGROUNDS = ("white", "black")
#: The scorer's architecture on the demo CLIP's 64-d embeddings: LAION's layout, narrower.
DEMO_HIDDEN_SIZES = (64, 32, 16, 8)
DEMO_DROPOUTS = (0.1, 0.1, 0.0)


def demo_aesthetic_target(size: str, position: str, background: str) -> float:
    """The rule's score of a scene's attributes (see the module docstring), 1 to 10."""
    return 1.0 + 4.0 * (size == "big") + 3.0 * (position == "center") + 2.0 * (background in GOOD_BACKGROUNDS)


def train_demo_aesthetic(clip, directory: str, num_images: int = 3000, steps: int = 1500, seed: int = 0,
                         side: int = 64) -> Dict[str, float]:
    """Fit the demo scorer to the rule on ``num_images`` renders of random scenes (``side`` x ``side``, every
    attribute combination, positions jittered as in the training data), the last fifth held out; save it into
    ``directory``. Returns the held-out RMSE and Pearson correlation with the rule."""
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    from ..evaluation.aesthetic import AestheticConfig, AestheticPredictor, save_aesthetic
    from ..io.state import cell_state

    rng = np.random.default_rng([seed, 23])
    scenes = [random_scene(rng, all_combinations()) for _ in range(num_images)]
    images = np.stack([render(Scene(s.color, s.shape, s.size, s.position, s.background, side, side, s.jitter))
                       for s in scenes])
    embeddings = clip.image_features(images).astype(np.float32)
    targets = np.array([demo_aesthetic_target(s.size, s.position, s.background) for s in scenes], np.float32)
    split = num_images * 4 // 5
    ms.set_seed(seed)
    model = AestheticPredictor(AestheticConfig(embed_dim=embeddings.shape[1], hidden_sizes=DEMO_HIDDEN_SIZES,
                                               dropouts=DEMO_DROPOUTS))
    optimizer = nn.Adam(model.trainable_params(), learning_rate=3e-3)

    def loss_fn(x, y):
        return ops.mean((model(x) - y) ** 2)

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)
    x, y = Tensor(embeddings[:split]), Tensor(targets[:split])
    model.set_train(True)
    for _ in range(steps):
        _, grads = grad_fn(x, y)
        optimizer(grads)
    model.set_train(False)
    predicted = model.score(embeddings[split:])
    truth = targets[split:].astype(np.float64)
    save_aesthetic(directory, model.config, cell_state(model))
    return {"heldout_rmse": float(np.sqrt(np.mean((predicted - truth) ** 2))),
            "heldout_pearson": float(np.corrcoef(predicted, truth)[0, 1]), "images": num_images}
