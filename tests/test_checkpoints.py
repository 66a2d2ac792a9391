"""Checkpoint files: round trips, the released sgm layout (single file and the structure/texture pair),
diffusers/transformers files from save_pretrained, the convert tool, and bad inputs."""
import hashlib
import json
import logging
import os
import re

import mindspore as ms
import numpy as np
import pytest

from pangu_draw_ms.config import ConditionerConfig, PanGuDrawConfig, UNetConfig, VAEConfig, load_config
from pangu_draw_ms.io import checkpoint as ckpt
from pangu_draw_ms.io.checkpoint import CheckpointError, open_checkpoint, save_checkpoint, write_tensors
from pangu_draw_ms.io.diffusers_unet import unet_config_from_diffusers
from pangu_draw_ms.io.diffusers_vae import vae_config_from_diffusers
from pangu_draw_ms.io.layouts import (
    COMPONENTS,
    build_component,
    component_config,
    component_of,
    convert_component,
    load_component,
    save_component,
)
from pangu_draw_ms.io.model_dir import SwappedCheckpointsError, check_roles
from pangu_draw_ms.io.released import load_released
from pangu_draw_ms.io.state import StateDictError, cell_state
from pangu_draw_ms.io.transformers_clip import text_encoder_config_from_transformers
from pangu_draw_ms.models import layers as L

from helpers import (
    BUCKET_DIM,
    CONTEXT,
    POOLED,
    SD15_LIKE,
    SDXL_LIKE,
    assert_close,
    diffusers_unet,
    randomize_torch_module,
    torch_state_numpy,
)
from released_layout import TINY, open_clip_state, randomize_cell, released_state, tiny_cells

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

