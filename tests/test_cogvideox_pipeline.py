"""End to end: minialg's frames against diffusers' CogVideoXImageToVideoPipeline on tiny checkpoints it saved.

Without ALG the oracle is the diffusers pipeline itself (DDIM and DPM, with and without dynamic CFG, 1.0 and 1.5
layouts). With ALG the oracle is built from ALG.md with the diffusers pipeline's own pieces and the independent
filter in alg_reference.py, following CogVideoX's rules (section 5): two-pass steps see the filtered condition,
the exponential tail below strength 0.1 falls back to two passes, pixel mode draws a posterior sample every step.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch

import minialg
from alg_reference import ALG_DEFAULTS, ref_low_pass, ref_strength

SIZE = dict(height=32, width=48, num_frames=9)
PROMPT = "a red ball bouncing on a wooden floor"
TOL = 5e-4


def pil(image):
    from PIL import Image

    return Image.fromarray(image)


def with_scheduler(folder, tmp_path, name):
    """A copy of the checkpoint whose scheduler is `name` (the same config values, as diffusers allows)."""
    if name == "CogVideoXDDIMScheduler":
        return folder
    copy = tmp_path / "dpm"
    shutil.copytree(folder, copy)
    for file, key in ((copy / "scheduler/scheduler_config.json", "_class_name"), (copy / "model_index.json", None)):
        data = json.loads(file.read_text())
        if key:
            data[key] = name
        else:
            data["scheduler"] = ["diffusers", name]
        file.write_text(json.dumps(data))
    return copy


def reference_pipeline(folder):
    from diffusers import CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"], ids=["ddim", "dpm"])
@pytest.mark.parametrize("guidance, dynamic", [(6.0, False), (6.0, True), (1.0, False)],
                         ids=["cfg", "dynamic-cfg", "no-cfg"])
def test_frames_match_diffusers(tiny_cogvideox, tmp_path, test_image, scheduler, guidance, dynamic):
    folder = with_scheduler(tiny_cogvideox, tmp_path, scheduler)
    expected = reference_pipeline(folder)(
        image=pil(test_image), prompt=PROMPT, guidance_scale=guidance, use_dynamic_cfg=dynamic,
        num_inference_steps=4, max_sequence_length=16, generator=torch.Generator().manual_seed(42),
        output_type="np", **SIZE).frames[0]
    frames = minialg.load(folder, device="cpu", dtype=torch.float32)(
        test_image, PROMPT, guidance_scale=guidance, use_dynamic_cfg=dynamic, num_inference_steps=4, seed=42,
        progress=False, **SIZE)
    assert frames.shape == expected.shape == (9, 32, 48, 3)
    assert np.abs(frames.numpy() - expected).max() < TOL and expected.std() > 0.01


@pytest.mark.parametrize("num_frames", [9, 5])
def test_cogvideox15_layout_matches_diffusers(tiny_cogvideox15, test_image, num_frames):
    size = dict(SIZE, num_frames=num_frames)  # 3 latent frames are padded to 4 (temporal patches of 2); 2 are not
    expected = reference_pipeline(tiny_cogvideox15)(
        image=pil(test_image), prompt=PROMPT, num_inference_steps=3, max_sequence_length=16,
        generator=torch.Generator().manual_seed(42), output_type="np", **size).frames[0]
    frames = minialg.load(tiny_cogvideox15, device="cpu", dtype=torch.float32)(
        test_image, PROMPT, num_inference_steps=3, seed=42, progress=False, **size)
    assert frames.shape == expected.shape
    assert np.abs(frames.numpy() - expected).max() < TOL


def test_tiled_decoding_matches_diffusers_tiled_decoding(tiny_cogvideox, test_image):
    reference = reference_pipeline(tiny_cogvideox)
    vae, decode = reference.vae, reference.vae.decode
    vae.enable_tiling()  # tiles of half the checkpoint's sample size: 16 x 24 pixels here

    def tiled_decode_only(*args, **kwargs):  # diffusers would tile the one-frame encode too
        vae.use_tiling = True
        try:
            return decode(*args, **kwargs)
        finally:
            vae.use_tiling = False

    vae.use_tiling, vae.decode = False, tiled_decode_only
    expected = reference(image=pil(test_image), prompt=PROMPT, num_inference_steps=2, max_sequence_length=16,
                         generator=torch.Generator().manual_seed(42), output_type="np", **SIZE).frames[0]
    pipe = minialg.load(tiny_cogvideox, device="cpu", dtype=torch.float32)
    untiled = pipe(test_image, PROMPT, num_inference_steps=2, progress=False, **SIZE)
    pipe.tiled_decode = True
    frames = pipe(test_image, PROMPT, num_inference_steps=2, progress=False, **SIZE)
    assert frames.shape == expected.shape and np.abs(frames.numpy() - expected).max() < TOL
    # the tiles were really used: at this tiny size they even overhang, as diffusers' do (48 -> 56 columns)
    assert frames.shape != untiled.shape or (frames - untiled).abs().max() > 1e-3


@torch.no_grad()
def reference_alg(pipe, image, alg, guidance, steps):
    """ALG.md sections 1-5 for CogVideoX, with the diffusers pipeline's pieces."""
    from diffusers import CogVideoXDPMScheduler

    h, w, f = SIZE["height"], SIZE["width"], SIZE["num_frames"]
    generator = torch.Generator().manual_seed(42)
    prompt_embeds, negative_embeds = pipe.encode_prompt(PROMPT, "", True, max_sequence_length=16, device="cpu")
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps
    frame = pipe.video_processor.preprocess(pil(image), height=h, width=w).float()
    latents, image_latents = pipe.prepare_latents(frame, 1, 16, f, h, w, torch.float32, "cpu", generator)
    rope = pipe._prepare_rotary_positional_embeddings(h, w, latents.size(1), "cpu")
    scale = pipe.vae_scaling_factor_image

    def denoise(c, text, t):
        x = torch.cat([latents, c], dim=2)
        return pipe.transformer(x, text, t.expand(1), image_rotary_emb=rope, return_dict=False)[0].float()

    old = None
    for i, t in enumerate(timesteps):
        s = ref_strength(alg, i, steps)
        if alg["lp_filter_in_latent"]:
            c_lp = ref_low_pass(image_latents, alg, s)
        else:
            z = pipe.vae.encode(ref_low_pass(frame, alg, s)[:, :, None]).latent_dist.sample(generator)
            z = scale * z.permute(0, 2, 1, 3, 4)
            c_lp = torch.cat([z, z.new_zeros(1, latents.shape[1] - 1, *z.shape[2:])], dim=1)
        three = s != 0 and not (alg["lp_strength_schedule_type"] == "exponential" and s < 0.1)
        if three:
            v = denoise(image_latents, negative_embeds, t) + guidance * (
                denoise(c_lp, prompt_embeds, t) - denoise(c_lp, negative_embeds, t))
        else:
            uncond = denoise(c_lp, negative_embeds, t)
            v = uncond + guidance * (denoise(c_lp, prompt_embeds, t) - uncond)
        if isinstance(pipe.scheduler, CogVideoXDPMScheduler):
            latents, old = pipe.scheduler.step(v, old, t, timesteps[i - 1] if i > 0 else None, latents,
                                               generator=generator, return_dict=False)
        else:
            latents = pipe.scheduler.step(v, t, latents, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(pipe.decode_latents(latents), output_type="np")[0]


ALG_CASES = {
    "down_up-latent-interval": dict(lp_strength_schedule_type="interval", schedule_interval_end_time=0.4),
    "gaussian-latent-linear": dict(lp_filter_type="gaussian_blur", lp_blur_sigma=10.0, lp_blur_kernel_size=3,
                                   lp_strength_schedule_type="linear", schedule_linear_end_time=1.0),
    "down_up-latent-exponential": dict(lp_strength_schedule_type="exponential", schedule_exp_decay_rate=4.0),
    "down_up-pixel-none": dict(lp_filter_in_latent=False, lp_resize_factor=0.4),
    "gaussian-pixel-interval": dict(lp_filter_type="gaussian_blur", lp_filter_in_latent=False, lp_blur_sigma=3.0,
                                    lp_blur_kernel_size=0.3, lp_strength_schedule_type="interval",
                                    schedule_interval_end_time=0.5),
}


# every case with DDIM; with DPM a latent and a pixel case (the pixel one shares the generator with the solver)
RUNS = [("CogVideoXDDIMScheduler", case) for case in ALG_CASES] + [
    ("CogVideoXDPMScheduler", "down_up-latent-exponential"), ("CogVideoXDPMScheduler", "down_up-pixel-none")]


@pytest.mark.parametrize("scheduler, case", RUNS, ids=[f"{s[9:-9].lower()}-{c}" for s, c in RUNS])
def test_alg_frames_match_the_alg_reference(tiny_cogvideox, tmp_path, test_image, scheduler, case):
    folder = with_scheduler(tiny_cogvideox, tmp_path, scheduler)
    alg = dict(ALG_DEFAULTS, **ALG_CASES[case])
    steps = 5
    if alg["lp_strength_schedule_type"] == "exponential":  # both sides of the 0.1 cut-off occur
        assert [ref_strength(alg, i, steps) < 0.1 for i in range(steps)] == [False, False, False, True, True]
    expected = reference_alg(reference_pipeline(folder), test_image, alg, 6.0, steps)
    pipe = minialg.load(folder, device="cpu", dtype=torch.float32)
    frames = pipe(test_image, PROMPT, num_inference_steps=steps, seed=42, alg=alg, progress=False, **SIZE)
    gap = np.abs(frames.numpy() - expected).max()
    assert gap < TOL
    plain = pipe(test_image, PROMPT, num_inference_steps=steps, seed=42, progress=False, **SIZE)
    effect = (frames - plain).abs().max().item()
    assert effect > 1e-4 and effect > 20 * gap


def test_dynamic_cfg_is_ignored_while_alg_is_on(tiny_cogvideox, test_image):
    pipe = minialg.load(tiny_cogvideox, device="cpu", dtype=torch.float32)
    alg = dict(ALG_DEFAULTS, **ALG_CASES["down_up-latent-interval"])
    args = dict(num_inference_steps=3, seed=42, alg=alg, progress=False, **SIZE)
    assert torch.equal(pipe(test_image, PROMPT, use_dynamic_cfg=True, **args), pipe(test_image, PROMPT, **args))


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=48), "learned positional embedding fixes the size to 32x48, got 48x48"),
    (dict(max_sequence_length=32), r"max_sequence_length must be an integer in \[1, 16\], got 32"),
    (dict(max_sequence_length=8), "max_sequence_length must be 16 for this checkpoint"),
    (dict(guidance_scale=1.0, alg=dict(use_low_pass_guidance=True)), "ALG needs classifier-free guidance"),
])
def test_bad_requests_fail_before_any_compute(tiny_cogvideox, test_image, kwargs, message):
    pipe = minialg.load(tiny_cogvideox, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        pipe(test_image, PROMPT, progress=False, **dict(SIZE, **kwargs))


def test_defaults_come_from_the_checkpoint(tiny_cogvideox, test_image):
    pipe = minialg.load(tiny_cogvideox, device="cpu", dtype=torch.float32)
    frames = pipe(test_image, PROMPT, num_inference_steps=1, progress=False)  # 32 x 48 x 9 frames, text 16
    assert frames.shape == (9, 32, 48, 3)
    assert math.isclose(pipe.defaults["guidance_scale"], 6.0)
