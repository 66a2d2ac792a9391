"""Coop-Diffusion end to end with tiny models on CPU: fusion across latent spaces, ControlNet fusion,
image-variation fusion, low-to-high resolution generation, and recipes from the CLI."""
import dataclasses
import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from pangu_draw_ms.config import ControlNetConfig, CoopRecipe, from_dict, load_config, to_dict
from pangu_draw_ms.io.layouts import build_component, save_component
from pangu_draw_ms.pipelines.coop import CoopPipeline
from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

from helpers import in_pynative, randomize_torch_module
from released_layout import randomize_cell

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SMALL = dataclasses.replace(load_config("tiny"), structure_buckets=((64, 64), (96, 96), (64, 128)))
PROMPT = "一个红色的圆形 a red circle"


def tiny_diffusers_vae(seed):
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.18215)
    randomize_torch_module(vae, seed=seed)
    return vae


def tiny_sd_unet(context_dim, seed):
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=context_dim, attention_head_dim=2,
        norm_num_groups=8)
    randomize_torch_module(unet, seed=seed)
    return unet


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny partner models written the way users get them: diffusers/transformers save_pretrained folders
    (an SD1.x-style text-to-image model in another latent space, an image-variation model), and our
    ControlNet file for the main model."""
    root = tmp_path_factory.mktemp("partners")
    sd = root / "sd15"
    tiny_sd_unet(32, 1).save_pretrained(sd / "unet")
    tiny_diffusers_vae(2).save_pretrained(sd / "vae")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408))
    randomize_torch_module(text, seed=3)
    text.save_pretrained(sd / "text_encoder")
    (sd / "tokenizer").mkdir()
    (sd / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))

    variation = root / "variation"
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        projection_dim=16))
    randomize_torch_module(encoder, seed=4)
    encoder.save_pretrained(variation / "image_encoder")
    tiny_sd_unet(16, 5).save_pretrained(variation / "unet")
    tiny_diffusers_vae(6).save_pretrained(variation / "vae")

    controlnet = randomize_cell(build_component("controlnet", ControlNetConfig(unet=SMALL.unet)), 7)
    save_component(controlnet, str(root / "controlnet.safetensors"))

    images = {}
    for name, size in (("edges", (64, 64)), ("reference", (40, 48))):
        arr = (np.random.default_rng(8).random((*size, 3)) * 255).astype(np.uint8)
        images[name] = str(root / f"{name}.png")
        Image.fromarray(arr).save(images[name])
    return {"sd15": str(sd), "variation": str(variation), "controlnet": str(root / "controlnet.safetensors"), **images}


@pytest.fixture(scope="module")
def main():
    return PanGuDrawPipeline.from_config(SMALL)


def recipe(**data):
    return from_dict(CoopRecipe, data)


RUN = dict(height=64, width=64, num_inference_steps=4, seed=3)


def test_zero_weight_partner_leaves_the_main_model_alone(main, models):
    coop = CoopPipeline(main, recipe(partners=[{"name": "sd15", "kind": "diffusers", "path": models["sd15"],
                                                "weight": 0.0,
                                                "height": 32, "width": 32}]))
    fused = coop(PROMPT, output_type="latent", **RUN)
    plain = main(PROMPT, output_type="latent", **RUN)
    assert np.array_equal(fused.latents, plain.latents)
    assert all(names == ["main"] for _, names in fused.info["coop_trace"])


def test_fusion_across_two_latent_spaces_and_sizes(main, models):
    """Main: 64x64 images, 4x8x8 latents (tiny PanGu VAE, f=8); partner: SD-style, 32x32 images,
    4x16x16 latents (f=2), its own text encoder; fused for t >= 300 only."""
    coop = CoopPipeline(main, recipe(partners=[{"name": "sd15", "kind": "diffusers", "path": models["sd15"],
                                                "weight": 0.6, "t_min": 300, "height": 32, "width": 32,
                                                "prompt": "a red circle"}]))
    out = coop(PROMPT, **RUN)
    plain = main(PROMPT, output_type="latent", **RUN)
    assert out.images[0].size == (64, 64) and not np.allclose(out.latents, plain.latents)
    trace = dict((t, names) for t, names in out.info["coop_trace"])
    assert all(("sd15" in names) == (t >= 300) for t, names in trace.items())
    assert out.info["unet_evaluations"]["sd15"] == sum(t >= 300 for t in trace)


def test_controlnet_and_image_variation_partners(main, models):
    coop = CoopPipeline(main, recipe(partners=[
        {"name": "edges", "kind": "controlnet", "path": models["controlnet"], "control_image": models["edges"],
         "weight": 0.5, "guess_mode": True},
        {"name": "variation", "kind": "image_variation", "path": models["variation"], "image": models["reference"],
         "weight": 0.3, "height": 32, "width": 32, "t_max": 800},
    ]))
    out = coop(PROMPT, **RUN)
    assert out.images[0].size == (64, 64)
    evaluations = out.info["unet_evaluations"]
    assert evaluations["edges"] == 4 and 0 < evaluations["variation"] < 4
    # The ControlNet really steers: another control image gives another picture.
    other = CoopPipeline(main, dataclasses.replace(coop.recipe, partners=(
        dataclasses.replace(coop.recipe.partners[0], control_image=models["reference"]), coop.recipe.partners[1])))
    rebuilt = other(PROMPT, output_type="latent", **RUN).latents
    assert not np.allclose(rebuilt, out.latents)
    # ... and so does a control image given per call, with the ControlNet kept loaded.
    swapped = coop(PROMPT, output_type="latent", control_images={"edges": models["reference"]}, **RUN).latents
    np.testing.assert_allclose(swapped, rebuilt, rtol=1e-5, atol=1e-5 * np.abs(rebuilt).max())
    # One control image per image of a batch: each image is the one its control image gives alone.
    batch = coop([PROMPT, PROMPT], output_type="latent", control_images={"edges": [models["edges"],
                                                                                   models["reference"]]}, **RUN)
    second = coop(PROMPT, output_type="latent", control_images={"edges": models["reference"]}, first_image_index=1,
                  **RUN).latents
    for image, alone in zip(batch.latents, (out.latents[0], second[0])):
        np.testing.assert_allclose(image, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    with pytest.raises(ValueError, match="3 control images for a run of 2 images; give one, or one per image"):
        coop([PROMPT, PROMPT], control_images={"edges": [models["edges"]] * 3}, **RUN)
    with pytest.raises(ValueError, match="not ControlNet partners of the recipe"):
        coop(PROMPT, control_images={"variation": models["reference"]}, **RUN)


def test_low_to_high_resolution_generation(main, models):
    """Sub-module 2: the SD-style partner at 32x32 from T to T_low, then the main model at 64x128."""
    steps = 6
    coop = CoopPipeline(main, recipe(partners=[{"name": "sd15", "kind": "diffusers", "path": models["sd15"],
                                                "height": 32, "width": 32}],
                                     resolution_bridge={"partner": "sd15", "t_low": 600, "upsample": "bicubic"}))
    out = coop(PROMPT, height=64, width=128, num_inference_steps=steps, seed=1)
    assert out.images[0].size == (128, 64)
    timesteps = out.info["timesteps"]
    k = next(i for i, t in enumerate(timesteps) if t <= 600)
    # (T - T_low) low-resolution steps + one evaluation at T_low for its x0, then the high-resolution tail.
    assert out.info["unet_evaluations"] == {"main": steps - k, "sd15": k}
    low = [t for t, names in out.info["coop_trace"] if names == ("sd15",) or names == ["sd15"]]
    assert low == timesteps[:k]


def test_high_to_low_resolution_generation(main, models):
    """Sub-module 2 "and vice versa": the main model at 64x64 from T to the switch timestep, then the SD-style
    partner at 32x32 (its own latent space) to 0; the partner's VAE decodes the image at its size."""
    steps = 6
    coop = CoopPipeline(main, recipe(partners=[{"name": "sd15", "kind": "diffusers", "path": models["sd15"],
                                                "height": 32, "width": 32}],
                                     resolution_bridge={"partner": "sd15", "t_low": 600, "upsample": "bicubic",
                                                        "order": "main_first"}))
    out = coop(PROMPT, height=64, width=64, num_inference_steps=steps, seed=1)
    assert out.images[0].size == (32, 32) and out.latents.shape == (1, 4, 16, 16)
    timesteps = out.info["timesteps"]
    k = next(i for i, t in enumerate(timesteps) if t <= 600)
    assert [t for t, names in out.info["coop_trace"] if names == ["main"]] == timesteps[:k]
    assert [t for t, names in out.info["coop_trace"] if names == ["sd15"]] == timesteps[k:]
    assert out.info["unet_evaluations"] == {"main": k, "sd15": steps - k}
    # The partner's part starts from the main x0, carried and re-noised: another main model changes the result.
    other = CoopPipeline(main, coop.recipe)(PROMPT, height=64, width=64, num_inference_steps=steps, seed=2,
                                            output_type="latent")
    assert not np.allclose(other.latents, out.latents)