FORMATS = [".safetensors", ".ckpt"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_parameters(loaded, source):
    expected = {name: p.asnumpy() for name, p in source.parameters_and_names()}
    got = {name: p.asnumpy() for name, p in loaded.parameters_and_names()}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def convert_tool():
    from pangu_draw_ms.cli import convert

    return convert


# ---- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", FORMATS)
def test_cells_round_trip_bit_identical(suffix, tmp_path):
    for cell in tiny_cells(0):
        path = str(tmp_path / f"{type(cell).__name__}{suffix}")
        summary = save_component(cell, path)
        assert summary.parameters == L.count_parameters(cell)
        fresh = build_component(component_of(cell), cell.config, materialize=False)
        report = load_component(fresh, path)
        assert report.layout == "ours" and report.ok and not report.skipped
        assert_same_parameters(fresh, cell)
        with open_checkpoint(path) as reader:
            assert component_config(reader.metadata)[1] == cell.config


def test_our_files_open_in_mindspore_and_safetensors(tmp_path):
    from safetensors import safe_open

    unet = randomize_cell(build_component("unet", SD15_LIKE), 0)
    expected = cell_state(unet)
    save_component(unet, str(tmp_path / "unet.ckpt"), metadata={"role": "texture"})
    save_component(unet, str(tmp_path / "unet.safetensors"), metadata={"role": "texture"})

    loaded = ms.load_checkpoint(str(tmp_path / "unet.ckpt"))
    assert loaded.pop("__metadata__.role") == "texture" and loaded.pop("__metadata__.component") == "unet"
    loaded = {k: v for k, v in loaded.items() if not k.startswith("__metadata__.")}
    assert loaded.keys() == expected.keys()
    assert all(np.array_equal(loaded[k].asnumpy(), v) for k, v in expected.items())
    fresh = build_component("unet", SD15_LIKE)
    not_loaded, _ = ms.load_param_into_net(fresh, ms.load_checkpoint(str(tmp_path / "unet.ckpt")))
    assert not_loaded == []
    assert_same_parameters(fresh, unet)

    with safe_open(str(tmp_path / "unet.safetensors"), framework="numpy") as f:
        assert f.metadata()["role"] == "texture"
        assert all(np.array_equal(f.get_tensor(k), v) for k, v in expected.items())
    from_ms = ms.load_checkpoint(str(tmp_path / "unet.safetensors"), format="safetensors")
    assert all(np.array_equal(from_ms[k].asnumpy(), v) for k, v in expected.items())


@pytest.mark.parametrize("suffix", FORMATS)
def test_fp16_saving(suffix, tmp_path):
    unet = randomize_cell(build_component("unet", SD15_LIKE), 1)
    path = str(tmp_path / f"unet{suffix}")
    summary = save_component(unet, path, dtype="fp16")
    assert summary.bytes == 2 * L.count_parameters(unet)
    with open_checkpoint(path) as reader:
        assert {reader.info(k).dtype for k in reader.keys()} == {"float16"}
    fresh = build_component("unet", SD15_LIKE, materialize=False)
    load_component(fresh, path)
    for name, value in cell_state(unet).items():
        np.testing.assert_array_equal(cell_state(fresh)[name], value.astype(np.float16).astype(np.float32))

    with pytest.raises(CheckpointError, match=r"'big' has values beyond the float16 range .* save it as fp32"):
        save_checkpoint({"big": np.array([1e6], np.float32)}, str(tmp_path / f"big{suffix}"), dtype="fp16")
    with pytest.raises(CheckpointError, match="unknown save dtype 'bf16'; valid: fp32, fp16"):
        save_checkpoint(unet, str(tmp_path / f"x{suffix}"), dtype="bf16")
    assert not os.path.exists(tmp_path / f"big{suffix}") and not os.path.exists(tmp_path / f"x{suffix}")


def test_ckpt_reader_joins_slices_and_skips_the_crc_trailer(tmp_path):
    """MindSpore writes tensors over 512 MB as consecutive records with one tag; emulate that small."""
    from mindspore.train.checkpoint_pb2 import Checkpoint

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 5)).astype(np.float32)
    path = str(tmp_path / "sliced.ckpt")
    with open(path, "wb") as f:
        for part in np.array_split(weight, 3):
            record = Checkpoint()
            value = record.value.add()
            value.tag = "w"
            value.tensor.dims.extend(weight.shape)
            value.tensor.tensor_type = "Float32"
            value.tensor.tensor_content = part.tobytes()
            f.write(record.SerializeToString())
    np.testing.assert_array_equal(ms.load_checkpoint(path)["w"].asnumpy(), weight)  # the format is as assumed
    with open_checkpoint(path) as reader:
        assert reader.keys() == ["w"] and reader.info("w").shape == (6, 5)
        np.testing.assert_array_equal(reader.get("w"), weight)

    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(weight)}], str(tmp_path / "crc.ckpt"), crc_check=True)
    with open_checkpoint(str(tmp_path / "crc.ckpt")) as reader:
        np.testing.assert_array_equal(reader.get("w"), weight)


# ---- the released layout -------------------------------------------------------------------------

def test_released_layout_file_loads_completely_and_reproduces_outputs(tmp_path):
    unet, vae, conditioner = tiny_cells(10)
    path = str(tmp_path / "pangu_low_timestamp-test.ckpt")
    state = released_state(unet, vae, conditioner)
    save_checkpoint(state, path)
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "conditioner"}
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert "first_stage_model.encoder.norm_out.gamma" in state

    loaded = build_component("unet", TINY.unet, materialize=False), \
        build_component("vae", TINY.vae, materialize=False), \
        build_component("conditioner", TINY.conditioner, materialize=False)
    reports = load_released(texture=path, texture_unet=loaded[0], vae=loaded[1], conditioner=loaded[2])
    for report in reports.values():
        assert report.layout == "sgm" and not report.missing and not report.unexpected and report.ok
    assert reports["conditioner"].ignored == ["conditioner.embedders.1.model.logit_scale"]
    assert len(reports["vae"].skipped) == len(state) - len([k for k in state if k.startswith("first_stage_model.")])
    for ours, source in zip(loaded, (unet, vae, conditioner)):
        assert_same_parameters(ours, source)

    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    t = ms.Tensor(np.array([500.0], np.float32))
    context = ms.Tensor(rng.standard_normal((1, 77, TINY.unet.context_dim)).astype(np.float32))
    y = ms.Tensor(rng.standard_normal((1, TINY.unet.adm_in_channels)).astype(np.float32))
    np.testing.assert_array_equal(loaded[0](x, t, context, y).asnumpy(), unet(x, t, context, y).asnumpy())
    np.testing.assert_array_equal(loaded[1].decode(x).asnumpy(), vae.decode(x).asnumpy())
    ids = tuple(ms.Tensor(rng.integers(1, 1000, (1, 77)).astype(np.int32)) for _ in range(2))
    bucket = ms.Tensor(np.array([5], np.int32))
    for ours, source in zip(loaded[2](ids, bucket), conditioner(ids, bucket)):
        np.testing.assert_array_equal(ours.asnumpy(), source.asnumpy())


