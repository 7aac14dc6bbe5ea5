"""bf16, as the authors run the models (Wan: denoiser and text encoder bf16, VAE and CLIP float32; CogVideoX:
everything bf16; HunyuanVideo-I2V: denoiser bf16, VAE and both text encoders float16): minialg's video equals
diffusers' on the CPU, so the mixed-dtype plumbing is the reference's."""

import numpy as np
import pytest
import torch

import minialg
from minialg.demo import demo_image, write_tiny

ARGS = dict(num_frames=9, height=64, width=96, num_inference_steps=3)


def reference(folder, family, pipe):
    from diffusers import AutoencoderKLWan, CogVideoXImageToVideoPipeline, WanImageToVideoPipeline
    from transformers import CLIPVisionModel

    if family == "hunyuan_video":  # the authors' run.py: transformer bf16, the rest float16
        from diffusers import HunyuanVideoTransformer3DModel
        from test_hunyuan_pipeline import reference_pipeline, template_of

        transformer = HunyuanVideoTransformer3DModel.from_pretrained(folder / "transformer", dtype=torch.bfloat16)
        ref = reference_pipeline(folder, torch.float16, transformer=transformer)
        assert ref.vae.dtype == ref.text_encoder.dtype == ref.text_encoder_2.dtype == torch.float16
        return ref, {"prompt_template": template_of(pipe), "guidance_scale": 6.0}
    if family == "cogvideox":
        return CogVideoXImageToVideoPipeline.from_pretrained(folder, dtype=torch.bfloat16), {"max_sequence_length": 16}
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", dtype=torch.float32)  # the authors' run.py does this
    if family != "wan":  # Wan 2.2: no CLIP; A14B with its two experts at two scales (the switch is at step 1 of 3)
        extra = {"guidance_scale": 5.0, "guidance_scale_2": 3.0} if family == "wan22" else {}
        return WanImageToVideoPipeline.from_pretrained(folder, vae=vae, dtype=torch.bfloat16), extra
    clip = CLIPVisionModel.from_pretrained(folder / "image_encoder", dtype=torch.float32)
    return WanImageToVideoPipeline.from_pretrained(folder, vae=vae, image_encoder=clip, dtype=torch.bfloat16), {}


@pytest.mark.parametrize("family", ["wan", "wan22", "wan22_ti2v", "cogvideox", "hunyuan_video"])
def test_bf16_video_equals_diffusers_bf16_video(tmp_path, family):
    from PIL import Image

    folder = write_tiny(tmp_path / family, family)
    pipe = minialg.load(folder, device="cpu", dtype="bfloat16")
    ref, extra = reference(folder, family, pipe)
    ref.set_progress_bar_config(disable=True)
    expected = ref(image=Image.fromarray(demo_image().numpy()), prompt="a red ball", output_type="np",
                   generator=torch.Generator().manual_seed(42), **ARGS, **extra).frames[0]
    ours = {k: v for k, v in extra.items() if k not in ("max_sequence_length", "prompt_template")}
    frames = pipe(demo_image(), "a red ball", seed=42, progress=False, **ARGS, **ours)
    print(f"{family} bf16: max abs {np.abs(frames.numpy() - expected).max():.1e}")
    assert np.abs(frames.numpy() - expected).max() < 5e-4
    full = minialg.load(folder, device="cpu", dtype=torch.float32)(demo_image(), "a red ball", progress=False, **ARGS,
                                                                   **ours)
    assert (frames - full).abs().max() > 1e-3  # the run really was in bf16


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video"])
def test_bf16_alg_in_pixel_space_runs(tmp_path, family):
    pipe = minialg.load(write_tiny(tmp_path / family, family), device="cpu", dtype="bfloat16")
    alg = {"use_low_pass_guidance": True, "lp_filter_type": "gaussian_blur", "lp_filter_in_latent": False,
           "lp_strength_schedule_type": "linear"}
    frames = pipe(demo_image(), "a red ball", alg=alg, progress=False, **ARGS)
    assert frames.dtype == torch.float32 and torch.isfinite(frames).all() and frames.std() > 0.01
