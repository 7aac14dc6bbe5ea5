"""End to end: minialg's frames against diffusers' HunyuanVideoImageToVideoPipeline on tiny checkpoints it saved.

Without ALG the oracle is the diffusers pipeline itself (the embedded guidance, with and without true CFG; the
published token_replace kind and the 33-channel latent_concat one). With ALG the oracle is ALG.md section 8 built
from the diffusers pipeline's own pieces (prompt encoding, latents, scheduler, transformer, VAE) and the independent
filter and schedule of alg_reference.py. The diffusers oracle gets its Llama-3 tokenizer as PreTrainedTokenizerFast
(see ALG.md section 8) and the prompt template counted in the tiny tokenizer.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import minialg
from alg_reference import ALG_DEFAULTS, ref_low_pass, ref_strength
from hunyuan_text_reference import REAL, clip_tokenizer, llama_tokenizer, processor_config, tiny_clip_text, tiny_llava

SIZE = dict(height=32, width=48, num_frames=9)
PROMPT, NEGATIVE = "a red ball bouncing on a wooden floor", "blurry, static"
TOL = 5e-4  # max abs on [0, 1]
KINDS = {"token_replace": (16, True), "latent_concat": (33, False)}  # kind -> (in_channels, guidance_embeds)


def save_tiny(folder, kind):
    """A tiny HunyuanVideoImageToVideoPipeline saved by diffusers, in the published layout: transformers 5 writes
    the CLIP tokenizer as tokenizer.json only, the published folder has vocab.json + merges.txt (copied in)."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideoImageToVideoPipeline, HunyuanVideoTransformer3DModel)
    from transformers import CLIPImageProcessor

    def real(component):
        return {k: v for k, v in json.loads((REAL / component / "config.json").read_text()).items()
                if not k.startswith("_")}

    tokenizer = llama_tokenizer()
    in_channels, guidance = KINDS[kind]
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(**dict(
        real("transformer"), num_attention_heads=2, attention_head_dim=24, rope_axes_dim=[4, 10, 10], num_layers=2,
        num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, text_embed_dim=32, pooled_projection_dim=32,
        image_condition_type=kind, guidance_embeds=guidance, in_channels=in_channels))
    vae = AutoencoderKLHunyuanVideo(**dict(real("vae"), block_out_channels=[8, 16, 16, 16], norm_num_groups=4,
                                           layers_per_block=1))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # default inits leave biases and norms at 0 / 1
        for model in (transformer, vae):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        transformer.x_embedder.proj.weight.mul_(4)  # a denoiser that reacts visibly to its image condition
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        json.loads((REAL / "scheduler/scheduler_config.json").read_text()))
    processor = {k: v for k, v in processor_config(28).items() if k != "image_processor_type"}
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=tiny_llava(len(tokenizer)), tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=scheduler, text_encoder_2=tiny_clip_text(), tokenizer_2=clip_tokenizer(folder / "clip"),
        image_processor=CLIPImageProcessor(**processor))
    pipe.save_pretrained(folder / "ckpt")
    (folder / "ckpt/tokenizer_2/tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / "clip" / name, folder / "ckpt/tokenizer_2" / name)
    index = json.loads((folder / "ckpt/model_index.json").read_text())
    (folder / "ckpt/model_index.json").write_text(json.dumps(dict(index, tokenizer=["transformers",
                                                                                    "LlamaTokenizerFast"])))
    return folder / "ckpt"


def reference_pipeline(folder, dtype=torch.float32, **components):
    from diffusers import HunyuanVideoImageToVideoPipeline
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")  # never as LlamaTokenizer(Fast)
    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(
        folder, tokenizer=tokenizer, tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        dtype=dtype, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def template_of(pipe) -> dict:
    """The prompt template minialg counted in the tiny tokenizer, for diffusers' prompt_template argument."""
    return {k: pipe.template[k] for k in ("template", "crop_start", "image_emb_start", "image_emb_end",
                                          "image_emb_len")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (diffusers pipeline, minialg pipeline) on the same saved folder."""
    out = {}
    for kind in KINDS:
        folder = save_tiny(tmp_path_factory.mktemp(f"tiny-hunyuan-{kind}"), kind)
        out[kind] = reference_pipeline(folder), minialg.load(folder, device="cpu", dtype=torch.float32)
    return out


def pil(image):
    from PIL import Image

    return Image.fromarray(image)


def diffusers_frames(ref, ours, image, true_cfg_scale, steps=3, guidance_scale=6.0, **size):
    return ref(image=pil(image), prompt=PROMPT, negative_prompt=NEGATIVE if true_cfg_scale > 1 else None,
               true_cfg_scale=true_cfg_scale, guidance_scale=guidance_scale, num_inference_steps=steps,
               generator=torch.Generator("cpu").manual_seed(42), output_type="np", prompt_template=template_of(ours),
               **(size or SIZE)).frames[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.5], ids=["embedded-guidance", "true-cfg"])
def test_frames_match_diffusers(tiny, test_image, kind, true_cfg_scale):
    ref, ours = tiny[kind]
    expected = diffusers_frames(ref, ours, test_image, true_cfg_scale)
    frames = ours(test_image, PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=true_cfg_scale, guidance_scale=6.0,
                  num_inference_steps=3, seed=42, progress=False, **SIZE)
    count = 9 if kind == "token_replace" else 5  # latent_concat drops the image's 4 frames, as diffusers
    assert frames.dtype == torch.float32 and frames.shape == (count, 32, 48, 3) and frames.device.type == "cpu"
    gap = np.abs(frames.numpy() - expected).max()
    print(f"{kind} true_cfg_scale={true_cfg_scale}: max abs {gap:.1e}")
    assert gap < TOL and frames.std() > 0.01
    if true_cfg_scale > 1:  # the negative passes changed the video far more than the gap
        plain = ours(test_image, PROMPT, guidance_scale=6.0, num_inference_steps=3, seed=42, progress=False, **SIZE)
        assert (frames - plain).abs().max() > 20 * max(gap, 1e-6)


def test_guidance_scale_is_embedded(tiny, test_image):
    """The distilled guidance embedding reacts to guidance_scale, as diffusers' (bf16 rounding aside)."""
    ref, ours = tiny["token_replace"]
    expected = diffusers_frames(ref, ours, test_image, 1.0, guidance_scale=2.5)
    frames = ours(test_image, PROMPT, guidance_scale=2.5, num_inference_steps=3, seed=42, progress=False, **SIZE)
    assert np.abs(frames.numpy() - expected).max() < TOL
    default = ours(test_image, PROMPT, num_inference_steps=3, seed=42, progress=False, **SIZE)  # 6.0
    assert (frames - default).abs().max() > 1e-3


@torch.no_grad()
def reference_alg(ref, ours, image, alg, *, true_cfg_scale, steps=5, guidance_scale=6.0):
    """ALG.md section 8 (token_replace) with the diffusers pipeline's pieces: c (and c_lp) replace latent frame 0
    of the input; with true CFG the Wan rule, three passes [D(c, neg), D(c_lp, prompt), D(c_lp, neg)] while
    s != 0 and two on c otherwise; without it one pass on c_lp at every step (pixel mode: a posterior sample of the
    filtered image every step). alg None: no ALG (must give diffusers' own video)."""
    h, w, f = SIZE["height"], SIZE["width"], SIZE["num_frames"]
    generator = torch.Generator("cpu").manual_seed(42)
    template = template_of(ours)
    embeds, pooled, mask = ref.encode_prompt(image=pil(image), prompt=PROMPT, prompt_template=template,
                                             device="cpu", image_embed_interleave=4)
    texts = {"prompt": (embeds, mask, pooled)}
    if true_cfg_scale > 1:
        black = pil(np.zeros((h, w, 3), dtype=np.uint8))
        neg, neg_pooled, neg_mask = ref.encode_prompt(image=black, prompt=NEGATIVE, prompt_template=template,
                                                      device="cpu")  # diffusers' default interleave (2)
        texts["negative"] = (neg, neg_mask, neg_pooled)
    frame = ref.video_processor.preprocess(pil(image), h, w).float()
    latents, image_latents = ref.prepare_latents(frame, 1, 16, h, w, f, torch.float32, "cpu", generator, None,
                                                 "token_replace")
    ref.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    guidance = torch.tensor([guidance_scale]) * 1000.0
    scale = ref.vae.config.scaling_factor

    def denoise(cond, which, t):
        e, m, p = texts[which]
        x = torch.cat([cond, latents[:, :, 1:]], dim=2)
        return ref.transformer(x, t.expand(1), e, m, p, guidance, return_dict=False)[0]

    for i, t in enumerate(ref.scheduler.timesteps):
        s = ref_strength(alg, i, steps) if alg else 0.0
        if alg and (true_cfg_scale <= 1 or s != 0):
            if alg["lp_filter_in_latent"]:
                c_lp = ref_low_pass(image_latents, alg, s)
            else:
                lp = ref_low_pass(frame, alg, s)
                c_lp = ref.vae.encode(lp[:, :, None]).latent_dist.sample(generator).float() * scale
        if true_cfg_scale > 1 and alg and s != 0:
            v = denoise(image_latents, "negative", t) + true_cfg_scale * (
                denoise(c_lp, "prompt", t) - denoise(c_lp, "negative", t))
        elif true_cfg_scale > 1:
            uncond = denoise(image_latents, "negative", t)
            v = uncond + true_cfg_scale * (denoise(image_latents, "prompt", t) - uncond)
        else:
            v = denoise(c_lp if alg else image_latents, "prompt", t)
        latents = ref.scheduler.step(v[:, :, 1:], t, latents[:, :, 1:], return_dict=False)[0]
        latents = torch.cat([image_latents, latents], dim=2)
    video = ref.vae.decode(latents / scale, return_dict=False)[0]
    return ref.video_processor.postprocess_video(video, output_type="np")[0]


ALG_CASES = {  # name -> (true_cfg_scale, ALG settings over ALG_DEFAULTS)
    "latent-down_up-interval": (1.0, dict(lp_resize_factor=0.625, lp_strength_schedule_type="interval",
                                          schedule_interval_end_time=0.5)),
    "pixel-gaussian-linear": (1.0, dict(lp_filter_type="gaussian_blur", lp_filter_in_latent=False,
                                        lp_blur_sigma=3.0, lp_blur_kernel_size=0.5,
                                        lp_strength_schedule_type="linear", schedule_linear_end_time=0.8)),
    "true-cfg-latent-exponential": (3.5, dict(lp_resize_factor=0.4, lp_strength_schedule_type="exponential",
                                              schedule_exp_decay_rate=2.0)),
    "true-cfg-pixel-down_up-interval": (3.5, dict(lp_filter_in_latent=False, lp_resize_factor=0.5,
                                                  lp_strength_schedule_type="interval",
                                                  schedule_interval_end_time=0.5)),
}


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.5], ids=["embedded-guidance", "true-cfg"])
def test_the_alg_reference_without_alg_is_diffusers(tiny, test_image, true_cfg_scale):
    ref, ours = tiny["token_replace"]
    expected = diffusers_frames(ref, ours, test_image, true_cfg_scale, steps=5)
    assert np.abs(reference_alg(ref, ours, test_image, None, true_cfg_scale=true_cfg_scale) - expected).max() < 1e-5


@pytest.mark.parametrize("case", ALG_CASES)
def test_alg_frames_match_the_alg_reference(tiny, test_image, case):
    ref, ours = tiny["token_replace"]
    true_cfg_scale, settings = ALG_CASES[case]
    alg = dict(ALG_DEFAULTS, **settings)
    expected = reference_alg(ref, ours, test_image, alg, true_cfg_scale=true_cfg_scale)
    args = dict(negative_prompt=NEGATIVE, true_cfg_scale=true_cfg_scale, num_inference_steps=5, seed=42,
                progress=False, **SIZE)
    frames = ours(test_image, PROMPT, alg=alg, **args)
    gap = np.abs(frames.numpy() - expected).max()
    plain = ours(test_image, PROMPT, **args)
    effect = (frames - plain).abs().max().item()
    print(f"{case}: max abs {gap:.1e}, ALG moved the video by {effect:.1e}")
    assert gap < TOL
    assert effect > 5e-4 and effect > 20 * max(gap, 1e-6)  # ALG changed the video far more than the gap


def test_alg_needs_no_cfg_here_but_the_filter_strength_counts(tiny, test_image):
    """Without true CFG, a filter doing nothing leaves diffusers' video (latent space), and pixel space draws a
    posterior sample at every step, so even a no-op filter moves the video."""
    ref, ours = tiny["token_replace"]
    args = dict(num_inference_steps=3, seed=42, progress=False, **SIZE)
    plain = ours(test_image, PROMPT, **args)
    noop = dict(ALG_DEFAULTS, lp_resize_factor=1.0)
    assert torch.equal(ours(test_image, PROMPT, alg=noop, **args), plain)
    assert (ours(test_image, PROMPT, alg=dict(noop, lp_filter_in_latent=False), **args) - plain).abs().max() > 1e-4


@pytest.mark.parametrize("in_latent", [True, False], ids=["latent", "pixel"])
def test_alg_on_the_latent_concat_kind(tiny, test_image, in_latent):
    """The 33-channel kind: c_lp = [LP(z), zeros; mask] (or the posterior sample of the filtered image) beside x;
    with the filter doing nothing in latent space, diffusers' video."""
    ref, ours = tiny["latent_concat"]
    args = dict(num_inference_steps=3, seed=42, progress=False, **SIZE)
    alg = dict(ALG_DEFAULTS, lp_filter_in_latent=in_latent, lp_resize_factor=0.5,
               lp_strength_schedule_type="interval", schedule_interval_end_time=0.5)
    plain = ours(test_image, PROMPT, **args)
    assert np.abs(plain.numpy() - diffusers_frames(ref, ours, test_image, 1.0)).max() < TOL
    assert torch.equal(ours(test_image, PROMPT, alg=dict(alg, lp_resize_factor=1.0), **args), plain) == in_latent
    frames = ours(test_image, PROMPT, alg=alg, **args)
    assert frames.shape == plain.shape and (frames - plain).abs().max() > 1e-4


def test_same_seed_same_video(tiny, test_image):
    _, ours = tiny["token_replace"]
    args = dict(num_inference_steps=2, progress=False, **SIZE)
    a, b, c = (ours(test_image, PROMPT, seed=seed, **args) for seed in (7, 7, 8))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(true_cfg_scale=-1.0), "true_cfg_scale must be a number >= 0"),
    (dict(true_cfg_scale="3"), "true_cfg_scale must be a number"),
    (dict(i2v_stable=False), "i2v_stable must be true"),
    (dict(guidance_scale_2=3.0), "unexpected keyword argument 'guidance_scale_2'"),
    (dict(height=40), "height must be a positive multiple of 16"),
    (dict(use_dynamic_cfg=True), "use_dynamic_cfg is a CogVideoX option"),
    (dict(solver="unipc"), "only 'euler' and 'lcm' follow"),
])
def test_bad_requests_fail_before_any_compute(tiny, test_image, kwargs, message):
    _, ours = tiny["token_replace"]
    with pytest.raises((ValueError, TypeError), match=message):
        ours(test_image, PROMPT, progress=False, **dict(SIZE, **kwargs))
