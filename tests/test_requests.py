"""Bad requests to the Python API: one clear error naming the option, the bad value and what is valid, raised
before any network is built; latents that become non-finite stop the run at the step where it happened."""
import dataclasses

import numpy as np
import pytest

from pangu_draw_ms.config import load_config
from pangu_draw_ms.diffusion.samplers import EulerSampler, NonFiniteLatentsError
from pangu_draw_ms.diffusion.schedule import NoiseSchedule
from pangu_draw_ms.pipelines.pangu_draw import PanGuDrawPipeline
from pangu_draw_ms.pipelines.requests import RequestError, check_noise_file

SMALL = dataclasses.replace(load_config("tiny"), structure_buckets=((64, 128), (96, 96), (128, 64)))
PROMPT = "一个红色的圆形 a red circle"


@pytest.fixture(scope="module")
def pipe():
    return PanGuDrawPipeline.from_config(SMALL)


@pytest.mark.parametrize("request_, message", [
    (dict(prompt=None), "prompt must be a string or a non-empty list of strings, got None"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings, got []"),
    (dict(prompt=["a cat", 3]), "prompt 2 must be a string, got 3"),
    (dict(prompt=["a cat", " "]), "prompt 2 is empty: every prompt must be a non-empty string"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0, got nan"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number >= 0, got inf"),
    (dict(guidance_scale="high"), "guidance_scale must be a finite number >= 0, got 'high'"),
    (dict(guidance_scale=-2), "guidance_scale must be a finite number >= 0, got -2"),
    (dict(guidance_rescale=1.5), "guidance_rescale must be a finite number in [0, 1], got 1.5"),
    (dict(style_scales={"anime": np.float32("nan")}), "style_scales['anime'] must be a finite number >= 0, got nan"),
    (dict(style_scales={"gothic": 1.0}), "style_scales names the unknown style 'gothic'; valid: aesthetic"),
    (dict(seed=1.5), "seed must be an integer >= 0, got 1.5"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(seed=True), "seed must be an integer >= 0, got True"),
    (dict(num_images_per_prompt="2"), "num_images_per_prompt must be an integer >= 1, got '2'"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1, got 0"),
    (dict(first_image_index=-3), "first_image_index must be an integer >= 0, got -3"),
    (dict(num_inference_steps=2.0), "num_inference_steps must be an integer >= 1, got 2.0"),
    (dict(height=96.0, width=96), "height must be an integer >= 1, got 96.0"),
    (dict(t_struct=-1), "t_struct must be an integer >= 0, got -1"),
    (dict(t_struct=5000), "t_struct must lie in [0, 1000], got 5000"),
    (dict(sampler="plms"), "sampler must be one of ddim, dpmpp_2m, euler, euler_ancestral, heun; got 'plms'"),
    (dict(spacing="even"), "spacing must be one of release, leading, trailing, linspace; got 'even'"),
    (dict(single_model="both"), "single_model must be one of structure, texture; got 'both'"),
    (dict(negative_prompt=0), "negative_prompt must be a string, got 0"),
    (dict(sampler_options={"eta": float("nan")}), "sampler_options['eta'] must be a finite number, got nan"),
    (dict(strength=0.0, init_image=np.zeros((16, 16, 3), np.uint8)), "strength must be a finite number in (0, 1]"),
    (dict(output_type="png"), "output_type must be one of pil, latent; got 'png'"),
    (dict(init_image=np.zeros((3, 3), np.uint8)), "init_image is an array of dtype uint8 and shape (3, 3); pass"),
    (dict(init_image=[[0, 1]]), "init_image is a list; pass a PIL image"),
    (dict(noise=np.full((1, 4, 12, 12), np.nan, np.float32)), "noise holds 576 NaN or infinite value(s)"),
    (dict(noise="noise.npy"), "noise must be a real array (B, C, h, w), got a str"),
])
def test_bad_requests_are_refused_before_any_model_is_built(request_, message):
    """A fresh pipeline: the check must come before any network is built (nothing becomes resident)."""
    pipe = PanGuDrawPipeline.from_config(SMALL)
    request_ = dict(dict(prompt=PROMPT, height=96, width=96, num_inference_steps=1), **request_)
    with pytest.raises(RequestError) as error:
        pipe(request_.pop("prompt"), **request_)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert pipe.components.resident == []


def test_a_file_that_is_no_image_is_refused(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x00\x01 not a png")
    pipe = PanGuDrawPipeline.from_config(SMALL)
    with pytest.raises(RequestError, match=r"init_image: '.*photo.png' is not an image"):
        pipe(PROMPT, height=96, width=96, init_image=str(path))
    assert pipe.components.resident == []


def test_noise_files_are_checked(tmp_path):
    text = tmp_path / "noise.npy"
    text.write_text("not numpy")
    with pytest.raises(RequestError, match="noise .*noise.npy' is not a numpy .npy array"):
        check_noise_file(str(text))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((4, 8, 8), np.inf, np.float32))
    with pytest.raises(RequestError, match="nan.npy' holds 256 NaN or infinite value"):
        check_noise_file(str(nan))
    with pytest.raises(RequestError, match="noise 'missing.npy' does not exist"):
        check_noise_file("missing.npy")
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 8, 8), np.float64))
    assert check_noise_file(str(good)).shape == (1, 4, 8, 8) and check_noise_file(str(good)).dtype == np.float32


def test_the_sampling_loop_stops_at_the_first_non_finite_step():
    schedule = NoiseSchedule(1000)

    def denoise(z, t):  # blows up at the second step
        return np.full_like(z, np.inf if t < 900 else 0.5)

    with pytest.raises(NonFiniteLatentsError, match=r"non-finite \(8 NaN or infinite values\) at step 2/3 "
                                                    r"\(timestep 666\)"):
        EulerSampler(schedule).sample(denoise, np.zeros((2, 4), np.float32), [999, 666, 333])


def test_overflowing_guidance_stops_with_the_settings_at_fault(pipe):
    """A guidance scale near float32's limit overflows the first step's latents: the run stops, naming the step
    and the settings, and makes no image."""
    with pytest.raises(NonFiniteLatentsError) as error:
        pipe(PROMPT, height=64, width=128, num_inference_steps=2, guidance_scale=3e38)
    assert str(error.value).startswith("the latents became non-finite (")
    assert ("at step 1/2 (timestep 999); no image was made from them; most likely at fault: guidance_scale 3e+38 "
            "(usual: 1-15), guidance_rescale 0, precision fp32") in str(error.value)
