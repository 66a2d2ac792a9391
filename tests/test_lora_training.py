"""LoRA training (stage ``lora``): adapters start as the base network, only they train and are saved (weights,
optimizer moments, EMA), on their generator's timestep range; a run resumes exactly; the exported file merged
into the base generator gives the adapted network's output; bad settings are refused by name."""
import os

import mindspore as ms
import numpy as np
import pytest

from pangu_draw_ms.io.layouts import build_component
from pangu_draw_ms.io.lora import LoRAError, MergedLoRAs, lora_files, read_lora
from pangu_draw_ms.io.model_dir import load_model_config, save_component
from pangu_draw_ms.io.state import cell_state, load_state
from pangu_draw_ms.models.lora import add_lora_adapters, lora_parameters
from pangu_draw_ms.training.checkpointing import CheckpointFolder
from pangu_draw_ms.training.config import load_train_config
from pangu_draw_ms.training.trainer import Trainer

from helpers import SDXL_LIKE, tiny_config


def _unet_inputs(config, batch=2, size=8):
    rng = np.random.default_rng(0)
    return (ms.Tensor(rng.standard_normal((batch, config.in_channels, size, size)).astype(np.float32)),
            ms.Tensor(np.array([10.0, 900.0][:batch], np.float32)),
            ms.Tensor(rng.standard_normal((batch, 7, config.context_dim)).astype(np.float32)),
            ms.Tensor(rng.standard_normal((batch, config.adm_in_channels)).astype(np.float32)))


def test_adapters_start_as_the_base_network_and_keep_its_parameter_names():
    ms.set_seed(0)
    unet = build_component("unet", SDXL_LIKE)
    base = cell_state(unet)
    inputs = _unet_inputs(SDXL_LIKE)
    reference = build_component("unet", SDXL_LIKE)
    load_state(reference, base)
    expected = reference(*inputs).asnumpy()
    adapters = add_lora_adapters(unet, ["attention"], rank=2, alpha=4.0)
    assert len(adapters) == 17 * 2 * 4 and all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in adapters)
    names = {p.name for p in unet.get_parameters()}
    assert set(base) <= names and names - set(base) == {n for a in adapters for n in (f"{a}.lora_down", f"{a}.lora_up")}
    np.testing.assert_array_equal(unet(*inputs).asnumpy(), expected)  # B = 0: the base network exactly
    for param in lora_parameters(adapters)[1::2]:
        param.set_data(ms.Tensor(np.full(param.shape, 0.05, np.float32)))
    assert np.abs(unet(*inputs).asnumpy() - expected).max() > 1e-3
    with pytest.raises(ValueError, match="not valid: give one or more of"):
        add_lora_adapters(build_component("unet", SDXL_LIKE), ["attn"], 2, 2.0)
    with pytest.raises(ValueError, match="LoRA rank must be in"):
        add_lora_adapters(build_component("unet", SDXL_LIKE), ["attention"], 1000, 2.0)


@pytest.fixture(scope="module")
def base_unet(tmp_path_factory, weights):
    """A seeded random texture generator of the ``weights`` model directory (the frozen base of a LoRA)."""
    model = load_model_config(weights["model"])
    ms.set_seed(5)
    unet = build_component("unet", model.unet)
    directory = str(tmp_path_factory.mktemp("base"))
    save_component(directory, "texture_unet", cell_state(unet), model)
    return os.path.join(directory, "texture_unet.safetensors")


def _lora_config(tmp_path, dataset, weights, base_unet, *overrides):
    return tiny_config(tmp_path, dataset, weights, "stage=lora", "train_text_encoders=false",
                       f"init.unet={base_unet}", f"init.conditioner={weights['conditioner']}", "lora.generator=texture",
                       "lora.rank=2", "lora.alpha=4", "optim.ema_decay=0", "optim.learning_rate=3e-3", *overrides)


