"""Converters honour every option of a diffusers/transformers config.json or refuse it: the option tables
cover the installed libraries, options that change the computation are refused when set, options that
do not change it leave our config as it was, unknown options are refused."""
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pangu_draw_ms.io.config_options import ConfigOptions, UnsupportedOptionError
from pangu_draw_ms.io.diffusers_controlnet import CONTROLNET_OPTIONS, controlnet_config_from_diffusers
from pangu_draw_ms.io.diffusers_unet import UNET_OPTIONS, diffusers_unet_kwargs, unet_config_from_diffusers
from pangu_draw_ms.io.diffusers_vae import VAE_OPTIONS, vae_config_from_diffusers
from pangu_draw_ms.io.transformers_clip import (
    CLIP_OPTIONS,
    TEXT_OPTIONS,
    VISION_OPTIONS,
    clip_model_configs_from_transformers,
    text_encoder_config_from_transformers,
    vision_encoder_config_from_transformers,
)

from helpers import SD15_LIKE, SDXL_LIKE, diffusers_unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNSUPPORTED = "a-value-no-converter-supports"


def _init_options(cls) -> set:
    return {name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _unet_json(config=SDXL_LIKE) -> dict:
    """A full config.json as diffusers writes it for ``config``: every option of the installed version."""
    return dict(diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(config)).config)


def _vae_json() -> dict:
    from test_vae import TINY as VAE_TINY
    from test_vae import diffusers_reference

    return dict(diffusers_reference(VAE_TINY).config)


def _text_json() -> dict:
    return transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, eos_token_id=2).to_dict()


def _vision_json() -> dict:
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8).to_dict()


@pytest.mark.parametrize("cls, options", [("UNet2DConditionModel", UNET_OPTIONS),
                                          ("ControlNetModel", CONTROLNET_OPTIONS),
                                          ("AutoencoderKL", VAE_OPTIONS)])
def test_tables_cover_every_option_of_the_installed_diffusers(cls, options):
    missing = _init_options(getattr(diffusers, cls)) - options.known
    assert not missing, f"{cls} options no table classifies: {sorted(missing)}"


@pytest.mark.parametrize("config, options", [(_text_json, TEXT_OPTIONS), (_vision_json, VISION_OPTIONS),
                                             (lambda: transformers.CLIPConfig().to_dict(), CLIP_OPTIONS)])
def test_tables_cover_every_option_of_the_installed_transformers(config, options):
    keys = set(config()) | _init_options(transformers.PretrainedConfig)
    missing = {k for k in keys if not k.startswith("_")} - options.known
    assert not missing, f"{options.what}: options no table classifies: {sorted(missing)}"


def test_a_table_puts_each_option_in_one_class():
    with pytest.raises(ValueError, match=r"more than one class: \['act_fn'\]"):
        ConfigOptions("x", read=("act_fn",), fixed={"act_fn": ("silu",)})


# ---- the cases ---------------------------------------------------------------------------

def test_activation_options_that_add_no_weights_are_refused():
    """timestep_post_act / time_embedding_act_fn add no weights, so a converter that skips them loads every
    tensor and computes something else: diffusers' own output moves by far more than rounding."""
    with_act = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(SD15_LIKE), timestep_post_act="silu").eval()
    plain = diffusers_unet(SD15_LIKE)
    with_act.load_state_dict(plain.state_dict())
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    context = torch.from_numpy(rng.standard_normal((1, 7, SD15_LIKE.context_dim)).astype(np.float32))
    with torch.no_grad():
        outputs = [m(x, torch.tensor([500.0]), encoder_hidden_states=context).sample.numpy() for m in (plain, with_act)]
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3 * np.abs(outputs[0]).max()

    for key in ("timestep_post_act", "time_embedding_act_fn"):
        with pytest.raises(UnsupportedOptionError, match=rf"^diffusers UNet config: {key}='silu' is not supported "
                                                         r"\(only None\)"):
            unet_config_from_diffusers({**_unet_json(SD15_LIKE), key: "silu"})


def test_per_level_layers_and_missing_norm_groups_are_clear_errors():
    base = _unet_json()
    with pytest.raises(UnsupportedOptionError, match=r"layers_per_block \[1, 2, 2\] differs per level"):
        unet_config_from_diffusers({**base, "layers_per_block": [1, 2, 2]})
    # One value per level, all equal, is the same UNet.
    assert unet_config_from_diffusers({**base, "layers_per_block": [2, 2, 2]}) == SDXL_LIKE
    with pytest.raises(UnsupportedOptionError, match=r"norm_num_groups=None \(no group norms\) is not supported"):
        unet_config_from_diffusers({**base, "norm_num_groups": None})