@pytest.fixture
def released_pair(tmp_path):
    """A structure and a texture file with different weights everywhere, named as in the release."""
    cells = {"structure": tiny_cells(20), "texture": tiny_cells(30)}
    paths = {"structure": str(tmp_path / "pangu_high_timestamp-0001.ckpt"),
             "texture": str(tmp_path / "pangu_low_timestamp-0002.ckpt")}
    for role in cells:
        save_checkpoint(released_state(*cells[role]), paths[role])
    return cells, paths


def test_pair_takes_text_encoders_and_vae_from_the_texture_file_only(released_pair, monkeypatch):
    cells, paths = released_pair
    reads = []
    real_get = ckpt._SpanReader.get
    monkeypatch.setattr(ckpt._SpanReader, "get",
                        lambda self, name: reads.append((self.path, name)) or real_get(self, name))
    loaded = {name: build_component(component, config, materialize=False) for name, component, config in (
        ("structure_unet", "unet", TINY.unet), ("texture_unet", "unet", TINY.unet), ("vae", "vae", TINY.vae),
        ("conditioner", "conditioner", TINY.conditioner))}
    reports = load_released(paths["structure"], paths["texture"], **loaded)
    assert all(r.ok for r in reports.values())
    assert_same_parameters(loaded["structure_unet"], cells["structure"][0])
    assert_same_parameters(loaded["texture_unet"], cells["texture"][0])
    assert_same_parameters(loaded["vae"], cells["texture"][1])
    assert_same_parameters(loaded["conditioner"], cells["texture"][2])
    structure_reads = [name for path, name in reads if path == paths["structure"]]
    assert structure_reads and all(name.startswith("model.diffusion_model.") for name in structure_reads)


