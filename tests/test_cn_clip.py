"""Chinese-CLIP: our cells against a tiny random cn_clip CLIP (ViT + BERT) saved as cn_clip's trainer saves
checkpoints, cn_clip's tokenizer and image transform, the CN-CLIP score, and the configs and key mapping."""
import os
import warnings
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cn_clip = pytest.importorskip("cn_clip.clip")

from cn_clip.clip.model import CLIP  # noqa: E402
from mindspore.nn.utils import no_init_parameters  # noqa: E402
from PIL import Image  # noqa: E402

from pangu_draw_ms.config import ConfigError  # noqa: E402
from pangu_draw_ms.evaluation.clip_score import clip_score_from_features  # noqa: E402
from pangu_draw_ms.evaluation.cn_clip import (  # noqa: E402
    RELEASED_MODELS,
    CNCLIPConfig,
    CNCLIPModel,
    cn_clip_score,
    cn_clip_tokenizer,
    load_cn_clip,
    preprocess_cn_clip_images,
)
from pangu_draw_ms.io.cn_clip import cn_clip_from_checkpoint  # noqa: E402
from pangu_draw_ms.io.state import StateDictError, load_state  # noqa: E402
from pangu_draw_ms.models.layers import count_parameters  # noqa: E402

from helpers import assert_close, randomize_torch_module  # noqa: E402

MODEL_CONFIGS = os.path.join(os.path.dirname(cn_clip.__file__), "model_configs")
# Small towers, the real BERT-Chinese vocabulary (so that real captions tokenize), 4 heads of width 16
# in the ViT (vision_head_width is not cn_clip's default 64).
TINY = CNCLIPConfig(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                    vision_head_width=16, vocab_size=21128, text_hidden_size=32, text_num_hidden_layers=2,
                    text_num_attention_heads=4, text_intermediate_size=64, text_max_position_embeddings=64)
CAPTIONS = ["一只橘猫趴在窗台上晒太阳", "雪地里奔跑的两只小狗", "a red car 停在街边", "宇航员骑着一匹白马，油画风格！"]
IMAGE_SHAPES = [(40, 56, 3), (64, 48, 3), (33, 33, 3), (90, 41, 3)]


def cn_clip_kwargs(config: CNCLIPConfig) -> dict:
    """cn_clip CLIP(...) arguments of ``config`` (dropout off: the reference runs in eval mode anyway)."""
    return dict(embed_dim=config.embed_dim, image_resolution=config.image_resolution,
                vision_layers=config.vision_layers, vision_width=config.vision_width,
                vision_patch_size=config.vision_patch_size, vision_head_width=config.vision_head_width,
                vocab_size=config.vocab_size, text_attention_probs_dropout_prob=0.0,
                text_hidden_act=config.text_hidden_act, text_hidden_dropout_prob=0.0,
                text_hidden_size=config.text_hidden_size, text_initializer_range=0.02,
                text_intermediate_size=config.text_intermediate_size,
                text_max_position_embeddings=config.text_max_position_embeddings,
                text_num_attention_heads=config.text_num_attention_heads,
                text_num_hidden_layers=config.text_num_hidden_layers, text_type_vocab_size=config.text_type_vocab_size)


