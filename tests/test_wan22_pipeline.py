"""Wan 2.2 end to end: I2V-A14B (two experts) and TI2V-5B (image in latent frame 0), on tiny checkpoints diffusers
saved in the published layouts. Without ALG the oracle is diffusers' WanImageToVideoPipeline (TI2V's WanPipeline
folder loaded as image-to-video, as diffusers users do); with ALG it is tests/wan_reference.py (ALG.md section 7).
"""

import numpy as np
import pytest
import torch

import minialg
from alg_reference import ALG_DEFAULTS
from conftest import save_tiny_wan
from wan_reference import pil, reference_wan_alg

PROMPT = "a red ball bouncing on a wooden floor"
TOL = 5e-4  # max abs on [0, 1]
SIZES = {"wan22": dict(height=32, width=48, num_frames=9), "wan22_ti2v": dict(height=64, width=96, num_frames=9)}
# 4 steps at the A14B scheduler's shift 3.0: timesteps 999, 900, 750, 500; the boundary is 900 (t >= 900: high)
STEPS = 4
ALG_CASES = {
    "latent-interval": dict(lp_resize_factor=0.4, lp_strength_schedule_type="interval", schedule_interval_end_time=0.5),
    "pixel-gaussian-linear": dict(lp_filter_type="gaussian_blur", lp_filter_in_latent=False, lp_blur_sigma=3.0,
                                  lp_blur_kernel_size=5, lp_strength_schedule_type="linear",
                                  schedule_linear_end_time=1.0),
}


