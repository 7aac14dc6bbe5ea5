"""The ALG oracle for every Wan variant, written from ALG.md (sections 1-5 and 7) on diffusers'
WanImageToVideoPipeline's own pieces: prompt and image encoding, latents and condition, scheduler, transformer(s),
VAE. Only the filter and the schedule (tests/alg_reference.py) and the guidance combination are written here.

Wan 2.1:      input [x ; c], one transformer, CLIP image tokens.
Wan 2.2 A14B: the same without CLIP; `transformer` while t >= boundary (scale w), then `transformer_2` (scale w2).
Wan 2.2 TI2V: input (1 - m) c + m x (m = 0 on latent frame 0), the timestep per token masked the same way;
              after the loop frame 0 is c again.
"""

import torch

from alg_reference import ref_low_pass, ref_strength


def pil(image):
    from PIL import Image

    return Image.fromarray(image)


@torch.no_grad()
def reference_wan_alg(pipe, image, prompt, alg, *, height, width, num_frames, guidance_scale, steps,
                      guidance_scale_2=None, seed=42):
    h, w, f = height, width, num_frames
    generator = torch.Generator("cpu").manual_seed(seed)
    prompt_embeds, negative_embeds = pipe.encode_prompt(prompt, "", True, max_sequence_length=512, device="cpu")
    image_embeds = pipe.encode_image(pil(image), "cpu") if pipe.image_encoder is not None else None
    frame = pipe.video_processor.preprocess(pil(image), height=h, width=w).float()
    expand = pipe.config.expand_timesteps
    out = pipe.prepare_latents(frame, 1, pipe.vae.config.z_dim, h, w, f, torch.float32, "cpu", generator)
    latents, condition = out[:2]
    mask = out[2] if expand else None
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    pipe.scheduler.set_timesteps(steps)
    boundary = None
    if pipe.config.boundary_ratio is not None:
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps

    def denoise(model, cond, text, t):
        if expand:
            x = (1 - mask) * cond + mask * latents
            timestep = (mask[0][0][:, ::2, ::2] * t).flatten()[None]
        else:
            x, timestep = torch.cat([latents, cond], 1), t.expand(1)
        return model(x, timestep, text, image_embeds, return_dict=False)[0]

    def filtered(s):
        if alg["lp_filter_in_latent"]:
            return ref_low_pass(condition, alg, s)
        lp = ref_low_pass(frame, alg, s)[:, :, None]
        video = lp if expand else torch.cat([lp, lp.new_zeros(1, 3, f - 1, h, w)], dim=2)
        z = (pipe.vae.encode(video).latent_dist.sample(generator) - mean) * inv_std
        return z if expand else torch.cat([condition[:, :4], z], dim=1)

    for i, t in enumerate(pipe.scheduler.timesteps):
        model, scale = pipe.transformer, guidance_scale
        if boundary is not None and t < boundary:
            model, scale = pipe.transformer_2, guidance_scale if guidance_scale_2 is None else guidance_scale_2
        s = ref_strength(alg, i, steps) if alg["use_low_pass_guidance"] else 0.0
        uncond = denoise(model, condition, negative_embeds, t)
        if s != 0:
            c_lp = filtered(s)
            v = uncond + scale * (denoise(model, c_lp, prompt_embeds, t) - denoise(model, c_lp, negative_embeds, t))
        else:
            v = uncond + scale * (denoise(model, condition, prompt_embeds, t) - uncond)
        latents = pipe.scheduler.step(v, t, latents, return_dict=False)[0]
    if expand:
        latents = (1 - mask) * condition + mask * latents
    video = pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")[0]
