"""The text-to-image pipeline end to end with the tiny config on CPU."""
import dataclasses

import mindspore as ms
import numpy as np
import pytest

from pangu_draw_ms.buckets import TABLE7_STRUCTURE, TABLE7_TEXTURE, BucketError
from pangu_draw_ms.config import load_config
from pangu_draw_ms.io.state import cell_state, load_state
from pangu_draw_ms.pipelines import pangu_draw
from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline

from helpers import assert_close, in_pynative

# The tiny architecture with small buckets, so a run takes seconds.
SMALL = dataclasses.replace(load_config("tiny"), structure_buckets=((64, 128), (96, 96), (128, 64)))
PROMPT = "一个红色的圆形 a red circle"


@pytest.fixture(scope="module")
def pipe():
    return PanGuDrawPipeline.from_config(SMALL)


def test_text_to_image_runs_and_reports(pipe):
    out = pipe(PROMPT, height=64, width=128, num_inference_steps=3, seed=1)
    assert [im.size for im in out.images] == [(128, 64)]
    assert out.latents.shape == (1, 4, 8, 16)
    info = out.info
    assert info["bucket_index"] == 0 and info["random_weights"] is True
    assert [name for _, name in info["expert_trace"]] == ["structure", "structure", "texture"]


def test_same_seed_same_latents_and_explicit_noise(pipe):
    a = pipe(PROMPT, height=96, width=96, num_inference_steps=2, seed=7, output_type="latent").latents
    b = pipe(PROMPT, height=96, width=96, num_inference_steps=2, seed=7, output_type="latent").latents
    c = pipe(PROMPT, height=96, width=96, num_inference_steps=2, seed=8, output_type="latent").latents
    assert np.array_equal(a, b) and not np.allclose(a, c)
    noise = np.random.default_rng([7, 0]).standard_normal((1, 4, 12, 12), dtype=np.float32)
    d = pipe(PROMPT, height=96, width=96, num_inference_steps=2, noise=noise, output_type="latent").latents
    assert np.array_equal(a, d)


def test_equal_experts_equal_the_single_model_bit_for_bit():
    pipe = PanGuDrawPipeline.from_config(SMALL)
    structure = pipe.components.get("structure_unet")
    texture = pipe.components.get("texture_unet")
    kwargs = dict(height=64, width=128, num_inference_steps=4, seed=3, output_type="latent")
    different = pipe(PROMPT, **kwargs).latents
    load_state(texture, cell_state(structure))
    split = pipe(PROMPT, **kwargs).latents
    single = pipe(PROMPT, single_model="structure", **kwargs)
    assert {name for _, name in single.info["expert_trace"]} == {"structure"}
    assert np.array_equal(split, single.latents)
    assert not np.allclose(split, different)  # the experts really differed before


def test_batches_of_prompts_and_images(pipe):
    out = pipe(["a red circle", "一个蓝色的方块"], height=96, width=96, num_inference_steps=2,
               num_images_per_prompt=2, seed=5)
    assert len(out.images) == 4 and out.latents.shape == (4, 4, 12, 12)
    # Image k draws its noise from (seed, k): the third image is prompt 2's first, made alone below.
    alone = pipe("一个蓝色的方块", height=96, width=96, num_inference_steps=2, seed=5, first_image_index=2,
                 output_type="latent")
    assert_close(out.latents[2], alone.latents[0], rel=1e-5, what="batched vs alone")
    assert not np.allclose(out.latents[2], out.latents[3])


def test_latents_decode_in_batches_as_each_alone(pipe, monkeypatch):
    """The VAE decodes as many images per call as hold DECODE_PIXELS (here two 96 x 96 images: calls of 2 and 1);
    each image is the one its own decode gives."""
    vae = pipe.components.get("vae")
    latents = np.random.default_rng(4).standard_normal((3, 4, 12, 12)).astype(np.float32)
    monkeypatch.setattr(pangu_draw, "DECODE_PIXELS", 2 * 96 * 96)
    calls = []
    decode = vae.decode_latents
    monkeypatch.setattr(vae, "decode_latents", lambda z: calls.append(z.shape[0]) or decode(z))
    images = pangu_draw.decode_in_batches(vae, latents)
    assert calls == [2, 1] and images.shape == (3, 3, 96, 96)
    for i in range(3):
        np.testing.assert_array_equal(images[i], decode(ms.Tensor(latents[i:i + 1])).asnumpy()[0])


def test_sequential_memory_mode_matches_resident(pipe):
    seen = []
    sequential = PanGuDrawPipeline.from_config(SMALL, memory="sequential")
    kwargs = dict(height=96, width=96, num_inference_steps=3, seed=2)
    original = sequential.components.get

    def spy(name):
        cell = original(name)
        seen.append((name, tuple(sequential.components.resident)))
        return cell

    sequential.components.get = spy
    out = sequential(PROMPT, **kwargs)
    assert np.array_equal(out.latents, pipe(PROMPT, output_type="latent", **kwargs).latents)
    for name, resident in seen:
        assert not {"structure_unet", "texture_unet"} <= set(resident), resident
    assert sequential.components.resident == []


