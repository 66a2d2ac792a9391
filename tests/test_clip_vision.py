"""CLIP vision encoder and CLIP image preprocessing: parity with transformers' CLIPVisionModelWithProjection
and CLIPImageProcessor (identical seeded weights, fp32), and with diffusers' image-variation pipeline."""
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImageVariationPipeline
from mindspore.nn.utils import no_init_parameters
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from pangu_draw_ms.config import ConfigError, VisionEncoderConfig, from_dict
from pangu_draw_ms.io.state import StateDictError, load_state
from pangu_draw_ms.io.transformers_clip import clip_vision_from_transformers
from pangu_draw_ms.models.clip_vision import CLIPVisionEncoder
from pangu_draw_ms.models.layers import count_parameters
from pangu_draw_ms.pipelines.image_processing import preprocess_clip_images

from helpers import assert_close, randomize_torch_module, torch_state_numpy

TINY = VisionEncoderConfig(image_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=4,
                           intermediate_size=96, hidden_act="quick_gelu", projection_dim=16)
# The image encoder of SD image variations (lambdalabs/sd-image-variations-diffusers): CLIP ViT-L/14.
VIT_L_14 = VisionEncoderConfig(image_size=224, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                               intermediate_size=4096, hidden_act="quick_gelu", projection_dim=768)


def transformers_config(config: VisionEncoderConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
                            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                            intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
                            layer_norm_eps=config.layer_norm_eps, projection_dim=config.projection_dim)


@pytest.fixture(scope="module")
def reference():
    """transformers' model of TINY with every weight re-randomised, class and position embeddings included."""
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(transformers_config(TINY)).eval()
    before = model.vision_model.embeddings.class_embedding.detach().clone()
    randomize_torch_module(model, seed=3)
    assert not torch.equal(before, model.vision_model.embeddings.class_embedding)
    return model


def ours_from(reference) -> CLIPVisionEncoder:
    cell = CLIPVisionEncoder(TINY)
    load_state(cell, clip_vision_from_transformers(torch_state_numpy(reference)), what="transformers CLIP vision")
    return cell


def random_images(seed=0):
    """PIL images of several shapes and modes: landscape, portrait, square, smaller than the crop (upscaled),
    an odd margin on both axes, RGBA and grayscale (converted to RGB)."""
    rng = np.random.default_rng(seed)
    shapes_modes = [((45, 60), "RGB"), ((70, 41), "RGB"), ((32, 32), "RGB"), ((17, 23), "RGB"), ((51, 39), "RGBA"),
                    ((40, 57), "L")]
    images = []
    for (height, width), mode in shapes_modes:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        images.append(Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode))
    return images


def test_outputs_match_transformers(ms_mode, reference):
    pixel_values = np.random.default_rng(1).standard_normal((2, 3, TINY.image_size, TINY.image_size)).astype(np.float32)
    last_hidden_state, image_embeds = ours_from(reference)(ms.Tensor(pixel_values))
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixel_values))
    assert last_hidden_state.shape == (2, TINY.num_positions, TINY.hidden_size)
    assert image_embeds.shape == (2, TINY.projection_dim)
    assert_close(last_hidden_state.asnumpy(), expected.last_hidden_state.numpy(), what=f"last_hidden_state ({ms_mode})")
    assert_close(image_embeds.asnumpy(), expected.image_embeds.numpy(), what=f"image_embeds ({ms_mode})")


def test_image_embeddings_match_the_image_variation_pipeline(reference):
    """Our preprocessing + encoder against the embedding diffusers' StableDiffusionImageVariationPipeline
    computes for the UNet: its feature extractor (a CLIPImageProcessor) on PIL images, then the encoder's
    image_embeds as a one-token context (B, 1, projection_dim)."""
    images = random_images(seed=2)
    processor = CLIPImageProcessor(size={"shortest_edge": TINY.image_size},
                                   crop_size={"height": TINY.image_size, "width": TINY.image_size})
    pipeline_parts = SimpleNamespace(image_encoder=reference, feature_extractor=processor)
    with torch.no_grad():
        expected = StableDiffusionImageVariationPipeline._encode_image(
            pipeline_parts, images, "cpu", num_images_per_prompt=1, do_classifier_free_guidance=False).numpy()
    _, image_embeds = ours_from(reference)(ms.Tensor(preprocess_clip_images(images, TINY.image_size)))
    assert expected.shape == (len(images), 1, TINY.projection_dim)
    assert_close(image_embeds.asnumpy()[:, None], expected, what="image-variation context")