def test_swapped_pair_is_refused_unless_allowed(released_pair, caplog, tmp_path, capsys):
    cells, paths = released_pair
    unet = build_component("unet", TINY.unet, materialize=False)
    with pytest.raises(SwappedCheckpointsError, match=r"pangu_low_timestamp-0002.ckpt was given as the structure "
                                                      r"generator but is a texture file \(its name contains "
                                                      r"'low_timestamp'\).*allow_swapped=True"):
        load_released(paths["texture"], paths["structure"], structure_unet=unet)
    with caplog.at_level(logging.WARNING):
        load_released(paths["texture"], paths["structure"], structure_unet=unet, allow_swapped=True)
    assert "look swapped" in caplog.text
    assert_same_parameters(unet, cells["texture"][0])

    tool = convert_tool()
    out = str(tmp_path / "out")
    args = ["released", "--structure", paths["texture"], "--texture", paths["structure"], "--out", out,
            "--config", "tiny"]
    assert tool.main(args) == 2
    assert "--allow-swapped" in capsys.readouterr().err
    assert tool.main(args + ["--allow-swapped"]) == 0
    # The converted UNets carry their role: renamed files are still checked, by metadata.
    renamed = {role: str(tmp_path / f"{role}.safetensors") for role in ("a", "b")}
    os.rename(os.path.join(out, "structure_unet.safetensors"), renamed["a"])
    os.rename(os.path.join(out, "texture_unet.safetensors"), renamed["b"])
    with open_checkpoint(renamed["a"]) as a, open_checkpoint(renamed["b"]) as b:
        assert a.metadata["role"] == "structure" and a.metadata["timesteps"] == "[500, 1000)"
        check_roles(a, b)
        with pytest.raises(SwappedCheckpointsError, match=r"its metadata says role='structure'"):
            check_roles(b, a)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_convert_tool_splits_the_released_pair(released_pair, tmp_path, capsys, fmt):
    cells, paths = released_pair
    out = str(tmp_path / "converted")
    assert convert_tool().main(["released", "--structure", paths["structure"], "--texture", paths["texture"],
                                "--out", out, "--config", "tiny", "--dtype", "fp16", "--format", fmt]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"structure_unet\.\w+: \d+ tensors, [\d,]+ parameters", printed) and "skipped" in printed
    assert load_config(os.path.join(out, "config.yaml"), PanGuDrawConfig) == TINY
    expected = {"structure_unet": cells["structure"][0], "texture_unet": cells["texture"][0],
                "vae": cells["texture"][1], "conditioner": cells["texture"][2]}
    for name, source in expected.items():
        fresh = build_component({"structure_unet": "unet", "texture_unet": "unet"}.get(name, name), source.config,
                                materialize=False)
        assert load_component(fresh, os.path.join(out, f"{name}.{fmt}")).layout == "ours"
        loaded = cell_state(fresh)
        for key, value in cell_state(source).items():
            np.testing.assert_array_equal(loaded[key], value.astype(np.float16).astype(np.float32))


# ---- diffusers and transformers files ------------------------------------------------------------

def _unet_inputs(config: UNetConfig):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([999.0, 37.0], np.float32)
    context = rng.standard_normal((2, 7, CONTEXT)).astype(np.float32)
    pooled = rng.standard_normal((2, POOLED)).astype(np.float32)
    bucket = np.array([5.0, 9.0], np.float32)
    y = np.concatenate([pooled, L.sinusoidal_embedding(ms.Tensor(bucket), BUCKET_DIM).asnumpy()], axis=1)
    added = {}
    if config.adm_in_channels is not None:
        added["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(pooled),
                                      "time_ids": torch.from_numpy(bucket[:, None])}
    return x, t, context, y, added


@pytest.mark.parametrize("config", [SDXL_LIKE, SD15_LIKE], ids=["sdxl_like", "sd15_like"])
def test_diffusers_unet_from_save_pretrained(config, tmp_path):
    reference = diffusers_unet(config)
    reference.save_pretrained(tmp_path / "unet")
    assert unet_config_from_diffusers(reference.config) == config
    unet = build_component("unet", config, materialize=False)
    assert load_component(unet, str(tmp_path / "unet")).layout == "diffusers"
    x, t, context, y, added = _unet_inputs(config)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context),
                             **added).sample.numpy()
    assert_close(unet(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y)).asnumpy(), expected,
                 what="UNet loaded from save_pretrained")

    # The tool reads config.json and writes our layout; that file loads bit-identically.
    assert convert_tool().main(["diffusers", str(tmp_path / "unet"), "--out", str(tmp_path / "ours")]) == 0
    converted = build_component("unet", load_config(str(tmp_path / "ours" / "unet.yaml"), UNetConfig),
                                materialize=False)
    assert load_component(converted, str(tmp_path / "ours" / "unet.safetensors")).layout == "ours"
    assert_same_parameters(converted, unet)


