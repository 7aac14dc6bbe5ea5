"""CogVideoX I2V: condition = the scaled VAE latent of the image, zero-padded over time; (B, F, C, H, W) layout.

The 5b-I2V checkpoint (learned positions + 3D RoPE) and the 1.5 layout (temporal patches, ofs embedding, the
latent padded to whole temporal patches). Its ALG rules differ from Wan's (alg.three_pass): two-pass steps see
the filtered condition, and dynamic CFG is off while ALG is on.
"""

import math
from pathlib import Path

import torch

from .. import checkpoint, media
from ..models.cogvideox import CogVideoXTransformer, CogVideoXTransformerConfig
from ..models.cogvideox_vae import CogVideoXVAE, CogVideoXVAEConfig
from ..models.t5 import T5Config, T5Encoder
from ..models.wan_vae import sample_posterior
from .t5 import T5Pipeline


class CogVideoX(T5Pipeline):
    references = ("CogVideoXImageToVideoPipeline",)
    family, two_pass_filters = "cogvideox", True  # two-pass steps see the filtered condition
    tiled_decode = False  # set True to decode in overlapping spatial tiles (less memory at large sizes)

    @classmethod
    def components_of(cls, folder: Path) -> dict:
        return {"transformer": (CogVideoXTransformer, CogVideoXTransformerConfig),
                "vae": (CogVideoXVAE, CogVideoXVAEConfig), "text_encoder": (T5Encoder, T5Config)}

    @staticmethod
    def defaults_of(folder: Path) -> dict:
        config = checkpoint.read_json(folder / "transformer" / "config.json")
        size = (config.get("sample_height", 60) * 8, config.get("sample_width", 90) * 8)
        text_length = config.get("max_text_seq_length", 226)
        return dict(height=size[0], width=size[1], num_frames=config.get("sample_frames", 49), guidance_scale=6.0,
                    max_sequence_length=text_length, max_text_length=text_length,
                    fixed_size=size if config.get("use_learned_positional_embeddings") else None,
                    frames_4k1=False, dynamic_cfg=True)

    def encode_text(self, prompts: list[str], run: dict, pixels) -> list[torch.Tensor]:
        """T5 states of the prompts as they are, padding included (the reference passes no mask): [(1, L, C)]."""
        states = self._text_states(prompts, run["max_sequence_length"], masked=False)[0]
        return [h[None].to(self.dtype) for h in states]

    def prepare(self, pixels, height, width, num_frames, generator):
        """The image latent (a posterior sample, drawn first), then the noise: the reference's order."""
        frame = media.to_model_input(media.resize(pixels, height, width, "lanczos")).to(self.device, self.dtype)
        self.latent_frames = (num_frames - 1) // 4 + 1
        p_t = self.transformer.config.patch_size_t
        self.extra_frames = (-self.latent_frames) % p_t if p_t else 0  # 1.5: pad to whole temporal patches
        condition = self.condition(frame, num_frames, generator)
        shape = (1, condition.shape[1], self.transformer.config.in_channels // 2, height // 8, width // 8)
        x = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
        return x, condition, frame

    def condition(self, frame: torch.Tensor, num_frames: int, generator=None) -> torch.Tensor:
        """c = the scaled VAE latent (a posterior sample) of the image, then zeros: (1, F, C, h, w)."""
        mean, logvar = self.vae.encode(frame[:, :, None])
        z = sample_posterior(mean, logvar, generator).to(self.dtype).permute(0, 2, 1, 3, 4)  # (1, 1, C, h, w)
        scale = self.vae.config.scaling_factor
        z = z / scale if self.vae.config.invert_scale_latents else scale * z
        frames = self.latent_frames + self.extra_frames  # 1.5 pads the video, so the padding comes last too
        return torch.cat([z, z.new_zeros(1, frames - 1, *z.shape[2:])], dim=1)

    def denoise(self, model, x, t, conditions: list, texts: list) -> tuple[torch.Tensor, ...]:
        n = len(conditions)
        batch = torch.cat([torch.cat([x, c], dim=2) for c in conditions])  # (n, F, 16 + 16, h, w)
        text, rows, cache = self.text_rows(model, texts)  # (P, L, C), each pass's row, the run's step cache
        return model(batch, t.expand(n), text, passes=rows, cache=cache).float().chunk(n)

    def decode(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        z = 1 / self.vae.config.scaling_factor * x[:, self.extra_frames:].permute(0, 2, 1, 3, 4)  # the reference's op
        return self.vae.decode(z, tiled=self.tiled_decode)[0]

    @staticmethod
    def dynamic_scale(w: float, t: int, steps: int) -> float:
        """Dynamic CFG: the scale rises from 1 to 1 + w along a cosine of the timestep t."""
        return 1 + w * (1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2