@pytest.mark.parametrize("image_size", [224, 32])
def test_preprocessing_matches_clip_image_processor(image_size):
    images = random_images(seed=image_size)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    expected = processor(images=images, return_tensors="np").pixel_values
    ours = preprocess_clip_images(images, image_size)
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (len(images), 3, image_size, image_size)
    # Same PIL resize, so the same uint8 pixels; only the float rounding of scale and normalise differs.
    difference = float(np.abs(ours - expected).max())
    print(f"preprocessing at {image_size}: max |ours - CLIPImageProcessor| = {difference:.3e}")
    assert difference <= 1e-5


def test_preprocessing_takes_uint8_arrays_like_pil_images():
    pixels = np.random.default_rng(4).integers(0, 256, size=(2, 40, 29, 3), dtype=np.uint8)
    from_arrays = preprocess_clip_images(list(pixels), 32)
    np.testing.assert_array_equal(from_arrays, preprocess_clip_images([Image.fromarray(p) for p in pixels], 32))
    np.testing.assert_array_equal(preprocess_clip_images(pixels[0], 32), from_arrays[:1])


def test_preprocessing_rejects_what_it_cannot_read():
    with pytest.raises(TypeError, match=r"image 1 is an array of dtype float32 and shape \(8, 8, 3\); pass a PIL"):
        preprocess_clip_images([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(TypeError, match="image 0 is an array of dtype uint8 and shape \\(3, 8, 8\\)"):
        preprocess_clip_images(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="got no images"):
        preprocess_clip_images([])


def test_encoder_rejects_pixel_values_of_another_size(ms_mode):
    cell = CLIPVisionEncoder(VisionEncoderConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=1,
                                                 num_heads=2, intermediate_size=32, projection_dim=8))
    with pytest.raises(ValueError, match=r"expected \(batch, 3, 16, 16\), normalised RGB"):
        cell(ms.Tensor(np.zeros((1, 3, 24, 24), np.float32)))


def test_mapping_drops_position_ids_accepts_mindspore_suffixes_and_rejects_foreign_keys(reference):
    state = torch_state_numpy(reference)
    expected = clip_vision_from_transformers(state)
    state["vision_model.embeddings.position_ids"] = np.arange(TINY.num_positions)[None]
    assert sorted(clip_vision_from_transformers(state)) == sorted(expected)
    mindspore_named = {k.replace("pre_layrnorm.weight", "pre_layrnorm.gamma").replace("post_layernorm.bias",
                                                                                     "post_layernorm.beta")
                       .replace("position_embedding.weight", "position_embedding.embedding_table"): v
                       for k, v in state.items()}
    assert mindspore_named.keys() != state.keys()
    assert sorted(clip_vision_from_transformers(mindspore_named)) == sorted(expected)
    assert expected["embeddings.patch_embedding.weight"].ndim == 4  # a convolution keeps `weight`
    with pytest.raises(StateDictError, match="text_model.final_layer_norm.weight"):
        clip_vision_from_transformers({**state, "text_model.final_layer_norm.weight": np.ones(4)})


def test_sd_image_variations_encoder_has_the_names_shapes_and_count_of_transformers():
    """ViT-L/14 built lazily (nothing allocated) against transformers' model on the meta device."""
    with no_init_parameters():
        cell = CLIPVisionEncoder(VIT_L_14)
    with torch.device("meta"):
        reference = CLIPVisionModelWithProjection(transformers_config(VIT_L_14))
    assert count_parameters(cell) == sum(p.numel() for p in reference.parameters())
    # Zero-stride views stand in for the meta tensors: the mapping sees every on-disk name and shape.
    on_disk = {name: np.broadcast_to(np.float32(0), tuple(value.shape))
               for name, value in reference.state_dict().items()}
    mapped = {name: value.shape for name, value in clip_vision_from_transformers(on_disk).items()}
    assert mapped == {p.name: tuple(p.shape) for p in cell.get_parameters()}


def test_config_validates_and_loads_from_a_mapping():
    assert from_dict(VisionEncoderConfig, {"image_size": 32, "patch_size": 8, "hidden_size": 48, "num_layers": 2,
                                           "num_heads": 4, "intermediate_size": 96, "projection_dim": 16}) == TINY
    assert TINY.num_patches == 16 and TINY.num_positions == 17
    with pytest.raises(ConfigError, match="image_size 225 is not divisible by patch_size 14.*image_size 224 or 238"):
        VisionEncoderConfig(image_size=225)
    with pytest.raises(ConfigError, match="hidden_size 1024 not divisible by num_heads 12"):
        VisionEncoderConfig(num_heads=12)
    with pytest.raises(ConfigError, match="hidden_act 'relu' is not valid"):
        VisionEncoderConfig(hidden_act="relu")
    with pytest.raises(ConfigError, match="projection_dim must be >= 1, got 0"):
        VisionEncoderConfig(projection_dim=0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['num_channels'\]"):
        from_dict(VisionEncoderConfig, {"num_channels": 3})