def test_diffusers_vae_sharded_and_pickled(tmp_path):
    from test_vae import TINY as VAE_TINY
    from test_vae import diffusers_reference

    reference = diffusers_reference(VAE_TINY).eval()
    randomize_torch_module(reference, seed=0)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    reference.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert os.path.isfile(tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json")
    assert vae_config_from_diffusers(reference.config) == VAE_TINY

    vae = build_component("vae", VAE_TINY, materialize=False)
    assert load_component(vae, str(tmp_path / "sharded")).layout == "diffusers"
    latents = np.random.default_rng(0).standard_normal((1, 4, 6, 4)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(latents)).sample.numpy()
    assert_close(vae.decode(ms.Tensor(latents)).asnumpy(), expected, what="VAE decode from shards")
    from_bin = build_component("vae", VAE_TINY, materialize=False)
    load_component(from_bin, str(tmp_path / "pickled"))
    assert_same_parameters(from_bin, vae)


@pytest.mark.parametrize("with_projection", [False, True], ids=["CLIPTextModel", "WithProjection"])
def test_transformers_clip_and_open_clip_files(with_projection, tmp_path):
    hf_config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, projection_dim=24, hidden_act="gelu",
                                            eos_token_id=2)  # legacy CLIP configs: pool at the argmax id
    model_class = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    reference = model_class(hf_config).eval()
    randomize_torch_module(reference, seed=4)
    reference.save_pretrained(tmp_path / "text")
    config = text_encoder_config_from_transformers(json.load(open(tmp_path / "text" / "config.json")))
    assert (config.projection_dim == 24) == with_projection and config.eot_token_id is None

    encoder = build_component("text_encoder", config, materialize=False)
    assert load_component(encoder, str(tmp_path / "text")).layout == "transformers"
    ids = np.random.default_rng(0).integers(1, 998, (2, 77)).astype(np.int64)
    ids[:, 9] = 999  # the end-of-text token: the largest id
    with torch.no_grad():
        out = reference(torch.from_numpy(ids))
    hidden, pooled = encoder(ms.Tensor(ids.astype(np.int32)))
    assert_close(hidden.asnumpy(), out.last_hidden_state.numpy(), what="hidden")
    assert_close(pooled.asnumpy(), (out.text_embeds if with_projection else out.pooler_output).numpy(), what="pooled")

    if with_projection:
        # A text encoder inside a conditioner loads the same (its parameters are named relative to it).
        conditioner = build_component("conditioner", ConditionerConfig(encoders=(config, config)), materialize=False)
        load_component(conditioner.encoders[1], str(tmp_path / "text"), "text_encoder")
        assert_same_parameters(conditioner.encoders[1], encoder)

        # The same weights under OpenCLIP names, torch suffixes, in a safetensors file.
        from safetensors.numpy import save_file

        ours = {k: v for k, v in cell_state(encoder).items()}
        torch_named = {re.sub(r"\.(gamma|embedding_table)$", ".weight", re.sub(r"\.beta$", ".bias", k)): v
                       for k, v in open_clip_state(ours).items()}
        save_file(torch_named, str(tmp_path / "open_clip.safetensors"))
        via_open_clip = build_component("text_encoder", config, materialize=False)
        report = load_component(via_open_clip, str(tmp_path / "open_clip.safetensors"))
        assert report.layout == "open_clip" and report.ignored == ["logit_scale"]
        assert_same_parameters(via_open_clip, encoder)