@pytest.fixture(scope="module", params=["wan22", "wan22_ti2v"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {}


@pytest.fixture(scope="module")
def pair(family, folders, tmp_path_factory):
    """(diffusers pipeline, minialg pipeline) on the same diffusers-saved checkpoint."""
    from diffusers import WanImageToVideoPipeline

    if family not in folders:
        folders[family] = save_tiny_wan(tmp_path_factory.mktemp(family), family)
    folder = folders[family]
    reference = WanImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    return reference, minialg.load(folder, device="cpu", dtype=torch.float32)


def scales(family, cfg=True):
    if not cfg:
        return {"guidance_scale": 1.0}
    return {"guidance_scale": 5.0, "guidance_scale_2": 3.0} if family == "wan22" else {"guidance_scale": 5.0}


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
def test_frames_match_diffusers(pair, family, test_image, cfg):
    reference, ours = pair
    expected = reference(image=pil(test_image), prompt=PROMPT, num_inference_steps=STEPS, output_type="np",
                         generator=torch.Generator("cpu").manual_seed(42), **scales(family, cfg),
                         **SIZES[family]).frames[0]
    frames = ours(test_image, PROMPT, num_inference_steps=STEPS, seed=42, progress=False, **scales(family, cfg),
                  **SIZES[family])
    assert frames.shape == (9, SIZES[family]["height"], SIZES[family]["width"], 3)
    assert np.abs(frames.numpy() - expected).max() < TOL
    assert frames.std() > 0.01


@pytest.mark.parametrize("case", ALG_CASES)
def test_alg_frames_match_the_alg_reference(pair, family, test_image, case):
    reference, ours = pair
    alg = dict(ALG_DEFAULTS, **ALG_CASES[case])
    expected = reference_wan_alg(reference, test_image, PROMPT, alg, steps=STEPS, **scales(family),
                                 **SIZES[family])
    frames = ours(test_image, PROMPT, num_inference_steps=STEPS, alg=alg, progress=False, **scales(family),
                  **SIZES[family])
    gap = np.abs(frames.numpy() - expected).max()
    assert gap < TOL
    plain = ours(test_image, PROMPT, num_inference_steps=STEPS, progress=False, **scales(family), **SIZES[family])
    effect = (frames - plain).abs().max().item()
    assert effect > 1e-4 and effect > 20 * gap  # ALG changed the video far more than the gap to the reference


def test_alg_with_a_filter_that_does_nothing_is_diffusers_own_result(pair, family, test_image):
    """ALG.md section 7: with the filter doing nothing in latent space the rules give diffusers' output."""
    reference, ours = pair
    expected = reference(image=pil(test_image), prompt=PROMPT, num_inference_steps=STEPS, output_type="np",
                         generator=torch.Generator("cpu").manual_seed(42), **scales(family),
                         **SIZES[family]).frames[0]
    alg = dict(ALG_DEFAULTS, lp_filter_type="none")
    frames = ours(test_image, PROMPT, num_inference_steps=STEPS, alg=alg, progress=False, **scales(family),
                  **SIZES[family])
    assert np.abs(frames.numpy() - expected).max() < TOL


def test_the_experts_switch_at_the_boundary_with_their_own_scales(pair, family, test_image):
    if family != "wan22":
        pytest.skip("one transformer")
    _, ours = pair
    calls = []
    hooks = [model.register_forward_hook(lambda m, args, out, name=name: calls.append((name, args[1][0].item())))
             for name, model in (("high", ours.transformer), ("low", ours.transformer_2))]
    try:
        a = ours(test_image, PROMPT, num_inference_steps=STEPS, progress=False, **scales(family), **SIZES[family])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [("high", 999), ("high", 900), ("low", 750), ("low", 500)]  # t >= 900: high noise
    b = ours(test_image, PROMPT, num_inference_steps=STEPS, progress=False, guidance_scale=5.0, **SIZES[family])
    assert (a - b).abs().max() > 1e-3  # guidance_scale_2 defaults to guidance_scale, and 3.0 differs from it


def test_family_keywords_and_sizes_are_checked_before_compute(pair, family, test_image):
    _, ours = pair
    if family == "wan22_ti2v":
        with pytest.raises(ValueError, match="guidance_scale_2 is for checkpoints with two experts"):
            ours(test_image, PROMPT, guidance_scale_2=3.0, progress=False, **SIZES[family])
        with pytest.raises(ValueError, match="height must be a positive multiple of 32"):
            ours(test_image, PROMPT, progress=False, **dict(SIZES[family], height=48))
    else:
        with pytest.raises(ValueError, match="guidance_scale_2 must be a number"):
            ours(test_image, PROMPT, guidance_scale_2="high", progress=False, **SIZES[family])
    with pytest.raises(TypeError, match="unexpected keyword argument 'true_cfg_scale'"):
        ours(test_image, PROMPT, true_cfg_scale=2.0, progress=False, **SIZES[family])


def test_only_the_expert_in_use_sits_on_the_device(tmp_path, test_image, monkeypatch):
    """The idle expert waits in CPU memory: one swap at the boundary, one back at the next run's first step, none
    when the blocks stream (both experts' blocks live in CPU memory then). Recorded from each expert's .to(); the
    run's device is named "cpu:0" so that a move to it reads apart from a move to "cpu"."""
    from minialg.demo import write_tiny

    folder = write_tiny(tmp_path / "a14b", "wan22")
    for streamed in (False, True):
        ours = minialg.load(folder, device="cpu", dtype=torch.float32, stream_blocks=streamed)
        ours.device = torch.device("cpu", 0)
        moves = []
        for name, model in (("high", ours.transformer), ("low", ours.transformer_2)):
            monkeypatch.setattr(model, "to", lambda device, name=name, model=model: moves.append(
                (name, str(device))) or model, raising=False)  # on the CPU a move changes nothing: record it
        for _ in range(2):
            ours(test_image, PROMPT, num_inference_steps=STEPS, progress=False, **SIZES["wan22"])
        if streamed:
            assert moves == []
        else:
            assert moves == [("high", "cpu"), ("low", "cpu:0"),  # at the boundary of the first run
                             ("low", "cpu"), ("high", "cpu:0"),  # the next run starts with the high-noise expert
                             ("high", "cpu"), ("low", "cpu:0")]  # and swaps at its boundary again
