"""CLIP score: our CLIPModel against a tiny random transformers CLIPModel (save_pretrained folder, loaded by
us), and our score against torchmetrics' clip_score computed with that same model object."""
import gzip
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torchmetrics_clip = pytest.importorskip("torchmetrics.functional.multimodal")

from transformers.models.clip.tokenization_clip import bytes_to_unicode  # noqa: E402

from pangu_draw_ms.config import TextEncoderConfig, VisionEncoderConfig  # noqa: E402
from pangu_draw_ms.evaluation.clip_score import (  # noqa: E402
    CLIPModel,
    clip_score,
    clip_score_from_features,
    cosine_similarities,
    load_clip_model,
)
from pangu_draw_ms.io.state import StateDictError  # noqa: E402
from pangu_draw_ms.io.transformers_clip import (  # noqa: E402
    clip_model_configs_from_transformers,
    clip_model_from_transformers,
)
from pangu_draw_ms.tokenizers import resolve_vocab_path  # noqa: E402

from helpers import assert_close, randomize_torch_module, torch_state_numpy  # noqa: E402

IMAGE_SIZE = 32
PROJECTION_DIM = 16
CAPTIONS = ["a photo of a cat", "a red car parked on the street", "two dogs playing in the snow, at night",
            "an astronaut riding a horse"]
# Non-square, of several sizes: the shortest-side resize and the center crop both matter.
IMAGE_SHAPES = [(40, 56, 3), (64, 48, 3), (33, 33, 3), (90, 41, 3)]