def test_convert_tool_converts_a_pipeline_folder_and_single_files(tmp_path, capsys):
    from test_vae import TINY as VAE_TINY
    from test_vae import diffusers_reference

    pipeline = tmp_path / "pipeline"
    models = {"unet": diffusers_unet(SD15_LIKE), "vae": diffusers_reference(VAE_TINY),
              "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(
                  vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  eos_token_id=2))}
    for folder, model in models.items():
        model.save_pretrained(pipeline / folder)
    out = tmp_path / "out"
    assert convert_tool().main(["diffusers", str(pipeline), "--out", str(out), "--dtype", "fp16"]) == 0
    printed = capsys.readouterr().out
    for component in models:  # the folder names are the component names here
        assert f"{component}.safetensors: " in printed
        config = load_config(str(out / f"{component}.yaml"), COMPONENTS[component][1])
        direct = build_component(component, config, materialize=False)
        load_component(direct, str(pipeline / component))
        converted = build_component(component, config, materialize=False)
        assert load_component(converted, str(out / f"{component}.safetensors")).layout == "ours"
        for name, p in direct.parameters_and_names():
            expected = p.asnumpy().astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(dict(converted.parameters_and_names())[name].asnumpy(), expected)

    # A file without a config.json beside it takes --component and a YAML config.
    single = tmp_path / "single"
    single.mkdir()
    os.rename(out / "text_encoder.safetensors", single / "text.safetensors")
    args = ["diffusers", str(single / "text.safetensors"), "--out", str(tmp_path / "again")]
    assert convert_tool().main(args) == 2
    assert "no config.json beside" in capsys.readouterr().err
    assert convert_tool().main(args + ["--component", "text_encoder", "--config", str(out / "text_encoder.yaml")]) == 0
    assert os.path.isfile(tmp_path / "again" / "text_encoder.safetensors")

    # A conversion never writes into its source: --out the input folder, or inside it, is refused (inside is
    # allowed when asked), and an output that would replace an input file always is.
    before = {p: digest(p) for p in map(str, pipeline.rglob("*")) if os.path.isfile(p)}
    for target, flag, message in ((pipeline, [], "is the input"), (pipeline / "converted", [], "inside the input")):
        assert convert_tool().main(["diffusers", str(pipeline), "--out", str(target)] + flag) == 2
        assert message in capsys.readouterr().err
    assert convert_tool().main(["diffusers", str(pipeline), "--out", str(pipeline / "converted"),
                                "--allow-inside-source"]) == 0
    assert {p: digest(p) for p in before} == before
    in_place = single / "text_encoder.safetensors"
    os.rename(single / "text.safetensors", in_place)
    assert convert_tool().main(["diffusers", str(in_place), "--out", str(single), "--component", "text_encoder",
                                "--config", str(out / "text_encoder.yaml")]) == 2
    assert "would overwrite the input" in capsys.readouterr().err


# ---- bad inputs ----------------------------------------------------------------------------------

@pytest.fixture
def saved_unet(tmp_path):
    unet = randomize_cell(build_component("unet", SD15_LIKE), 5)
    paths = {suffix: str(tmp_path / f"unet{suffix}") for suffix in FORMATS}
    for path in paths.values():
        save_component(unet, path)
    return unet, paths


@pytest.mark.parametrize("suffix", FORMATS)
def test_truncated_file_fails_clearly_and_leaves_outputs_untouched(saved_unet, suffix, tmp_path):
    _, paths = saved_unet
    truncated = str(tmp_path / f"truncated{suffix}")
    with open(paths[suffix], "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[:len(data) * 2 // 3])
    output = str(tmp_path / "existing.safetensors")
    save_checkpoint({"keep": np.arange(4, dtype=np.float32)}, output)
    before = digest(output), sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match="truncated"):
        convert_component(truncated, "unet", SD15_LIKE, output)
    with pytest.raises(CheckpointError, match="truncated"):
        load_component(build_component("unet", SD15_LIKE, materialize=False), truncated)
    assert (digest(output), sorted(os.listdir(tmp_path))) == before


def test_wrong_model_file_is_named(saved_unet, tmp_path):
    unet, paths = saved_unet
    vae = randomize_cell(build_component("vae", VAEConfig(base_channels=16, channel_mult=(1, 2), norm_num_groups=8)), 0)
    save_component(vae, str(tmp_path / "vae.safetensors"))
    target = build_component("unet", SD15_LIKE)
    before = cell_state(target)
    with pytest.raises(StateDictError, match=r"vae.safetensors is a pangu_draw_ms vae file, not a unet file"):
        load_component(target, str(tmp_path / "vae.safetensors"))
    save_checkpoint(cell_state(vae), str(tmp_path / "plain_vae.safetensors"))  # no metadata
    with pytest.raises(StateDictError, match=r"holds no unet weights in the ours/sgm/diffusers layout\(s\): its \d+ "
                                             r"entries are (encoder|decoder)\.\w+\.\* \(\d+\)"):
        load_component(target, str(tmp_path / "plain_vae.safetensors"))
    # Another UNet architecture: every kind of misfit is listed, with counts, and nothing is loaded.
    with pytest.raises(StateDictError, match=r"\d+ missing key\(s\): .*; \d+ unexpected key\(s\): .*\(\+\d+ more\); "
                                             r"\d+ shape mismatch\(es\): \S+ expected \(\d+.*\) got \("):
        load_component(build_component("unet", SDXL_LIKE), paths[".safetensors"])
    after = cell_state(target)
    assert all(np.array_equal(v, after[k]) for k, v in before.items())