def test_lora_stage_trains_only_adapters_on_its_range_resumes_exactly_and_exports_them(tmp_path, dataset, weights,
                                                                                       base_unet):
    config = _lora_config(tmp_path, dataset, weights, base_unet, "steps=4", f"export_dir={tmp_path}/lora")
    trainer = Trainer(config)
    unet = trainer.cells["unet"]
    adapter_names = {p.name for p in lora_parameters(trainer.stage.adapters)}
    assert {p.name for p in trainer.stage.trainable_params()} == adapter_names
    model = trainer.model_config
    frozen_before = {k: v for k, v in cell_state(unet).items() if k not in adapter_names}
    summary = trainer.train()
    assert 0 <= summary["t_seen"][0] and summary["t_seen"][1] < model.t_struct  # the texture generator's range
    after = cell_state(unet)
    assert all(np.array_equal(after[k], v) for k, v in frozen_before.items())  # the base never moves
    tensors, _ = CheckpointFolder.load(CheckpointFolder(f"{tmp_path}/run/checkpoints").latest())
    weights_saved = {k.split("/", 2)[2] for k in tensors if k.startswith("model/")}
    assert weights_saved == adapter_names
    per_parameter = [k for k in tensors if not k.startswith("model/") and np.size(tensors[k]) > 1]
    assert per_parameter and all("lora_" in k for k in per_parameter), \
        [k for k in per_parameter if "lora_" not in k]  # optimizer moments of the adapters alone
    trained = trainer.stage.checkpoint_state("unet")
    assert any(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith("lora_up"))

    # Exact resume: 2 steps, a new process-like trainer resumes, 2 more == the 4-step run.
    config_half = _lora_config(tmp_path / "half", dataset, weights, base_unet, "steps=4")
    first = Trainer(config_half)
    first.train(2)
    second = Trainer(config_half)
    assert second.resume()
    second.train()
    resumed = second.stage.checkpoint_state("unet")
    assert all(np.array_equal(resumed[k], trained[k]) for k in trained)

    # The export: texture_lora.safetensors (diffusers layout) merged into the base generator = the adapted UNet.
    path = summary["export"]["lora"]
    assert os.path.basename(path) == "texture_lora.safetensors"
    plain = build_component("unet", model.unet)
    load_state(plain, {k: v for k, v in cell_state(unet).items() if k not in adapter_names})
    merged = MergedLoRAs(plain, [(read_lora(path, plain), 1.0)])
    inputs = _unet_inputs(model.unet, size=4)
    np.testing.assert_allclose(plain(*inputs).asnumpy(), unet(*inputs).asnumpy(), rtol=1e-5, atol=1e-5)
    merged.unmerge()
    # --lora DIR / pipe.load_lora(DIR): each <generator>_lora.safetensors of the folder goes into its generator.
    assert lora_files(os.path.dirname(path), ("structure", "texture")) == {"texture": path}
    assert lora_files(path, ("structure", "texture")) == {"structure": path, "texture": path}
    with pytest.raises(LoRAError, match="folder without structure_lora.safetensors"):
        lora_files(str(tmp_path / "run"), ("structure",))


def test_lora_settings_are_checked(tmp_path, dataset, weights, base_unet):
    with pytest.raises(ValueError, match="stage 'lora' adapts a trained generator: set init.unet"):
        tiny_config(tmp_path, dataset, weights, "stage=lora", "train_text_encoders=false")
    with pytest.raises(ValueError, match="lora.targets"):
        _lora_config(tmp_path, dataset, weights, base_unet, "lora.targets=[attn]")
    with pytest.raises(ValueError, match="train_text_encoders: false"):
        _lora_config(tmp_path, dataset, weights, base_unet, "train_text_encoders=true")
    config = load_train_config("train/demo_lora_structure")
    assert config.stage == "lora" and config.lora.generator == "structure"
    assert config.timestep_range(load_model_config("demo"))[0] == load_model_config("demo").t_struct
