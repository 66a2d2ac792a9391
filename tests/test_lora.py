"""UNet LoRAs: a PEFT LoRA on a diffusers SDXL-layout UNet, saved as diffusers writes it and in kohya's two
naming schemes, merged into our UNet gives diffusers' output with the adapter active; unmerging restores the
weights bit for bit; several LoRAs add; bad files are refused by name; the pipeline and the CLI take them. The
files we write (diffusers and kohya layouts) load in diffusers' own SDXL loader and give our output."""
import os
import re

import mindspore as ms
import numpy as np
import pytest

from pangu_draw_ms.io.checkpoint import save_checkpoint
from pangu_draw_ms.io.diffusers_unet import map_module, unet_from_diffusers
from pangu_draw_ms.io.layouts import build_component
from pangu_draw_ms.io.lora import LoRAError, MergedLoRAs, parse_lora_argument, read_lora
from pangu_draw_ms.io.state import cell_state, load_state

from helpers import SDXL_LIKE, assert_close, diffusers_unet, torch_state_numpy

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def lora_unet(tmp_path_factory):
    """(diffusers UNet with an active random PEFT LoRA, its base weights in our layout, the LoRA tensors in
    diffusers module names, a folder)."""
    reference = diffusers_unet(SDXL_LIKE)
    base = unet_from_diffusers(torch_state_numpy(reference), SDXL_LIKE)
    reference.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    state = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(reference).items()}
    return reference, base, state, tmp_path_factory.mktemp("lora")


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([100.0, 700.0], np.float32)
    context = rng.standard_normal((2, 7, SDXL_LIKE.context_dim)).astype(np.float32)
    from helpers import BUCKET_DIM, POOLED

    pooled = rng.standard_normal((2, POOLED)).astype(np.float32)
    bucket = np.array([5.0, 9.0], np.float32)
    from pangu_draw_ms.models import layers as L

    y = np.concatenate([pooled, L.sinusoidal_embedding(ms.Tensor(bucket), BUCKET_DIM).asnumpy()], axis=1)
    added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(bucket[:, None])}
    return x, t, context, y, added


def _ours(base):
    unet = build_component("unet", SDXL_LIKE)
    load_state(unet, base, what="base")
    return unet


def _kohya(state, unet, sgm_names: bool):
    """The same LoRA as kohya's sd-scripts write it: lora_unet_<module, '.' as '_'>.lora_down/lora_up/alpha."""
    out = {}
    for key, value in state.items():
        module, part = key.rsplit(".lora_", 1)
        name = map_module(module, SDXL_LIKE) if sgm_names else module
        kohya = "lora_unet_" + name.replace(".", "_")
        out[f"{kohya}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{kohya}.alpha"] = np.array(ALPHA, np.float32)
    return out


@pytest.mark.parametrize("layout", ["diffusers", "kohya_sgm", "kohya_diffusers"])
def test_a_peft_lora_merged_into_our_unet_gives_diffusers_output(lora_unet, layout):
    reference, base, state, folder = lora_unet
    x, t, context, y, added = _inputs()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context),
                             added_cond_kwargs=added).sample.numpy()
    unet = _ours(base)
    if layout == "diffusers":  # what diffusers' save_lora_weights writes: "unet." + PEFT names, no alpha
        tensors = {f"unet.{k}": v for k, v in state.items()}
        tensors.update({f"unet.{k.rsplit('.lora_', 1)[0]}.alpha": np.array(ALPHA, np.float32)
                        for k in state if ".lora_A." in k})
    else:
        tensors = _kohya(state, unet, sgm_names=layout == "kohya_sgm")
    path = str(folder / f"{layout}.safetensors")
    save_checkpoint(tensors, path)
    layers = read_lora(path, unet)
    assert len(layers) == len(state) // 2
    before = cell_state(unet)
    merged = MergedLoRAs(unet, [(layers, 1.0)])
    out = unet(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y)).asnumpy()
    assert_close(out, expected, rel=1e-4, what=f"{layout} LoRA vs diffusers + PEFT")
    merged.unmerge()
    after = cell_state(unet)
    assert all(np.array_equal(after[k], v) for k, v in before.items())


