"""End to end: minialg's frames against diffusers' WanImageToVideoPipeline on a tiny checkpoint it saved.

Without ALG the oracle is the diffusers pipeline itself. With ALG the oracle is tests/wan_reference.py: ALG.md
on the diffusers pipeline's own pieces, with an independent low-pass filter and the three-pass combination.
"""

import numpy as np
import pytest
import torch

import minialg
from alg_reference import ALG_DEFAULTS
from wan_reference import pil, reference_wan_alg

SIZE = dict(height=32, width=48, num_frames=9)
PROMPT = "a red ball bouncing on a wooden floor"
TOL = 5e-4  # max abs on [0, 1]


@pytest.fixture(scope="module")
def reference(tiny_wan):
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline.from_pretrained(tiny_wan, dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(tiny_wan):
    return minialg.load(tiny_wan, device="cpu", dtype=torch.float32)


ALG_BASE = ALG_DEFAULTS
ALG_CASES = {
    "down_up-latent-interval": dict(lp_resize_factor=0.4, lp_strength_schedule_type="interval",
                                    schedule_interval_end_time=0.5),
    "gaussian-latent-linear-scheduled-kernel": dict(lp_filter_type="gaussian_blur", lp_blur_sigma=10.0,
                                                    lp_blur_kernel_size=0.9, lp_strength_schedule_type="linear",
                                                    schedule_linear_end_weight=0.5, schedule_linear_end_time=1.0,
                                                    schedule_blur_kernel_size=True),
    "down_up-pixel-exponential": dict(lp_filter_in_latent=False, lp_strength_schedule_type="exponential",
                                      schedule_exp_decay_rate=-3.0),
    "gaussian-pixel-int-kernel": dict(lp_filter_type="gaussian_blur", lp_filter_in_latent=False, lp_blur_sigma=3.0,
                                      lp_blur_kernel_size=7, lp_strength_schedule_type="interval",
                                      schedule_interval_end_time=0.4),
}


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_frames_match_diffusers(reference, ours, test_image, guidance_scale):
    expected = reference(image=pil(test_image), prompt=PROMPT, guidance_scale=guidance_scale, num_inference_steps=4,
                         generator=torch.Generator("cpu").manual_seed(42), output_type="np", **SIZE).frames[0]
    frames = ours(test_image, PROMPT, guidance_scale=guidance_scale, num_inference_steps=4, seed=42, progress=False,
                  **SIZE)
    assert frames.dtype == torch.float32 and frames.shape == (9, 32, 48, 3) and frames.device.type == "cpu"
    assert np.abs(frames.numpy() - expected).max() < TOL
    assert frames.std() > 0.01  # a real video, not a constant


@pytest.mark.parametrize("case", ALG_CASES)
def test_alg_frames_match_the_alg_reference(reference, ours, test_image, case):
    alg = dict(ALG_BASE, **ALG_CASES[case])
    expected = reference_wan_alg(reference, test_image, PROMPT, alg, guidance_scale=5.0, steps=5, **SIZE)
    frames = ours(test_image, PROMPT, guidance_scale=5.0, num_inference_steps=5, seed=42, alg=alg, progress=False,
                  **SIZE)
    gap = np.abs(frames.numpy() - expected).max()
    assert gap < TOL
    plain = ours(test_image, PROMPT, guidance_scale=5.0, num_inference_steps=5, seed=42, progress=False, **SIZE)
    effect = (frames - plain).abs().max().item()
    assert effect > 1e-4 and effect > 20 * gap  # ALG changed the video far more than the gap to the reference


def test_same_seed_same_video_other_seed_other_video(ours, test_image):
    a = ours(test_image, PROMPT, num_inference_steps=2, seed=7, progress=False, **SIZE)
    b = ours(test_image, PROMPT, num_inference_steps=2, seed=7, progress=False, **SIZE)
    c = ours(test_image, PROMPT, num_inference_steps=2, seed=8, progress=False, **SIZE)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3


def test_alg_without_cfg_is_one_pass_on_the_filtered_condition(ours, test_image):
    """ALG.md section 5 (guidance 1, as step-distilled LoRAs run): a filter that does nothing leaves the video as
    without ALG; a real one changes it (tests/test_lora.py counts the passes and checks where c_lp goes)."""
    args = dict(guidance_scale=1.0, num_inference_steps=3, seed=42, progress=False, **SIZE)
    alg = dict(ALG_BASE, **ALG_CASES["down_up-latent-interval"])
    plain = ours(test_image, PROMPT, **args)
    assert torch.equal(ours(test_image, PROMPT, alg=dict(alg, lp_filter_type="none"), **args), plain)
    assert (ours(test_image, PROMPT, alg=alg, **args) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=30), "height must be a positive multiple of 16"),
    (dict(width=50), "width must be a positive multiple of 16"),
    (dict(num_inference_steps=0), "num_inference_steps must be at least 1"),
    (dict(num_frames=0), "num_frames must be a positive integer"),
    (dict(alg={"lp_resize_facor": 0.4}), "lp_resize_facor.*lp_resize_factor"),
])
def test_bad_requests_fail_before_any_compute(ours, test_image, kwargs, message):
    args = dict(SIZE, **kwargs)
    with pytest.raises(ValueError, match=message):
        ours(test_image, PROMPT, progress=False, **args)


def test_num_frames_not_4k_plus_1_is_rounded_with_a_warning(ours, test_image):
    with pytest.warns(UserWarning, match="rounding 11 to 9"):
        frames = ours(test_image, PROMPT, num_inference_steps=1, progress=False,
                      **dict(SIZE, num_frames=11))
    assert frames.shape[0] == 9
