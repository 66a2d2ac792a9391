"""The training options behind the paper's ablations (Tables 4-6): T_struct for both generators, the bucket
list a generator trains at, only-high-resolution data, the Resolution Boost schedule, and the FLOP count
that sets equal compute."""
import os

import numpy as np
import pytest
import yaml
from mindspore import Tensor, nn

from pangu_draw_ms.buckets import BucketTable
from pangu_draw_ms.config import ConfigError, UNetConfig
from pangu_draw_ms.io.model_dir import load_model_config
from pangu_draw_ms.models import layers as L
from pangu_draw_ms.training.compute import forward_flops, generator_training_flops, unet_forward_flops
from pangu_draw_ms.training.data import assign_buckets, read_manifest
from pangu_draw_ms.training.metrics import read_metrics
from pangu_draw_ms.training.trainer import Trainer

from helpers import tiny_config

# ---- T_struct (Table 6) --------------------------------------------------------------------------

@pytest.mark.parametrize("stage, t_struct", [("structure", 200), ("texture", 700)])
def test_t_struct_option_moves_the_timestep_range_and_is_exported(tmp_path, dataset, weights, stage, t_struct):
    config = tiny_config(tmp_path, dataset, weights, f"stage={stage}", f"t_struct={t_struct}", "steps=4",
                         "data.batch_size=4", f"export_dir={tmp_path}/model",
                         f"data.upscale_small_images={stage == 'structure'}")
    summary = Trainer(config).train()
    low, high = summary["t_seen"]
    if stage == "structure":
        assert t_struct <= low and high < 1000 and low < 500  # below the model's own 500: the option moved it
    else:
        assert 0 <= low and high < t_struct and high >= 500
    exported = load_model_config(str(tmp_path / "model"))
    assert exported.t_struct == t_struct
    with open(tmp_path / "model" / "config.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["t_struct"] == t_struct


def test_t_struct_option_is_validated(tmp_path, dataset, weights):
    with pytest.raises(ConfigError, match="t_struct 1000 must lie in"):
        Trainer(tiny_config(tmp_path, dataset, weights, "t_struct=1000", "steps=1"))
    with pytest.raises(ConfigError, match="stage 'full_range' does not use it"):
        tiny_config(tmp_path, dataset, weights, "stage=full_range", "t_struct=300")


# ---- data and resolution (Table 5) ---------------------------------------------------------------

def test_only_high_resolution_drops_exactly_the_images_smaller_than_their_bucket(dataset):
    model = load_model_config("tiny_train")
    samples, _ = read_manifest(os.path.join(dataset, "train.jsonl"))
    table = BucketTable("structure", model.structure_buckets)
    everything, _ = assign_buckets(samples, table, upscale_small_images=True)
    high_only, skipped = assign_buckets(samples, table, upscale_small_images=False)
    small = [s.height < table.sizes[b][0] or s.width < table.sizes[b][1] for s, b in zip(samples, everything)]
    assert 0 < sum(small) < len(samples)
    np.testing.assert_array_equal(high_only < 0, small)
    np.testing.assert_array_equal(high_only[~np.array(small)], everything[~np.array(small)])
    assert sum(skipped.values()) == sum(small)


def test_bucket_list_trains_the_texture_generator_at_the_structure_resolution(tmp_path, dataset, weights):
    model = load_model_config("tiny_train")
    config = tiny_config(tmp_path, dataset, weights, "stage=texture", "bucket_list=structure", "steps=2",
                         "data.upscale_small_images=false")
    Trainer(config).train()
    sizes = {r["size"] for r in read_metrics(os.path.join(config.output_dir, "metrics.csv"))}
    assert sizes == {"x".join(map(str, model.structure_buckets[1]))}  # the square bucket of the structure list


# ---- Resolution Boost (Table 4) ------------------------------------------------------------------

def test_resolution_boost_switches_lists_at_its_step_and_resumes_across_the_switch(tmp_path, dataset, weights):
    model = load_model_config("tiny_train")
    low, high = ("x".join(map(str, buckets[1])) for buckets in (model.texture_buckets, model.structure_buckets))

    def run(name):
        return tiny_config(tmp_path / name, dataset, weights, "stage=full_range", "resolution_boost_step=2",
                           "steps=4", "save_every=1")

    straight = Trainer(run("straight"))
    summary = straight.train()
    rows = read_metrics(os.path.join(straight.config.output_dir, "metrics.csv"))
    assert [r["size"] for r in rows] == [low, low, high, high]
    assert straight.stage.t_range == (0, 1000) and 0 <= summary["t_seen"][0] <= summary["t_seen"][1] < 1000

    first = Trainer(run("interrupted"))
    first.train(steps=2)  # its last checkpoint is the one written at the switch
    resumed = Trainer(run("interrupted"))
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    assert resumed.digest() == straight.digest()


def test_resolution_boost_is_validated(tmp_path, dataset, weights):
    for overrides, message in (
            (("stage=structure", "resolution_boost_step=2", "steps=4"), "applies to stage 'full_range'"),
            (("stage=full_range", "resolution_boost_step=4", "steps=4"), r"must lie in \(0, steps=4\)"),
            (("stage=full_range", "resolution_boost_step=1", "steps=4", "bucket_list=texture"),
             "leave bucket_list at 'default'"),
            (("bucket_list=medium",), r"bucket_list: 'medium' is not valid; choose one of \['default', 'structure', "
                                      r"'texture'\]")):
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, dataset, weights, *overrides)