def test_several_loras_add_and_scales_apply(lora_unet):
    _, base, state, folder = lora_unet
    path = str(folder / "plain.safetensors")
    save_checkpoint({f"unet.{k}": v for k, v in state.items()}, path)
    unet = _ours(base)
    layers = read_lora(path, unet)
    name = next(iter(layers))
    original = cell_state(unet)[f"{name}.weight"].astype(np.float64)
    merged = MergedLoRAs(unet, [(layers, 0.5), (layers, 1.5)])
    expected = original + 2.0 * layers[name].delta()
    np.testing.assert_allclose(cell_state(unet)[f"{name}.weight"], expected, rtol=1e-6, atol=1e-6)
    # No alpha in the file: alpha = rank (scale 1), as diffusers loads a LoRA without network alphas.
    np.testing.assert_allclose(layers[name].delta(), layers[name].up @ layers[name].down, rtol=1e-5, atol=1e-7)
    merged.unmerge()


def test_bad_lora_files_are_refused_by_name(lora_unet, tmp_path):
    _, base, state, _ = lora_unet
    unet = _ours(base)
    cases = {
        "text.safetensors": ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                              np.ones((4, 8))}, "text-encoder LoRA entries"),
        "conv.safetensors": ({"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": np.ones((4, 32, 3, 3))},
                             "fit no dense layer"),
        "half.safetensors": ({f"unet.{k}": v for k, v in state.items() if ".lora_A." in k}, "needs both down"),
        "shape.safetensors": ({f"unet.{k}": (v[:, :3] if ".lora_A." in k else v) for k, v in state.items()},
                              "but its LoRA has down"),
    }
    for name, (tensors, message) in cases.items():
        save_checkpoint({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(tmp_path / name))
        with pytest.raises(LoRAError, match=message):
            read_lora(str(tmp_path / name), unet)
    assert parse_lora_argument("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert parse_lora_argument("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)


def test_pipeline_and_cli_merge_loras_into_the_generators_they_name(tmp_path):
    """The demo model with a LoRA on its structure generator only: the structure UNet changes, the texture UNet
    does not; unloading restores both; the CLI's --lora-structure draws another image than no LoRA."""
    from pangu_draw_ms.cli import infer
    from pangu_draw_ms.demo import DEMO_MODEL_DIR
    from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

    pipe = PanGuDrawPipeline.from_pretrained(DEMO_MODEL_DIR)
    structure, texture = (pipe.components.get(n) for n in ("structure_unet", "texture_unet"))
    target = "output_blocks.0.1.transformer_blocks.0.attn1.to_q"
    weight = dict(structure.parameters_and_names())[f"{target}.weight"].asnumpy()
    rng = np.random.default_rng(1)
    lora = {f"lora_unet_{target.replace('.', '_')}.lora_down.weight": rng.standard_normal((2, weight.shape[1])),
            f"lora_unet_{target.replace('.', '_')}.lora_up.weight": rng.standard_normal((weight.shape[0], 2)),
            f"lora_unet_{target.replace('.', '_')}.alpha": np.array(2.0)}
    path = str(tmp_path / "demo_lora.safetensors")
    save_checkpoint({k: np.asarray(v, np.float32) for k, v in lora.items()}, path)
    before = {n: cell_state(c) for n, c in (("structure", structure), ("texture", texture))}
    pipe.load_lora(path, 0.5, generators=("structure",))
    changed = {k for k, v in cell_state(structure).items() if not np.array_equal(v, before["structure"][k])}
    assert changed == {f"{target}.weight"}
    assert all(np.array_equal(v, before["texture"][k]) for k, v in cell_state(texture).items())
    pipe.unload_loras()
    assert all(np.array_equal(v, before["structure"][k]) for k, v in cell_state(structure).items())

    common = ["--prompt", "a big red circle", "--steps", "3", "--mode", "pynative", "--quiet", "--seed", "1"]
    plain = infer.main(common + ["--out", str(tmp_path / "plain.png"), "--save-latents"])
    with_lora = infer.main(common + ["--out", str(tmp_path / "lora.png"), "--save-latents",
                                     "--lora-structure", f"{path}:2"])
    latents = [np.load(p[:-4] + ".npy") for p in (plain[0], with_lora[0])]
    assert not np.allclose(*latents)
    with pytest.raises(SystemExit, match="no such file"):
        infer.main(common + ["--out", str(tmp_path / "x.png"), "--lora", str(tmp_path / "missing.safetensors")])
    assert os.path.isfile(with_lora[0])


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_our_lora_files_load_in_diffusers_and_back(lora_unet, layout):
    """A LoRA we write (random factors on attention, feed-forward and proj_in/out, alpha != rank) is read by
    diffusers' own SDXL loader into a diffusers UNet with the same base weights: its output equals ours with the
    LoRA merged (1e-4); read back by us it gives the same update."""
    from diffusers import StableDiffusionXLPipeline

    from pangu_draw_ms.io.lora import LoRALayer, write_lora
    from pangu_draw_ms.models.lora import target_suffixes

    _, base, _, folder = lora_unet
    unet = _ours(base)
    rng = np.random.default_rng(3)
    suffixes = target_suffixes(["attention", "feed_forward", "projection"])
    names = [n for n, c in unet.cells_and_names() if type(c).__name__ == "Dense" and n.endswith(tuple(suffixes))]
    layers = {}
    for name in names:
        out_features, in_features = cell_state(unet)[f"{name}.weight"].shape
        layers[name] = LoRALayer((rng.standard_normal((RANK, in_features)) * 0.1).astype(np.float32),
                                 (rng.standard_normal((out_features, RANK)) * 0.1).astype(np.float32), ALPHA)
    path = write_lora(str(folder / f"ours_{layout}.safetensors"), layers, SDXL_LIKE, layout)

    reference = diffusers_unet(SDXL_LIKE)
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(folder), weight_name=os.path.basename(path),
                                                                   unet_config=reference.config)
    reference.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet", adapter_name="ours")
    x, t, context, y, added = _inputs()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context),
                             added_cond_kwargs=added).sample.numpy()
    read = read_lora(path, unet)
    assert set(read) == set(layers)
    for name, layer in layers.items():
        np.testing.assert_allclose(read[name].delta(), layer.delta(), rtol=1e-5, atol=1e-7)
    merged = MergedLoRAs(unet, [(read, 1.0)])
    out = unet(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y)).asnumpy()
    merged.unmerge()
    base_out = unet(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y)).asnumpy()
    assert np.abs(out - base_out).max() > 1e-2 * np.abs(base_out).max()  # the LoRA does change the output
    assert_close(out, expected, rel=1e-4, what=f"our {layout} LoRA in diffusers")


def test_attention_module_names_map_back_to_diffusers(lora_unet):
    from pangu_draw_ms.io.diffusers_unet import diffusers_attention_module

    reference, base, _, _ = lora_unet
    in_transformer = re.compile(r"(input_blocks\.\d+|output_blocks\.\d+|middle_block)\.1\.")
    ours = {name for name, cell in build_component("unet", SDXL_LIKE).cells_and_names()
            if type(cell).__name__ == "Dense" and in_transformer.match(name)}
    # 17 transformer blocks (2x1 + 2x2 down, 2 middle, 3x2 + 3x1 up) of 10 dense layers, 11 proj_in/proj_out pairs
    assert len(ours) == 17 * 10 + 11 * 2
    diffusers_modules = {name for name, _ in reference.named_modules()}
    for name in ours:
        module = diffusers_attention_module(name, SDXL_LIKE)
        assert map_module(module, SDXL_LIKE) == name and module in diffusers_modules, (name, module)