def random_images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in IMAGE_SHAPES]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny transformers CLIPModel (OpenAI CLIP's 49,408-token vocabulary, so that the real tokenizers
    apply), every weight re-randomised, and the folder it was saved to with save_pretrained."""
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=49407),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=48, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=PROJECTION_DIM)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    randomize_torch_module(model, seed=0)
    folder = tmp_path_factory.mktemp("clip") / "tiny_clip"
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return model, str(folder)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """transformers' CLIPProcessor: a CLIPImageProcessor at IMAGE_SIZE and a CLIPTokenizer whose
    vocab.json/merges.txt are written from the bundled OpenAI CLIP BPE merges (nothing downloaded)."""
    lines = gzip.open(resolve_vocab_path("bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1: 1 + 49152 - 256 - 2]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([lines[0]] + merges) + "\n", encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                      crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def test_embeddings_match_transformers(ms_mode, reference):
    hf_model, folder = reference
    ours = load_clip_model(folder)
    images = random_images()
    pixel_values = ours.preprocess(images)
    ids = ours.default_tokenizer()(CAPTIONS)
    with torch.no_grad():
        ref_image = hf_model.get_image_features(pixel_values=torch.from_numpy(pixel_values)).numpy()
        ref_text = hf_model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).numpy()
    image = ours.image_features(images, batch_size=3)  # two batches: 3 + 1
    text = ours.text_features(CAPTIONS, batch_size=3)
    assert image.shape == text.shape == (len(CAPTIONS), PROJECTION_DIM)
    assert_close(image, ref_image, what=f"image embeddings ({ms_mode})")
    assert_close(text, ref_text, what=f"text embeddings ({ms_mode})")
    np.testing.assert_allclose(ours.logit_scale.asnumpy(), hf_model.logit_scale.detach().numpy(), rtol=0)


def test_score_matches_torchmetrics(reference, processor):
    """torchmetrics' clip_score with the same transformers model object and a CLIPProcessor: its own
    preprocessing, tokenization (padded to the longest caption, with attention mask) and math."""
    hf_model, folder = reference
    ours = load_clip_model(folder)
    images = random_images(seed=1)
    with torch.no_grad():
        expected = float(torchmetrics_clip.clip_score([torch.from_numpy(i).permute(2, 0, 1) for i in images],
                                                      CAPTIONS, lambda: (hf_model, processor)))
    score = clip_score(images, CAPTIONS, ours)
    print(f"CLIP score: ours {score:.6f}, torchmetrics {expected:.6f}, |diff| {abs(score - expected):.2e}")
    assert expected > 0, "pick images whose mean cosine is positive, or the clamp hides any difference"
    assert abs(score - expected) <= 1e-3
    # One pair at a time: each score is that pair's clamped 100 * cos.
    for image, caption in zip(images[:2], CAPTIONS[:2]):
        with torch.no_grad():
            single = float(torchmetrics_clip.clip_score(torch.from_numpy(image).permute(2, 0, 1), caption,
                                                        lambda: (hf_model, processor)))
        assert abs(clip_score(image, caption, ours) - single) <= 1e-3


def test_score_clamps_the_mean_not_each_pair():
    """torchmetrics averages 100 * cos over the pairs, then clamps the mean at 0."""
    image = np.array([[1.0, 0.0], [1.0, 0.0]])
    text = np.array([[1.0, 1.0], [-1.0, 0.2]])  # cos = 0.7071..., -0.9806...
    np.testing.assert_allclose(cosine_similarities(image, text), [2 ** -0.5, -1 / np.sqrt(1.04)])
    assert clip_score_from_features(image, text) == 0.0
    text[1] = [-1.0, 10.0]  # cos = -0.0995: the mean is positive although one pair is negative
    assert clip_score_from_features(image, text) == pytest.approx(100 * (2 ** -0.5 - 1 / np.sqrt(101)) / 2)


def test_images_given_as_one_array_or_a_list_score_alike(reference):
    ours = load_clip_model(reference[1])
    pixels = np.random.default_rng(2).integers(0, 256, size=(3, 40, 36, 3), dtype=np.uint8)
    assert clip_score(pixels, CAPTIONS[:3], ours) == clip_score(list(pixels), CAPTIONS[:3], ours)
    with pytest.raises(ValueError, match="got 3 image\\(s\\) and 2 caption\\(s\\)"):
        clip_score(pixels, CAPTIONS[:2], ours)
    with pytest.raises(ValueError, match="got no captions"):
        ours.text_features([])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ours.image_features(pixels, batch_size=0)


def test_full_model_mapping_splits_towers_and_rejects_foreign_keys(reference, tmp_path):
    hf_model, folder = reference
    state = torch_state_numpy(hf_model)
    text, vision, logit_scale = clip_model_from_transformers(state)
    assert "text_projection.weight" in text and "visual_projection.weight" in vision
    assert not any(k.startswith(("text_model.", "vision_model.")) for k in [*text, *vision])
    assert logit_scale.shape == ()
    with pytest.raises(StateDictError, match="not part of a transformers CLIPModel: unet.conv_in.weight"):
        clip_model_from_transformers({**state, "unet.conv_in.weight": np.ones(3)})
    with pytest.raises(StateDictError, match="holds 'logit_scale'"):
        clip_model_from_transformers({k: v for k, v in state.items() if k != "logit_scale"})
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_clip_model(str(tmp_path))


def test_configs_use_the_top_level_projection_dim(reference):
    config = reference[0].config.to_dict()
    config["text_config"]["projection_dim"] = config["vision_config"]["projection_dim"] = 512  # not what is built
    text, vision = clip_model_configs_from_transformers(config)
    assert text.projection_dim == vision.projection_dim == PROJECTION_DIM
    assert text.eot_token_id == 49407 and vision.image_size == IMAGE_SIZE
    with pytest.raises(ValueError, match="not a transformers CLIPConfig"):
        clip_model_configs_from_transformers(config["text_config"])
    with pytest.raises(ValueError, match="projection_dim 8 and the vision projection_dim 16 differ"):
        CLIPModel(TextEncoderConfig(hidden_size=32, num_heads=4, num_layers=1, projection_dim=8),
                  VisionEncoderConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=4,
                                      projection_dim=16))
