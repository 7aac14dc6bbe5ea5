"""HunyuanVideo-I2V (diffusers' HunyuanVideoImageToVideoPipeline, and the authors' ALG version of it).

    image ─ resize ─ VAE encode (posterior mode) x scaling_factor ─> z (1 latent frame)
          ├─ token_replace (the published checkpoint): c = z; every denoiser input has c as latent frame 0
          └─ latent_concat (the 33-channel one): c = [z, zeros... ; mask], beside x on channels
    image (as given) ─ CLIP image processor ─┐
    prompt ─ chat template ─ Llama-3 BPE ────┴─ LLaVA ─> text states [image ; prompt] and their mask
    prompt ─ CLIP BPE ─ CLIP text ─> pooled vector
    x = 0.999 noise + 0.001 z on every frame (the reference's "i2v_stable" start), flow-matching Euler

Two guidances: `guidance_scale` feeds the distilled guidance embedding (every pass), `true_cfg_scale` > 1 adds
real classifier-free guidance with a negative prompt, whose LLaVA pass sees a black image. ALG (ALG.md section 8):
with true CFG the Wan rule (three passes while s != 0, two on the sharp c otherwise); without it, one pass on c_lp
at every step, so ALG needs no CFG here.
"""

from pathlib import Path

import torch

from .. import checkpoint, media
from ..models.bpe import BPETokenizer
from ..models.clip import CLIPText, CLIPTextConfig, preprocess as clip_preprocess
from ..models.hunyuan import HunyuanVideoTransformer, HunyuanVideoTransformerConfig
from ..models.hunyuan_vae import HunyuanVideoVAE, HunyuanVideoVAEConfig
from ..models.llava import PROMPT_TEMPLATE, LlavaConfig, LlavaTextEncoder, llama_prompt_embeds
from ..models.wan_vae import sample_posterior
from ..pipeline import Pipeline
from ..sampling import _linspace

CONDITION_TYPES = ("token_replace", "latent_concat")
IMAGE_EMBED_INTERLEAVE = {"latent_concat": 2, "token_replace": 4}  # image states kept: every k-th (diffusers)
OFFLOAD_BELOW = 80e9  # bytes of GPU memory under which the encoders are offloaded unless told (an "80 GB" card has
# about 85e9): the weights alone are 41 GB (13B denoiser in bf16, LLaVA's 7.4B read layers and the rest in fp16)


def prompt_template(tokenizer: BPETokenizer, config: LlavaConfig) -> dict:
    """The pipeline's chat template, its positions counted in this tokenizer: crop_start = the tokens before the
    prompt, image_emb_start = the position of the image token, image_emb_len = the vision tower's features (the
    published tokenizer and model give diffusers' 103, 5, 581, 576)."""
    prefix = tokenizer.encode(PROMPT_TEMPLATE["template"].split("{}")[0])
    if prefix.count(config.image_token_index) != 1:
        raise checkpoint.CheckpointError(f"the tokenizer does not write the template's <image> as the text encoder's "
                                         f"image_token_index {config.image_token_index}")
    start, length = prefix.index(config.image_token_index), config.num_image_features
    return dict(PROMPT_TEMPLATE, crop_start=len(prefix), image_emb_start=start, image_emb_end=start + length,
                image_emb_len=length)