# ---- equal compute -------------------------------------------------------------------------------

class _Toy(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = L.Conv2d(3, 5, 3, padding=1)
        self.dense = L.Dense(5, 7)
        self.attention = L.ScaledDotProductAttention(1, 7)

    def construct(self, x):
        h = self.conv(x)  # (2, 5, 4, 6)
        tokens = self.dense(h.reshape(2, 5, 24).transpose(0, 2, 1))  # (2, 24, 7)
        return self.attention(tokens, tokens, tokens)


def test_flop_count_matches_a_hand_count():
    conv = 2 * (2 * 5 * 4 * 6) * (3 * 3 * 3)  # 2 x outputs x (in channels x kernel)
    dense = 2 * (2 * 24) * 5 * 7
    attention = 2 * 2 * 2 * 24 * 24 * 7  # q k^T and (weights) v
    assert forward_flops(_Toy(), Tensor(np.zeros((2, 3, 4, 6), np.float32))) == conv + dense + attention


def test_unet_flop_count_matches_a_hand_count():
    """One level, one ResBlock per level, a depth-1 transformer in the middle block only."""
    c, e, h, w, ctx, length = 8, 32, 6, 4, 4, 3
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=c, channel_mult=(1,), num_res_blocks=1,
                      transformer_depth=(0,), transformer_depth_middle=1, num_heads=1, num_head_channels=None,
                      context_dim=ctx, adm_in_channels=None, use_linear_in_transformer=True, norm_num_groups=4,
                      ff_mult=4)
    hw = h * w

    def conv3(cin, cout):
        return 2 * hw * cin * cout * 9

    def res(cin, cout):
        skip = 2 * hw * cin * cout if cin != cout else 0
        return conv3(cin, cout) + conv3(cout, cout) + 2 * e * cout + skip

    time_embedding = 2 * c * e + 2 * e * e
    transformer = (2 * hw * c * c * 2  # proj_in, proj_out
                   + 4 * 2 * hw * c * c + 2 * 2 * hw * hw * c  # self-attention: q k v out, products
                   + 2 * 2 * hw * c * c + 2 * 2 * length * ctx * c + 2 * 2 * hw * length * c  # cross-attention
                   + 2 * hw * c * 8 * c + 2 * hw * 4 * c * c)  # GEGLU c -> 2 x 4c, then 4c -> c
    expected = (time_embedding + conv3(4, c) + res(c, c)  # input blocks
                + res(c, c) + transformer + res(c, c)  # middle
                + 2 * res(2 * c, c)  # output blocks, each on the skip features concatenated
                + conv3(c, 4))
    assert unet_forward_flops(unet, (h, w), length) == expected


def test_training_flops_scale_with_steps_batch_and_pixels():
    model = load_model_config("tiny_train")
    one = generator_training_flops(model, [model.texture_buckets[1]], 1, 1)
    assert generator_training_flops(model, [model.texture_buckets[1]], 4, 5) == pytest.approx(20 * one)
    # 2.25 x the pixels: the convolutions and projections grow with them, the self-attention faster, the
    # cross-attention to the text's keys and the time embedding not at all.
    high = generator_training_flops(model, [model.structure_buckets[1]], 1, 1)
    (th, tw), (sh, sw) = model.texture_buckets[1], model.structure_buckets[1]
    ratio = (sh * sw) / (th * tw)
    assert 0.9 * ratio * one < high < ratio ** 2 * one