def test_misfits_of_a_mapped_layout_name_the_files_entry_next_to_ours(tmp_path):
    """A diffusers-layout file whose conv_in has another shape: the message names our parameter and the
    file's entry it was mapped from, and nothing is loaded."""
    state = torch_state_numpy(diffusers_unet(SD15_LIKE))
    state["conv_in.weight"] = state["conv_in.weight"][:, :3]
    save_checkpoint(state, str(tmp_path / "diffusers_unet.safetensors"))
    target = build_component("unet", SD15_LIKE)
    before = cell_state(target)
    with pytest.raises(StateDictError, match=r"1 shape mismatch\(es\): input_blocks\.0\.0\.weight \(file entry "
                                             r"conv_in\.weight\) expected \(32, 4, 3, 3\) got \(32, 3, 3, 3\)"):
        load_component(target, str(tmp_path / "diffusers_unet.safetensors"))
    after = cell_state(target)
    assert all(np.array_equal(v, after[k]) for k, v in before.items())


def test_wrong_dtype_and_missing_component(saved_unet, tmp_path):
    unet, _ = saved_unet
    state = cell_state(unet)
    state["out.2.bias"] = state["out.2.bias"].astype(np.int32)
    save_checkpoint(state, str(tmp_path / "int.safetensors"))
    with pytest.raises(StateDictError, match=r"1 dtype mismatch\(es\): out.2.bias expected a floating dtype got int32"):
        load_component(build_component("unet", SD15_LIKE), str(tmp_path / "int.safetensors"))

    unet_only = {"model.diffusion_model." + k: v for k, v in cell_state(unet).items()}
    save_checkpoint(unet_only, str(tmp_path / "unet_only.ckpt"))
    with pytest.raises(StateDictError, match=r"holds no vae weights .*: its \d+ entries are model.diffusion_model.\*"):
        load_component(build_component("vae", TINY.vae, materialize=False), str(tmp_path / "unet_only.ckpt"))

    # A failed conversion leaves an existing output as it was.
    output = str(tmp_path / "vae.safetensors")
    save_checkpoint({"keep": np.ones(2, np.float32)}, output)
    before = digest(output), sorted(os.listdir(tmp_path))
    for source, component, config in ((str(tmp_path / "unet_only.ckpt"), "vae", TINY.vae),
                                      (str(tmp_path / "int.safetensors"), "unet", SD15_LIKE)):
        with pytest.raises(StateDictError):
            convert_component(source, component, config, output)
    assert (digest(output), sorted(os.listdir(tmp_path))) == before


def test_linear_weights_fill_1x1_convolutions(tmp_path):
    """sgm VAE files keep attention q/k/v/proj_out as 1x1 convs; some ports store them as Linear weights."""
    vae = randomize_cell(build_component("vae", TINY.vae), 3)
    state = {"first_stage_model." + k: (v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v)
             for k, v in cell_state(vae).items()}
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 2
    save_checkpoint(state, str(tmp_path / "linear_attention.ckpt"))
    fresh = build_component("vae", TINY.vae, materialize=False)
    assert load_component(fresh, str(tmp_path / "linear_attention.ckpt")).ok
    assert_same_parameters(fresh, vae)