def test_image_to_image_uses_the_schedule_tail(pipe):
    image = (np.random.default_rng(0).random((80, 100, 3)) * 255).astype(np.uint8)
    out = pipe(PROMPT, init_image=image, strength=0.5, height=96, width=96, num_inference_steps=10, seed=1)
    full = pipe.schedule.timesteps(10, "release")
    assert out.info["timesteps"] == full[5:].tolist()
    assert out.images[0].size == (96, 96)


def test_bad_requests_fail_clearly(pipe):
    with pytest.raises(ValueError, match="non-empty"):
        pipe("  ")
    with pytest.raises(BucketError, match="valid sizes: 0: 64x128"):
        pipe(PROMPT, height=100, width=100)
    with pytest.raises(ValueError, match="sampler must be one of"):
        pipe(PROMPT, height=96, width=96, sampler="plms")
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1, got 0"):
        pipe(PROMPT, height=96, width=96, num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(PROMPT, height=96, width=96, guidance_scale=-2)
    with pytest.raises(ValueError, match="noise has shape"):
        pipe(PROMPT, height=96, width=96, noise=np.zeros((1, 4, 8, 8), np.float32))
    out = pipe(PROMPT, height=100, width=90, snap_to_bucket=True, num_inference_steps=1, output_type="latent")
    assert (out.info["height"], out.info["width"]) == (96, 96)


@pytest.mark.parametrize("table", [TABLE7_STRUCTURE, TABLE7_TEXTURE], ids=["structure", "texture"])
def test_every_bucket_of_table7_gives_an_image_of_its_size(table):
    """Full-size buckets (in the suite's PyNative mode, so that 11 shapes don't compile 11 graphs). The tiny
    architecture at a quarter of its widths: what is checked is the bucket plumbing (latent size, bucket
    index, and the decoded image's size for the largest and the most elongated bucket; the decoder's
    full-resolution convolutions at 1024 px take most of the time)."""
    tiny = load_config("tiny")
    narrow = dataclasses.replace(tiny, structure_buckets=table,
                                 unet=dataclasses.replace(tiny.unet, model_channels=8, num_head_channels=8),
                                 vae=dataclasses.replace(tiny.vae, base_channels=8, norm_num_groups=4))
    pipe = PanGuDrawPipeline.from_config(narrow)
    factor = narrow.vae.downsample_factor
    decoded = {max(table, key=lambda hw: hw[0] * hw[1]), max(table, key=lambda hw: max(hw) / min(hw))}
    for index, (h, w) in enumerate(table):
        out = pipe(PROMPT, height=h, width=w, num_inference_steps=1, guidance_scale=1.0,
                   output_type="pil" if (h, w) in decoded else "latent")
        assert out.latents.shape[2:] == (h // factor, w // factor) and out.info["bucket_index"] == index
        assert (h, w) not in decoded or out.images[0].size == (w, h)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "heun", "dpmpp_2m", "euler_ancestral"])
def test_compiled_step_equals_the_host_loop(pipe, sampler, graph_mode):
    """Each denoising step as one graph (both guidance branches in one UNet call, the guidance combination,
    the expert's network, and for Euler/DDIM the update) gives the host loop's latents within 1e-5 (run eagerly
    in PYNATIVE mode: the reference shares no compiled code with the graph), with the same expert trace. The
    graphs do not depend on the sampler: one per expert, compiled once and reused by every later call, and
    compiling renames no parameter of the UNets."""
    names = {name: [p.name for p in pipe.components.get(name).get_parameters()]
             for name in ("structure_unet", "texture_unet")}
    kwargs = dict(height=64, width=128, num_inference_steps=4, seed=3, sampler=sampler, output_type="latent",
                  style_scales={"aesthetic": 2.0})
    compiled = pipe(PROMPT, **kwargs)
    graphs = dict(pipe._step_graphs)
    host = in_pynative(pipe, PROMPT, compiled=False, **kwargs)
    assert compiled.info["compiled_fused_steps"] and not host.info["compiled_fused_steps"]
    assert compiled.info["sampler_update_in_graph"] == (sampler in ("euler", "ddim"))
    assert compiled.info["expert_trace"] == host.info["expert_trace"]
    assert {name for _, name in compiled.info["expert_trace"]} == {"structure", "texture"}
    assert_close(compiled.latents, host.latents, rel=1e-5, what=f"{sampler}: compiled vs host loop")
    again = pipe(PROMPT, **kwargs)
    assert pipe._step_graphs == graphs  # nothing new compiled
    assert np.array_equal(again.latents, compiled.latents)
    assert {name: [p.name for p in pipe.components.get(name).get_parameters()] for name in names} == names


def test_guidance_rescale_runs_on_the_host(pipe):
    kwargs = dict(height=96, width=96, num_inference_steps=2, seed=1, output_type="latent", guidance_rescale=0.7)
    assert not pipe(PROMPT, **kwargs).info["compiled_fused_steps"]
    with pytest.raises(ValueError, match="compiled fused step needs"):
        pipe(PROMPT, compiled=True, **kwargs)