# ---- tools/ablate.py: the arms, the accounting, the tables ---------------------------------------

def test_ablation_plan_gives_every_arm_and_equal_compute(weights, dataset):
    from pangu_draw_ms.training.ablation import (
        AblationConfig,
        plan_arms,
        resolution_boost_model,
        resolution_boost_steps,
    )

    base = load_model_config(weights["model"])
    config = AblationConfig(base_model=weights["model"], manifest=f"{dataset}/square.jsonl", steps=10, batch_size=2,
                            t_structs=(300, 500))
    total, accounting = resolution_boost_steps(base, config)
    # Equal compute: the pair's FLOPs and Resolution Boost's agree to within one of its steps.
    assert abs(accounting["resolution_boost_flops"] - accounting["pair_flops"]) \
        <= accounting["resolution_boost_flops_per_step"] / 2
    boost = resolution_boost_model(base, config)
    share = config.resolution_boost.low_resolution_share
    per_step = share * generator_training_flops(boost, base.texture_buckets, 2, 1) \
        + (1 - share) * generator_training_flops(boost, base.structure_buckets, 2, 1)
    pair = 10 * (generator_training_flops(base, base.structure_buckets, 2, 1)
                 + generator_training_flops(base, base.texture_buckets, 2, 1))
    assert total == round(pair / per_step) and accounting["pair_flops"] == pytest.approx(pair)

    arms = {arm.name: arm for arm in plan_arms(config, total)}
    assert list(arms) == ["pair_t300", "pair_t500", "structure_high_only", "texture_high_res", "resolution_boost"]
    assert [r.stage for r in arms["pair_t300"].runs] == ["structure", "texture"]
    assert all("t_struct=300" in r.overrides for r in arms["pair_t300"].runs)
    assert "data.upscale_small_images=false" in arms["structure_high_only"].runs[0].overrides
    assert arms["structure_high_only"].borrowed == {"texture_unet": "pair_t500"}
    assert "bucket_list=structure" in arms["texture_high_res"].runs[0].overrides
    assert arms["texture_high_res"].borrowed == {"structure_unet": "pair_t500"}
    boost_run = arms["resolution_boost"].runs[0]
    assert boost_run.stage == "full_range" and f"steps={total}" in boost_run.overrides
    assert f"resolution_boost_step={round(share * total)}" in boost_run.overrides


def test_ablation_tables_compare_with_the_seed_spread(tmp_path, weights, dataset):
    from pangu_draw_ms.cli.ablate import write_tables
    from pangu_draw_ms.training.ablation import AblationConfig

    config = AblationConfig(base_model=weights["model"], manifest=f"{dataset}/square.jsonl", work_dir=str(tmp_path),
                            t_structs=(300, 500))

    def report(fd, score):  # two seeds; every metric but FD-demoCLIP higher-is-better
        per_language = {"en": {"per_seed": [score - 1, score + 1]}, "zh": {"per_seed": [score - 1, score + 1]}}
        return {"metrics": {"fd_democlip": {"all": {"per_seed": [fd - 0.5, fd + 0.5]}},
                            "is_democlip": {"all": {"per_seed": [score, score]}},
                            "democlip": per_language, "judge": per_language}}

    reports = {"pair_t500": report(5.0, 50.0), "resolution_boost": report(9.0, 49.5), "pair_t300": report(4.0, 60.0)}
    accounting = {"pair_flops": 1e12, "resolution_boost_flops": 1e12, "resolution_boost_steps": 9,
                  "pair_unet_parameters": 1000, "resolution_boost_unet_parameters": 2000}
    tables = write_tables(config, reports, accounting)
    verdicts = {(v["than"], v["metric"]): v["verdict"] for t in tables.values() for v in t["verdicts"]}
    assert verdicts[("resolution_boost", "fd_democlip")] == "agrees (8.0 x spread)"  # 4.0 lower, spread 0.5
    assert verdicts[("resolution_boost", "democlip")] == "agrees in direction, within the spread (0.5 x)"
    assert verdicts[("pair_t300", "judge")] == "disagrees (10.0 x spread)"
    text = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert "| Resolution Boost (one UNet, low then high resolution) | 9.00 ± 0.50 / 106.12 |" in text
    assert "not run" in text and not any(than == "structure_high_only" for than, _ in verdicts)