def test_two_copies_of_one_weight_are_refused(saved_unet, tmp_path):
    unet, _ = saved_unet
    state = cell_state(unet)
    state["out.0.weight"] = state["out.0.gamma"]  # the torch name of the same norm scale
    save_checkpoint(state, str(tmp_path / "twice.safetensors"))
    with pytest.raises(StateDictError, match=r"'out.0.gamma' and 'out.0.weight' both map onto 'out.0.gamma'"):
        load_component(build_component("unet", SD15_LIKE), str(tmp_path / "twice.safetensors"))


def test_non_strict_loads_what_fits_and_warns(saved_unet, tmp_path, caplog):
    unet, _ = saved_unet
    state = cell_state(unet)
    del state["out.2.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    save_checkpoint(state, str(tmp_path / "partial.safetensors"))
    target = build_component("unet", SD15_LIKE)
    with caplog.at_level(logging.WARNING):
        report = load_component(target, str(tmp_path / "partial.safetensors"), strict=False)
    assert report.missing == ["out.2.bias"] and report.unexpected == ["extra.weight"]
    assert "1 missing key(s): out.2.bias; 1 unexpected key(s): extra.weight" in caplog.text
    np.testing.assert_array_equal(cell_state(target)["out.2.weight"], cell_state(unet)["out.2.weight"])


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("crash", [RuntimeError, KeyboardInterrupt])
def test_crash_mid_save_keeps_the_old_file(saved_unet, suffix, crash, tmp_path, monkeypatch):
    unet, paths = saved_unet
    before = digest(paths[suffix]), sorted(os.listdir(tmp_path))

    def failing():
        raise crash("disk gone")

    sources = ckpt.tensor_sources(unet)
    sources.insert(len(sources) // 2, ("boom", (1,), np.dtype(np.float32), failing))
    with pytest.raises(crash, match="disk gone"):
        write_tensors(paths[suffix], sources)
    if suffix == ".ckpt":  # also a crash inside MindSpore's writer, after it wrote part of the file
        def partial_write(entries, name, **kwargs):
            with open(name, "wb") as f:
                f.write(b"\x0a\x05partial")
            raise crash("disk gone")

        monkeypatch.setattr(ms, "save_checkpoint", partial_write)
        with pytest.raises(crash, match="disk gone"):
            save_component(unet, paths[suffix])
    assert (digest(paths[suffix]), sorted(os.listdir(tmp_path))) == before


class _Payload:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickles_only_through_the_safe_loader(tmp_path, monkeypatch):
    import pickle

    marker = str(tmp_path / "pwned")
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"weight": _Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused: the pickle holds objects other than tensors"):
        open_checkpoint(str(tmp_path / "evil.bin"))
    assert not os.path.exists(marker)

    torch.save({"state_dict": {"w": torch.ones(2, 3, dtype=torch.bfloat16)}}, tmp_path / "good.pt")
    with open_checkpoint(str(tmp_path / "good.pt")) as reader:
        assert reader.info("w").dtype == "bfloat16" and reader.get("w").dtype == np.float32

    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch were not installed
    with pytest.raises(CheckpointError, match="torch is not installed. Unpickling runs arbitrary code, so this "
                                              "package never opens them with plain pickle"):
        open_checkpoint(str(tmp_path / "good.pt"))


def test_unknown_files_and_folders(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint type; readable: .safetensors"):
        open_checkpoint(str(tmp_path / "weights.npz"))
    with pytest.raises(CheckpointError, match="folder without a weights file; looked for diffusion_pytorch_model"):
        open_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(str(tmp_path / "missing.ckpt"))
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00\x01not a checkpoint")
    with pytest.raises(CheckpointError, match="not a MindSpore checkpoint record .* encrypted"):
        open_checkpoint(str(tmp_path / "garbage.ckpt"))
    with pytest.raises(CheckpointError, match="folder .* does not exist"):
        save_checkpoint({"a": np.zeros(1, np.float32)}, str(tmp_path / "nowhere" / "a.safetensors"))