def random_images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in IMAGE_SHAPES]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny cn_clip model, every weight re-randomised, and a checkpoint saved as cn_clip's trainer
    does: ``{"epoch", "step", "name", "state_dict" (DDP-wrapped: "module." names), "optimizer"}``."""
    torch.manual_seed(0)
    model = CLIP(**cn_clip_kwargs(TINY)).eval()
    randomize_torch_module(model, seed=1)  # a seed whose mean image-caption cosine is positive (score > 0)
    path = str(tmp_path_factory.mktemp("cn_clip") / "epoch_latest.pt")
    torch.save({"epoch": 1, "step": 10, "name": "tiny", "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return model, path


def reference_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_features_match_cn_clip(ms_mode, reference):
    model, path = reference
    ours = load_cn_clip(path, TINY)
    images = random_images()
    ids = cn_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        ref_image = model.encode_image(torch.from_numpy(ours.preprocess(images))).numpy()
        ref_text = model.encode_text(ids).numpy()
    assert (ids == 0).any(), "the captions must be padded, so that the attention mask matters"
    image = ours.image_features(images, batch_size=3)
    text = ours.text_features(CAPTIONS, batch_size=3)
    assert image.shape == text.shape == (len(CAPTIONS), TINY.embed_dim)
    assert_close(image, ref_image, what=f"image features ({ms_mode})")
    assert_close(text, ref_text, what=f"text features ({ms_mode})")
    np.testing.assert_allclose(ours.logit_scale.asnumpy(), model.logit_scale.detach().numpy(), rtol=0)


def test_score_is_the_clip_score_of_cn_clip_features(reference):
    model, path = reference
    ours = load_cn_clip(path, TINY)
    images = random_images(seed=1)
    with torch.no_grad():
        ref_image = model.encode_image(torch.from_numpy(preprocess_cn_clip_images(images, 32))).numpy()
        ref_text = model.encode_text(cn_clip.tokenize(CAPTIONS)).numpy()
    ref_image /= np.linalg.norm(ref_image, axis=-1, keepdims=True)
    ref_text /= np.linalg.norm(ref_text, axis=-1, keepdims=True)
    expected = max(100 * float((ref_image * ref_text).sum(-1).mean()), 0.0)
    score = cn_clip_score(images, CAPTIONS, ours)
    print(f"CN-CLIP score: ours {score:.6f}, from cn_clip's features {expected:.6f}")
    assert expected > 0, "pick images whose mean cosine is positive, or the clamp hides any difference"
    assert abs(score - expected) <= 1e-3
    assert score == clip_score_from_features(ours.image_features(images), ours.text_features(CAPTIONS))
    with pytest.raises(TypeError, match="cn_clip_score needs a CNCLIPModel"):
        cn_clip_score(images, CAPTIONS, object())


@pytest.mark.parametrize("caption", [
    *CAPTIONS, "", "Hello, World! 你好，世界。", "Ünïcödé accents and UPPER case", "数字 2024 年 12 月 31 日 23:59",
    "emoji 🐱 and tabs\tand\nnewlines", "##wordpiece [CLS] [SEP] markers", "北京烤鸭" * 40])
def test_tokenizer_matches_cn_clip_tokenize(caption):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the last caption is truncated, which ours reports
        ours = cn_clip_tokenizer()([caption])
    np.testing.assert_array_equal(ours, cn_clip.tokenize([caption]).numpy())


def test_preprocessing_matches_cn_clip_image_transform():
    images = random_images(seed=2)
    transform = cn_clip.image_transform(TINY.image_resolution)
    expected = np.stack([transform(Image.fromarray(image)).numpy() for image in images])
    ours = preprocess_cn_clip_images(images, TINY.image_resolution)
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (len(images), 3, 32, 32)
    difference = float(np.abs(ours - expected).max())
    print(f"preprocessing: max |ours - cn_clip image_transform| = {difference:.3e}")
    assert difference <= 1e-5


def test_mapping_takes_names_with_or_without_module_prefix(reference):
    model, _ = reference
    plain = reference_state(model)
    mapped = cn_clip_from_checkpoint(plain)
    with_pooler = {f"module.{k}": v for k, v in plain.items()}
    with_pooler.update({"module.bert.pooler.dense.weight": np.ones((32, 32)),
                        "module.bert.pooler.dense.bias": np.ones(32)})
    assert sorted(cn_clip_from_checkpoint(with_pooler)) == sorted(mapped)
    load_state(CNCLIPModel(TINY), mapped)  # strict: every parameter, nothing else


def test_mapping_rejects_other_networks(reference):
    plain = reference_state(reference[0])
    with pytest.raises(StateDictError, match="not part of a Chinese-CLIP .*: text_model.final_layer_norm.weight"):
        cn_clip_from_checkpoint({**plain, "text_model.final_layer_norm.weight": np.ones(4)})
    with pytest.raises(StateDictError, match="image tower under 'visual.'.*layer1.0.conv1.weight.*RN50"):
        cn_clip_from_checkpoint({**plain, "visual.layer1.0.conv1.weight": np.ones((4, 4, 1, 1))})
    with pytest.raises(StateDictError, match="bert.encoder.layer.0.attention.self.Wqkv.weight.*convert_state_dict"):
        cn_clip_from_checkpoint({**plain, "bert.encoder.layer.0.attention.self.Wqkv.weight": np.ones((96, 32))})
    with pytest.raises(StateDictError, match="no 'bert.' keys: not a Chinese-CLIP checkpoint"):
        cn_clip_from_checkpoint({k: v for k, v in plain.items() if not k.startswith("bert.")})
    with pytest.raises(StateDictError, match="no 'visual.' keys"):
        cn_clip_from_checkpoint({k: v for k, v in plain.items() if not k.startswith("visual.")})
    wider = CNCLIPModel(replace(TINY, text_hidden_size=64))
    with pytest.raises(StateDictError, match="shape mismatch"):
        load_state(wider, cn_clip_from_checkpoint(plain))


@pytest.mark.parametrize("name", sorted(RELEASED_MODELS))
def test_released_configs_are_cn_clip_model_configs(name):
    vision, text = RELEASED_MODELS[name].split("@")
    from_files = CNCLIPConfig.from_cn_clip_json(os.path.join(MODEL_CONFIGS, f"{vision}.json"),
                                                os.path.join(MODEL_CONFIGS, f"{text}.json"))
    assert CNCLIPConfig.released(name) == from_files


def test_vit_b_16_has_the_names_shapes_and_count_of_cn_clip():
    """The released ViT-B-16 model built lazily (nothing allocated) against cn_clip's on the meta device."""
    config = CNCLIPConfig.released("ViT-B-16")
    with no_init_parameters():
        cell = CNCLIPModel(config)
    with torch.device("meta"):
        reference = CLIP(**cn_clip_kwargs(config))
    assert count_parameters(cell) == sum(p.numel() for p in reference.parameters())
    on_disk = {f"module.{name}": np.broadcast_to(np.float32(0), tuple(value.shape))
               for name, value in reference.state_dict().items()}
    mapped = {name: value.shape for name, value in cn_clip_from_checkpoint(on_disk).items()}
    assert mapped == {p.name: tuple(p.shape) for p in cell.get_parameters()}


def test_config_rejects_what_is_not_implemented():
    with pytest.raises(ConfigError, match="ModifiedResNet image tower"):
        CNCLIPConfig.from_cn_clip_json(os.path.join(MODEL_CONFIGS, "RN50.json"),
                                       os.path.join(MODEL_CONFIGS, "RBT3-chinese.json"))
    with pytest.raises(ConfigError, match="unknown released model 'RN50'"):
        CNCLIPConfig.released("RN50")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['vision_dropout'\]"):
        CNCLIPConfig.from_cn_clip_json({"vision_dropout": 0.1}, {})
    with pytest.raises(ConfigError, match="text_hidden_act 'relu' is not implemented"):
        CNCLIPConfig(text_hidden_act="relu")
    with pytest.raises(ConfigError, match="image_resolution 225 is not divisible by vision_patch_size 16"):
        CNCLIPConfig(image_resolution=225)
    with pytest.raises(ConfigError, match="context_length 600 exceeds text_max_position_embeddings 512"):
        CNCLIPConfig(context_length=600)
