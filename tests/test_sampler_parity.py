"""Our DDIM and Euler driving our tiny UNet vs diffusers' DDIMScheduler / EulerDiscreteScheduler driving a
parity-loaded diffusers UNet, from the same initial noise."""
import mindspore as ms
import numpy as np
import pytest

from pangu_draw_ms.diffusion.denoiser import Conditioning, UNetEpsModel
from pangu_draw_ms.diffusion.samplers import make_sampler
from pangu_draw_ms.diffusion.schedule import NoiseSchedule
from pangu_draw_ms.io.diffusers_unet import unet_from_diffusers
from pangu_draw_ms.io.state import load_state
from pangu_draw_ms.models import layers as L
from pangu_draw_ms.models.unet import UNetModel

from helpers import BUCKET_DIM, CONTEXT, POOLED, SDXL_LIKE, assert_close, diffusers_unet, torch_state_numpy

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

STEPS = 8
SCHEDULER_ARGS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      timestep_spacing="leading", steps_offset=1)


@pytest.fixture(scope="module")
def models():
    reference = diffusers_unet(SDXL_LIKE)
    ours = UNetModel(SDXL_LIKE)
    load_state(ours, unet_from_diffusers(torch_state_numpy(reference), SDXL_LIKE))
    rng = np.random.default_rng(3)
    context = rng.standard_normal((1, 5, CONTEXT)).astype(np.float32)
    pooled = rng.standard_normal((1, POOLED)).astype(np.float32)
    bucket = np.array([2.0], np.float32)
    vector = np.concatenate([pooled, L.sinusoidal_embedding(ms.Tensor(bucket), BUCKET_DIM).asnumpy()], axis=1)
    noise = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)

    def reference_eps(sample, t):
        with torch.no_grad():
            return reference(sample, t, encoder_hidden_states=torch.from_numpy(context),
                             added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                                "time_ids": torch.from_numpy(bucket[:, None])}).sample

    ours_eps = UNetEpsModel(ours)
    cond = Conditioning(context, vector)
    return reference_eps, (lambda z, t: ours_eps(z, t, cond)), noise


def run_ours(name, denoise, noise):
    schedule = NoiseSchedule()
    timesteps = schedule.timesteps(STEPS, "leading", steps_offset=1)
    return make_sampler(name, schedule).sample(denoise, noise, timesteps)


def test_ddim_matches_diffusers(models):
    reference_eps, ours, noise = models
    scheduler = diffusers.DDIMScheduler(set_alpha_to_one=True, clip_sample=False, **SCHEDULER_ARGS)
    scheduler.set_timesteps(STEPS)
    sample = torch.from_numpy(noise)
    for t in scheduler.timesteps:
        sample = scheduler.step(reference_eps(sample, t), t, sample).prev_sample
    assert_close(run_ours("ddim", ours, noise), sample.numpy(), rel=1e-4, what="DDIM final latents")


def test_euler_matches_diffusers(models):
    reference_eps, ours, noise = models
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER_ARGS)
    scheduler.set_timesteps(STEPS)
    # diffusers' Euler state is x = z * sqrt(1 + sigma^2) (init_noise_sigma); the model sees z again.
    sample = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = reference_eps(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(eps, t, sample).prev_sample
    assert_close(run_ours("euler", ours, noise), sample.numpy(), rel=1e-4, what="Euler final latents")


def test_pipeline_matches_the_diffusers_sdxl_pipeline():
    """Whole sampling loop (classifier-free guidance, Euler, both experts) vs diffusers'
    StableDiffusionXLPipeline with the same weights, embeddings, bucket id and initial noise."""
    import dataclasses

    from pangu_draw_ms.config import load_config

    from reference_pipeline import build_pair, reference_run

    config = dataclasses.replace(load_config("tiny"), structure_buckets=((64, 128), (96, 96)))
    ours, reference = build_pair(config, seed=5)
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 16)).astype(np.float32)
    kwargs = dict(height=64, width=128, guidance_scale=5.0)
    got = ours("一个红色的圆形 a red circle", num_inference_steps=6, spacing="leading", sampler="euler",
               noise=noise, output_type="latent", **kwargs).latents
    expected = reference_run(reference, ours, "一个红色的圆形 a red circle", bucket_index=0, steps=6, noise=noise,
                             **kwargs).numpy()
    assert_close(got, expected, rel=1e-4, what="pipeline latents vs diffusers SDXL pipeline")