class HunyuanVideo(Pipeline):
    references = ("HunyuanVideoImageToVideoPipeline",)
    family, two_pass_filters = "hunyuan_video", False  # true-CFG two-pass steps see the sharp condition
    lp_at_every_step = True  # without true CFG, ALG's one pass sees c_lp at s == 0 too (ALG.md section 8)
    tiled_decode = False  # set True to decode in overlapping spatial tiles too (diffusers' enable_tiling)

    @classmethod
    def check_index(cls, folder: Path, index: dict) -> None:
        kind = checkpoint.read_json(folder / "transformer" / "config.json").get("image_condition_type")
        if kind not in CONDITION_TYPES:
            raise checkpoint.CheckpointError(f"{folder}: transformer image_condition_type {kind!r} is not an "
                                             f"image-to-video kind ({', '.join(CONDITION_TYPES)})")

    @classmethod
    def components_of(cls, folder: Path) -> dict:
        return {"transformer": (HunyuanVideoTransformer, HunyuanVideoTransformerConfig),
                "vae": (HunyuanVideoVAE, HunyuanVideoVAEConfig), "text_encoder": (LlavaTextEncoder, LlavaConfig),
                "text_encoder_2": (CLIPText, CLIPTextConfig)}

    @classmethod
    def files_of(cls, folder: Path) -> list[str]:
        return super().files_of(folder) + [
            "image_processor/preprocessor_config.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
            "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/tokenizer_config.json"]

    @classmethod
    def dtype_of(cls, component: str, dtype: torch.dtype) -> torch.dtype:
        """Beside a bfloat16 denoiser the VAE and text encoders run in float16, as the authors' run.py (and
        diffusers' example) load them; otherwise everything runs in `dtype`."""
        return torch.float16 if dtype == torch.bfloat16 and component != "transformer" else dtype

    @classmethod
    def offload_by_default(cls, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < OFFLOAD_BELOW

    def __init__(self, folder, modules, device, encoder_device, dtype, streamed=False):
        super().__init__(folder, modules, device, encoder_device, dtype, streamed)
        self.text_encoder_2 = modules["text_encoder_2"]
        self.tokenizer, self.tokenizer_2 = BPETokenizer(folder / "tokenizer"), BPETokenizer(folder / "tokenizer_2")
        self.processor_config = checkpoint.read_json(folder / "image_processor" / "preprocessor_config.json")
        self.template = prompt_template(self.tokenizer, self.text_encoder.config)
        self.end_header_id = self.tokenizer.token_id("<|end_header_id|>")
        self.kind = self.transformer.config.image_condition_type  # "token_replace" or "latent_concat"

    @staticmethod
    def defaults_of(folder: Path) -> dict:
        """diffusers' defaults, but guidance_scale 6.0 on guidance-distilled checkpoints (diffusers' example and the
        authors' presets; its own default of 1.0 suits only the 33-channel one)."""
        embedded = checkpoint.read_json(folder / "transformer" / "config.json").get("guidance_embeds", True)
        return dict(height=720, width=1280, num_frames=129, guidance_scale=6.0 if embedded else 1.0,
                    max_sequence_length=256, frames_4k1=True, dynamic_cfg=False, size_multiple=16, alg_needs_cfg=False)

    @classmethod
    def settle_options(cls, folder: Path, run: dict, true_cfg_scale: float | None = None, i2v_stable: bool = True,
                       **options) -> dict:
        """`true_cfg_scale` > 1: real CFG with the negative prompt (default 1: off); `i2v_stable` (the authors'
        key) must be true: the run starts from 0.999 noise + 0.001 image latent, as diffusers always does."""
        super().settle_options(folder, run, **options)
        if i2v_stable is not True:
            raise ValueError("i2v_stable must be true: the start from 0.999 noise + 0.001 image latent is the only "
                             "one diffusers' pipeline has")
        w = 1.0 if true_cfg_scale is None else true_cfg_scale
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"true_cfg_scale must be a number >= 0, got {true_cfg_scale!r}")
        return {"true_cfg_scale": w, "cfg": w > 1.0}

    def denoiser_at(self, t, run: dict) -> tuple[torch.nn.Module, float]:
        return self.transformer, run["true_cfg_scale"]

    def schedule_of(self, steps: int, run: dict) -> dict:
        """The pipeline passes its scheduler linspace(1, 0, steps + 1) without the 0, shifted there."""
        return {"sigmas": _linspace(1.0, 0.0, steps + 1)[:-1]}

    def encode_text(self, prompts: list[str], run: dict, pixels: torch.Tensor) -> list[tuple]:
        """Per prompt (prompt, then negative): (LLaMA states (1, T, C), their mask (1, T), CLIP pooled (1, C'),
        embedded guidance (1,) or None), the states of both padded to one length so the passes batch. The prompt's
        LLaVA pass sees the image as given; the negative's a black image of the output size, every 2nd image state
        kept (diffusers' defaults for the negative prompt)."""
        black = torch.zeros(run["height"], run["width"], 3, dtype=torch.uint8)
        interleave = IMAGE_EMBED_INTERLEAVE[self.kind]
        llava, states = self.text_encoder.to(self.device), []
        for prompt, image, k in zip(prompts, (pixels, black), (interleave, 2)):
            ids, mask = self.tokenizer([self.template["template"].format(prompt)],
                                       run["max_sequence_length"] + self.template["crop_start"])
            pixel_values = clip_preprocess(image, self.processor_config)
            states.append(llama_prompt_embeds(llava, ids, mask, pixel_values, self.template, self.end_header_id, k))
        self.text_encoder.to(self.encoder_device)
        clip = self.text_encoder_2.to(self.device)
        pooled = [clip(self.tokenizer_2([prompt], 77)[0].to(self.device)) for prompt in prompts]
        self.text_encoder_2.to(self.encoder_device)

        length = max(embeds.shape[1] for embeds, _ in states)  # pad: a mask of 0 hides the extra tokens
        guidance = None
        if self.transformer.config.guidance_embeds:  # in the denoiser's dtype, as diffusers (bf16: 6000 -> 6016)
            guidance = torch.full((1,), run["guidance_scale"], dtype=self.dtype, device=self.device) * 1000.0
        return [(torch.nn.functional.pad(embeds, (0, 0, 0, length - embeds.shape[1])).to(self.dtype),
                 torch.nn.functional.pad(mask, (0, length - mask.shape[1])), p.to(self.dtype), guidance)
                for (embeds, mask), p in zip(states, pooled)]

    def prepare(self, pixels, height, width, num_frames, generator):
        """The image's latent (posterior mode, no generator draw), then the noise, mixed 0.999 : 0.001."""
        vae_dtype = next(self.vae.parameters()).dtype
        frame = media.to_model_input(media.resize(pixels, height, width, "lanczos")).to(self.device, vae_dtype)
        mean, _ = self.vae.encode(frame[:, :, None])
        z = mean.to(torch.float32) * self.vae.config.scaling_factor  # (1, C, 1, h, w)
        frames = (num_frames - 1) // 4 + 1
        noise = torch.randn((1, z.shape[1], frames, *z.shape[3:]), generator=generator, device=self.device,
                            dtype=torch.float32)
        t = torch.tensor([0.999], device=self.device)
        x = noise * t + z.expand(-1, -1, frames, -1, -1) * (1 - t)
        self.latent_frames = frames
        return x, self.condition_of(z), frame

    def condition(self, frame: torch.Tensor, num_frames: int, generator=None) -> torch.Tensor:
        """c_lp in pixel space: the scaled latent of the (filtered) image, a posterior sample drawn with the run's
        generator, laid out as the sharp condition."""
        mean, logvar = self.vae.encode(frame[:, :, None])
        return self.condition_of(sample_posterior(mean, logvar, generator).to(torch.float32)
                                 * self.vae.config.scaling_factor)

    def condition_of(self, z: torch.Tensor) -> torch.Tensor:
        """token_replace: z itself (1, C, 1, h, w); latent_concat: [z, zeros...; mask] (1, C + 1, F, h, w)."""
        if self.kind == "token_replace":
            return z
        latent = torch.cat([z, z.new_zeros(1, z.shape[1], self.latent_frames - 1, *z.shape[3:])], dim=2)
        mask = torch.zeros_like(latent[:, :1])
        mask[:, :, 0] = 1
        return torch.cat([latent, mask], dim=1)

    def denoise(self, model, x, t, conditions: list, texts: list) -> tuple[torch.Tensor, ...]:
        """One batched call over the (condition, text) passes. The timestep is float32 for token_replace and the
        latent's dtype for latent_concat, as diffusers hands it over."""
        n = len(conditions)
        if self.kind == "token_replace":  # latent frame 0 of every pass is its condition
            batch = torch.cat([torch.cat([c, x[:, :, 1:]], dim=2) for c in conditions]).to(self.dtype)
            timestep = t.expand(n).to(torch.float32)
        else:
            batch = torch.cat([torch.cat([x, c], dim=1) for c in conditions]).to(self.dtype)
            timestep = t.expand(n).to(x.dtype)
        embeds, masks, pooled, guidance = zip(*texts)
        guidance = None if guidance[0] is None else torch.cat(guidance)
        return model(batch, timestep, torch.cat(embeds), torch.cat(masks), torch.cat(pooled), guidance).chunk(n)

    def decode(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        if self.kind == "token_replace":  # the image's latent is latent frame 0 of the result
            x = torch.cat([condition, x[:, :, 1:]], dim=2)
        video = self.vae.decode(x.to(vae_dtype) / self.vae.config.scaling_factor, tiled=self.tiled_decode)[0]
        return video if self.kind == "token_replace" else video[:, 4:]  # latent_concat: the image's frames dropped