@pytest.mark.parametrize("name, build, convert, options", [
    ("unet", _unet_json, unet_config_from_diffusers, UNET_OPTIONS),
    ("vae", _vae_json, vae_config_from_diffusers, VAE_OPTIONS),
    ("text", _text_json, text_encoder_config_from_transformers, TEXT_OPTIONS),
    ("vision", _vision_json, vision_encoder_config_from_transformers, VISION_OPTIONS)])
def test_fixed_options_at_another_value_are_refused_and_inert_ones_change_nothing(name, build, convert, options):
    base = build()
    expected = convert(base)
    for key, accepted in options.fixed.items():
        assert convert({**base, key: accepted[0]}) == expected
        with pytest.raises(UnsupportedOptionError, match=rf"^{options.what}: {key}='{UNSUPPORTED}' is not supported"):
            convert({**base, key: UNSUPPORTED})
    for key in options.inert:
        assert convert({**base, key: 7}) == expected, key
    with pytest.raises(UnsupportedOptionError, match=r"option\(s\) brand_new_option unknown to this converter"):
        convert({**base, "brand_new_option": 1})
    assert convert({**base, "_written_by": "someone"}) == expected  # file metadata


def test_read_options_that_only_look_different():
    base = _unet_json()
    channels = base["block_out_channels"]
    assert unet_config_from_diffusers({**base, "time_embedding_dim": 4 * channels[0]}) == SDXL_LIKE
    with pytest.raises(UnsupportedOptionError, match=rf"time_embedding_dim=7 is not supported \(only None or 4 x "
                                                     rf"block_out_channels\[0\] = {4 * channels[0]}\)"):
        unet_config_from_diffusers({**base, "time_embedding_dim": 7})
    assert unet_config_from_diffusers({**base, "only_cross_attention": [False] * 3}) == SDXL_LIKE
    with pytest.raises(UnsupportedOptionError, match=r"only_cross_attention=\[False, True, False\] is not supported"):
        unet_config_from_diffusers({**base, "only_cross_attention": [False, True, False]})
    with pytest.raises(UnsupportedOptionError, match="up_block_types .* do not mirror down_block_types"):
        unet_config_from_diffusers({**base, "up_block_types": list(base["down_block_types"])})
    assert unet_config_from_diffusers({**base, "dropout": 0.1}).dropout == 0.1

    vae = _vae_json()
    with pytest.raises(UnsupportedOptionError, match=r"down_block_types \['DownEncoderBlock2D'\] is not supported"):
        vae_config_from_diffusers({**vae, "down_block_types": ["DownEncoderBlock2D"]})


def test_controlnet_takes_the_unet_table_and_its_own_options():
    from test_controlnet import HINT

    from pangu_draw_ms.config import ControlNetConfig
    from pangu_draw_ms.io.diffusers_controlnet import diffusers_controlnet_kwargs

    config = ControlNetConfig(unet=SD15_LIKE, hint_channels=HINT)
    saved = dict(diffusers.ControlNetModel(**diffusers_controlnet_kwargs(config)).config)
    assert controlnet_config_from_diffusers(saved) == config
    with pytest.raises(UnsupportedOptionError, match=r"^diffusers ControlNet config: resnet_time_scale_shift="):
        controlnet_config_from_diffusers({**saved, "resnet_time_scale_shift": "scale_shift"})


def test_old_clip_configs_text_config_dict_overrides_text_config():
    """transformers < 4.28 wrote text_config_dict/vision_config_dict beside text_config/vision_config, and
    CLIPConfig lets the *_dict values win; so do we."""
    config = transformers.CLIPConfig(text_config=_text_json(), vision_config=_vision_json()).to_dict()
    text, vision = clip_model_configs_from_transformers(config)
    old = {**config, "text_config_dict": {"num_hidden_layers": 3}, "vision_config_dict": {"patch_size": 16}}
    old_text, old_vision = clip_model_configs_from_transformers(old)
    assert (old_text.num_layers, old_vision.patch_size) == (3, 16)
    reference = transformers.CLIPConfig(**{k: v for k, v in old.items() if k != "transformers_version"})
    assert (reference.text_config.num_hidden_layers, reference.vision_config.patch_size) == (3, 16)
    assert old_text.hidden_size == text.hidden_size


def test_convert_tool_refuses_an_unsupported_option_in_one_line_and_writes_nothing(tmp_path):
    diffusers_unet(SD15_LIKE).save_pretrained(tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "timestep_post_act": "silu"}))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), "diffusers",
                             str(tmp_path / "unet"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "timestep_post_act='silu' is not supported" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