def test_partners_start_from_the_main_noise_where_the_shapes_agree(main, models):
    """Algorithm 1: z'_T = z_T. A partner in another latent space whose latents have the main latents' shape
    (SD-style VAE, factor 2, at 16x16 pixels: 4x8x8, as the main 64x64 at factor 8) starts from the main
    noise; a partner of another latent shape draws its own."""
    run = main.plan(PROMPT, **RUN)
    z = main.initial_noise(run)
    timesteps = [int(t) for t in run.timesteps]
    for size, shared in ((16, True), (32, False)):
        coop = CoopPipeline(main, recipe(partners=[{"name": "sd15", "kind": "diffusers", "path": models["sd15"],
                                                    "height": size, "width": size}]))
        partners = coop.partners((64, 64))
        _, (start,) = coop._fuse_partners(run, partners, lambda config: None, None, z, None, timesteps)
        assert (start.shape == z.shape and np.array_equal(start, z)) == shared


def test_a_pangu_model_at_its_texture_bucket_list(main):
    """bucket_list="texture": the lower-resolution list, index-aligned with the structure list (the same bucket
    conditioning); a partner size outside the list it names is refused naming that list."""
    h, w = main.config.texture_buckets[0]
    run = main.plan(PROMPT, height=h, width=w, bucket_list="texture")
    assert (run.bucket_index, run.height, run.width) == (0, h, w)
    assert run.latent_shape == (1, 4, h // 8, w // 8)
    with pytest.raises(Exception, match="bucket_list must be one of"):
        main.plan(PROMPT, bucket_list="medium")
    coop = CoopPipeline(main, recipe(partners=[{"name": "low", "kind": "pangu", "path": "main", "height": 40,
                                                "width": 40, "bucket_list": "texture"}]))
    with pytest.raises(ValueError, match="40x40 is not a bucket of its model's texture list"):
        coop(PROMPT, output_type="latent", **RUN)


def test_latent_bilinear_baseline_needs_one_latent_space(main, models):
    pangu_low = {"name": "low", "kind": "pangu", "path": "main", "height": 64, "width": 64}
    coop = CoopPipeline(main, recipe(partners=[pangu_low],
                                     resolution_bridge={"partner": "low", "t_low": 500, "upsample": "latent_bilinear"}))
    out = coop(PROMPT, height=64, width=128, num_inference_steps=4, seed=1, output_type="latent")
    assert out.latents.shape == (1, 4, 8, 16)
    with pytest.raises(ValueError, match="one latent space"):
        CoopPipeline(main, recipe(partners=[{"name": "sd15", "kind": "diffusers", "path": models["sd15"],
                                              "height": 32, "width": 32}],
                                  resolution_bridge={"partner": "sd15", "t_low": 500, "upsample": "latent_bilinear"})
                     )(PROMPT, output_type="latent", **RUN)


def test_recipe_errors_name_the_problem(models):
    with pytest.raises(ValueError, match="base 'nobody'"):
        recipe(partners=[{"name": "c", "kind": "controlnet", "path": "x", "control_image": "y", "base": "nobody"}])
    with pytest.raises(ValueError, match="not a partner of the recipe"):
        recipe(partners=[{"name": "a", "kind": "pangu", "config": "tiny"}], resolution_bridge={"partner": "b"})
    with pytest.raises(ValueError, match="needs control_image"):
        recipe(partners=[{"name": "c", "kind": "controlnet", "path": "x"}])


def test_recipes_run_from_the_cli(models, tmp_path):
    from pangu_draw_ms.cli import infer

    config_path = tmp_path / "small.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(SMALL), allow_unicode=True), encoding="utf-8")
    recipes = {
        "fusion": {"partners": [
            {"name": "sd15", "kind": "diffusers", "path": models["sd15"], "weight": 0.3, "height": 32, "width": 32},
            {"name": "edges", "kind": "controlnet", "path": models["controlnet"], "control_image": models["edges"],
             "weight": 0.3},
            {"name": "v", "kind": "image_variation", "path": models["variation"], "image": models["reference"],
             "weight": 0.2, "height": 32, "width": 32}]},
        "upscale": {"partners": [{"name": "sd15", "kind": "diffusers", "path": models["sd15"],
                                  "height": 32, "width": 32}],
                    "resolution_bridge": {"partner": "sd15", "t_low": 500}},
    }
    for name, data in recipes.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        out = infer.main(["--config", str(config_path), "--recipe", str(path), "--prompt", PROMPT, "--steps", "3",
                          "--height", "64", "--width", "64", "--quiet", "--mode", "pynative",
                          "--out", str(tmp_path / f"{name}.png")])
        with Image.open(out[0]) as image:
            assert image.size == (64, 64)
            assert json.loads(image.text["parameters"])["recipe"]["partners"]


def test_bundled_recipes_are_valid():
    from pangu_draw_ms.config import CONFIG_DIR

    folder = os.path.join(CONFIG_DIR, "recipes")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".yaml"))
    assert len(names) >= 4
    for name in names:
        assert load_config(os.path.join(folder, name), CoopRecipe).partners


