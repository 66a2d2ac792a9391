"""Bundled configs load and build; validation messages name what is wrong; the tiny model runs."""
import dataclasses
import os

import mindspore as ms
import numpy as np
import pytest
import yaml

from pangu_draw_ms.config import ConfigError, PanGuDrawConfig, from_dict, load_config, resolve_config_path, to_dict
from pangu_draw_ms.models.conditioner import Conditioner
from pangu_draw_ms.models.unet import UNetModel
from pangu_draw_ms.models.vae import AutoencoderKL


def test_bundled_configs_load_and_agree_with_the_release():
    v3 = load_config("pangu_draw_v3")
    assert v3.unet.context_dim == 2048 and v3.unet.adm_in_channels == 1536
    assert [e.num_layers for e in v3.conditioner.encoders] == [11, 32]
    assert v3.sampling.aesthetic_scale == 4.0 and v3.sampling.switch_rule == "release"
    assert len(v3.structure_buckets) == 11 and v3.structure_buckets[5] == (1024, 1024)
    tiny = load_config("tiny")
    assert tiny.unet.channel_mult == v3.unet.channel_mult  # same architecture, smaller widths
    assert from_dict(PanGuDrawConfig, to_dict(v3)) == v3  # round trip through plain data


def _data():
    with open(resolve_config_path("tiny"), encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["unet"].update(chanel_mult=[1, 2]), "unknown key(s) ['chanel_mult']"),
    (lambda d: d["unet"].update(model_channels="32"), "unet.model_channels: expected an integer"),
    (lambda d: d["unet"].update(transformer_depth=[0, 1]), "one depth per level"),
    (lambda d: d["unet"].update(context_dim=80), "must equal the sum of the text encoders' hidden sizes"),
    (lambda d: d["conditioner"]["encoders"][1].update(hidden_act="relu"), "'relu' is not valid"),
    (lambda d: d.update(t_struct=1500), "t_struct 1500 must lie in (0, 1000)"),
    (lambda d: d.update(structure_buckets=[[100, 100]]), "positive multiples of 32"),
    (lambda d: d["sampling"].update(sampler="plms"), "sampling.sampler 'plms' is not valid"),
])
def test_config_errors_say_what_is_wrong(edit, message):
    data = _data()
    edit(data)
    with pytest.raises(ConfigError) as err:
        from_dict(PanGuDrawConfig, data, "tiny.yaml")
    assert message in str(err.value)


def test_unknown_config_name_lists_the_bundled_ones():
    with pytest.raises(ConfigError, match="bundled: .*pangu_draw_v3.*tiny"):
        load_config("pangu_draw_v9")


def test_malformed_yaml_and_missing_files_are_one_line_naming_the_file(tmp_path):
    from pangu_draw_ms.config import CLIPConfig, CoopRecipe

    broken = tmp_path / "broken.yaml"
    broken.write_text("unet:\n  model_channels: 32\n   channel_mult: [1, 2\n", encoding="utf-8")
    for cls in (PanGuDrawConfig, CoopRecipe, CLIPConfig):
        with pytest.raises(ConfigError, match=rf"^{broken}: line 3: .* \(not valid YAML\)$"):
            load_config(str(broken), cls)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match="binary.yaml: not UTF-8 text"):
        load_config(str(binary))
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such file$"):
        load_config(str(tmp_path / "missing.yaml"))

    # The shipped demo CLIP's config names its vocabulary by file name: resolved beside the YAML, from any folder.
    from pangu_draw_ms.evaluation.demo import CLIP_CONFIG, DEMO_CLIP_DIR

    vocab = load_config(os.path.join(DEMO_CLIP_DIR, CLIP_CONFIG), CLIPConfig).text.tokenizer.vocab
    assert vocab == os.path.join(DEMO_CLIP_DIR, "tokenizer.model") and os.path.isfile(vocab)


def test_tiny_model_cells_fit_together(rng):
    """The tiny config's networks, eagerly: the conditioner's outputs feed the UNet, the VAE's latents the UNet
    and its decoder, at a non-square size. (Their graphs: each network's parity test compiles it in GRAPH_MODE,
    and the compiled-step tests of tests/test_pipeline.py and tests/test_coop_pipeline.py compile the tiny
    model's conditioner, UNets and step graphs.)"""
    config = load_config("tiny")
    unet, vae, conditioner = UNetModel(config.unet), AutoencoderKL(config.vae), Conditioner(config.conditioner)
    ids = ms.mutable(tuple(ms.Tensor(rng.integers(0, 1000, (2, 77)).astype(np.int32)) for _ in range(2)))
    context, vector = conditioner(ids, ms.Tensor(np.array([5, 0], np.int32)))
    assert context.shape == (2, 77, 64) and vector.shape == (2, 288)
    image = ms.Tensor(rng.uniform(-1, 1, (2, 3, 64, 96)).astype(np.float32))
    latents = vae.encode_to_latents(image)
    assert latents.shape == (2, 4, 8, 12)
    eps = unet(latents, ms.Tensor(np.array([999.0, 10.0], np.float32)), context, vector)
    assert eps.shape == latents.shape and eps.dtype == ms.float32
    assert vae.decode_latents(eps).shape == (2, 3, 64, 96)


def test_float16_compute_tracks_float32(rng):
    """Mixed precision: fp16 matmuls/convs, fp32 norms and softmax, fp32 weights; close to fp32."""
    config = dataclasses.replace(load_config("tiny")).unet
    ms.set_seed(3)
    fp32 = UNetModel(config)
    fp16 = UNetModel(config, dtype=ms.float16)
    for a, b in zip(fp32.get_parameters(), fp16.get_parameters()):
        b.set_data(a.data.copy())
        assert b.dtype == ms.float32
    x = ms.Tensor(rng.standard_normal((1, 4, 16, 16)).astype(np.float32))
    args = (x, ms.Tensor(np.array([500.0], np.float32)), ms.Tensor(rng.standard_normal((1, 77, 64)).astype(np.float32)),
            ms.Tensor(rng.standard_normal((1, 288)).astype(np.float32)))
    ref, low = fp32(*args).asnumpy(), fp16(*args).asnumpy()
    err = np.abs(ref - low).max() / np.abs(ref).max()
    print(f"fp16 vs fp32 UNet: max rel diff {err:.2e}")
    assert 0 < err < 2e-2