def test_compiled_fused_steps_equal_the_host_loop(main, models, graph_mode):
    """Each fused step as one graph (partner UNets + bridges + fusion + update) gives the latents of the
    host loop (any-sampler path, run eagerly in PYNATIVE mode: the reference shares no compiled code with
    the graph) - also for a step where no partner is active (the last one here: sd15 fuses for t >= 400, the
    ControlNet for t >= 600; three steps at t = 999, 666, 333 need two graphs, the fused one and the main
    model's with both partners inactive, and Heun evaluates at the same t, in the same graphs). A second run
    reuses the compiled steps, and compiling renames no parameter of the pipeline's networks. (DDIM differs from
    Euler only in its affine coefficients, which test_schedule_samplers checks against its step.)"""
    coop = CoopPipeline(main, recipe(partners=[
        {"name": "sd15", "kind": "diffusers", "path": models["sd15"], "weight": 0.4, "height": 32, "width": 32,
         "t_min": 400},
        {"name": "edges", "kind": "controlnet", "path": models["controlnet"], "control_image": models["edges"],
         "weight": 0.3, "t_min": 600}]))
    unet_names = {name: [p.name for p in main.components.get(name).get_parameters()]
                  for name in ("structure_unet", "texture_unet")}
    steps = dict(RUN, num_inference_steps=3)  # each graph costs ~14 s to compile here: two, not five
    kwargs = dict(output_type="latent", sampler="euler", **steps)
    graph = coop(PROMPT, compiled=True, **kwargs)
    compiled_steps = dict(coop._fused_steps)
    host = in_pynative(coop, PROMPT, compiled=False, **kwargs)
    assert graph.info["compiled_fused_steps"] and graph.info["sampler_update_in_graph"]
    assert not host.info["compiled_fused_steps"]
    assert graph.info["coop_trace"] == host.info["coop_trace"]
    assert [names for _, names in host.info["coop_trace"]][-1] == ["main"]  # the step without partners
    np.testing.assert_allclose(graph.latents, host.latents, rtol=1e-4, atol=1e-4 * np.abs(host.latents).max())
    again = coop(PROMPT, compiled=True, **kwargs)
    assert len(compiled_steps) == 2 and coop._fused_steps == compiled_steps  # nothing new compiled
    np.testing.assert_allclose(again.latents, graph.latents, rtol=1e-5, atol=1e-6)
    assert {name: [p.name for p in main.components.get(name).get_parameters()] for name in unet_names} == unet_names
    # Heun (two evaluations per step) updates on the host around the same compiled fused prediction.
    heun = {True: coop(PROMPT, compiled=True, output_type="latent", sampler="heun", **steps),
            False: in_pynative(coop, PROMPT, compiled=False, output_type="latent", sampler="heun", **steps)}
    assert heun[True].info["compiled_fused_steps"] and not heun[True].info["sampler_update_in_graph"]
    assert coop._fused_steps == compiled_steps  # its predictions come from the same graphs (A = 0, B = 1)
    np.testing.assert_allclose(heun[True].latents, heun[False].latents, rtol=1e-4,
                               atol=1e-4 * np.abs(heun[False].latents).max())
    with pytest.raises(ValueError, match="compiled fused step needs"):
        coop(PROMPT, compiled=True, output_type="latent", sampler="euler", guidance_rescale=0.7, **steps)
