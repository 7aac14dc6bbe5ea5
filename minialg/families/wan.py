"""Wan image-to-video: Wan 2.1 I2V, Wan 2.2 I2V-A14B (two experts) and Wan 2.2 TI2V-5B (image in latent frame 0).

    Wan 2.1 I2V     c = [mask ; VAE latent of (image, zeros...)]   CLIP image tokens    one transformer
    Wan 2.2 A14B    c = the same                                   no CLIP              transformer for t >= boundary,
                                                                                        transformer_2 after it
    Wan 2.2 TI2V    c = VAE latent of the image (one frame)        no CLIP              input = [c, x[frames 1:]],
                                                                                        timestep 0 on frame 0

All three come from diffusers' WanImageToVideoPipeline (TI2V's folder is published as a WanPipeline with
`expand_timesteps`); what the folder holds decides which of the three a checkpoint is.
"""

from pathlib import Path

import torch

from .. import checkpoint, component_files, media, single_file
from ..models.clip import CLIPVision, CLIPVisionConfig, preprocess as clip_preprocess
from ..models.t5 import T5Config, T5Encoder, clean_prompt
from ..models.wan import WanTransformer, WanTransformerConfig
from ..models.wan22_vae import Wan22VAE
from ..models.wan_vae import WanVAE, WanVAEConfig, sample_posterior
from .t5 import T5Pipeline


def listed(index: dict, component: str) -> bool:
    """Whether model_index.json names a component (diffusers writes [null, null] for an absent optional one)."""
    entry = index.get(component)
    return bool(entry) and entry != [None, None]


class Wan(T5Pipeline):
    references = ("WanImageToVideoPipeline", "WanPipeline")
    dtypes = {"vae": torch.float32, "image_encoder": torch.float32}
    family, two_pass_filters = "wan", False  # two-pass steps see the sharp condition
    takes_loras = True  # minialg.lora

    @classmethod
    def check_index(cls, folder: Path, index: dict) -> None:
        if index["_class_name"] == "WanPipeline" and not index.get("expand_timesteps"):
            raise checkpoint.CheckpointError(f"{folder}: a text-to-video Wan checkpoint (WanPipeline without "
                                             "expand_timesteps); minialg runs image-to-video checkpoints")
        if index.get("boundary_ratio") is not None and not listed(index, "transformer_2"):
            raise checkpoint.CheckpointError(f"{folder}: model_index.json sets boundary_ratio but has no transformer_2")

    @classmethod
    def preset_of(cls, folder: Path) -> str:
        index = checkpoint.read_json(folder / "model_index.json")
        if index.get("boundary_ratio") is not None:
            return "wan22_alg"  # A14B: two experts
        return "wan22_ti2v_alg" if index.get("expand_timesteps") else "wan_alg"

    @classmethod
    def components_of(cls, folder: Path) -> dict:
        index = checkpoint.read_json(folder / "model_index.json")
        residual = checkpoint.read_json(folder / "vae" / "config.json").get("is_residual", False)
        parts = {"transformer": (WanTransformer, WanTransformerConfig),
                 "vae": (Wan22VAE if residual else WanVAE, WanVAEConfig), "text_encoder": (T5Encoder, T5Config)}
        if index.get("boundary_ratio") is not None:
            parts["transformer_2"] = (WanTransformer, WanTransformerConfig)
        if listed(index, "image_encoder"):
            parts["image_encoder"] = (CLIPVision, CLIPVisionConfig)
        return parts

    @classmethod
    def files_of(cls, folder: Path) -> list[str]:
        clip = "image_encoder" in cls.components_of(folder)
        return super().files_of(folder) + (["image_processor/preprocessor_config.json"] if clip else [])

    @classmethod
    def weights_from(cls, folder: Path, component: str, path) -> checkpoint.Weights:
        """A single file or an official folder, configured like the folder's component: a transformer's
        (minialg.single_file), the VAE's or an encoder's (minialg.component_files). Where the folder is the
        published configs alone, the text encoder's file also brings the tokenizer (or it is fetched)."""
        if component.startswith("transformer"):
            return single_file.weights(path, folder / component / "config.json")
        model_cls, config_cls = cls.components_of(folder)[component]
        source = component_files.weights(component, path, folder / component / "config.json", model_cls, config_cls)
        if component == "text_encoder":
            component_files.fetch_tokenizer(folder, path)
        return source

    @classmethod
    def spiece_of(cls, folder: Path) -> Path:
        return component_files.spiece_of(folder)

    def __init__(self, folder, modules, device, encoder_device, dtype, streamed=False):
        super().__init__(folder, modules, device, encoder_device, dtype, streamed)
        index = checkpoint.read_json(folder / "model_index.json")
        self.transformer_2 = modules.get("transformer_2")  # Wan 2.2 A14B: the low-noise expert
        self.boundary = None  # timesteps t >= boundary run `transformer`, later ones `transformer_2`
        if self.transformer_2 is not None:
            self.boundary = index["boundary_ratio"] * self.scheduler_config.get("num_train_timesteps", 1000)
        self.resident = self.transformer  # the expert on the device; the other waits in CPU memory
        self.expand_timesteps = bool(index.get("expand_timesteps"))  # Wan 2.2 TI2V: the image is latent frame 0
        self.image_encoder = modules.get("image_encoder")  # Wan 2.1 only
        if self.image_encoder is not None:
            self.processor_config = checkpoint.read_json(folder / "image_processor" / "preprocessor_config.json")

    @staticmethod
    def defaults_of(folder: Path) -> dict:
        """diffusers' WanImageToVideoPipeline defaults; sizes are multiples of the VAE stride x patch size. ALG runs
        without CFG too (ALG.md section 5: one pass, on c_lp while s != 0), for step-distilled LoRAs."""
        vae = checkpoint.read_json(folder / "vae" / "config.json")
        config = folder / "transformer" / "config.json"  # absent where the transformer comes from its own file
        patch = checkpoint.read_json(config).get("patch_size", [1, 2, 2]) if config.is_file() else [1, 2, 2]
        return dict(height=480, width=832, num_frames=81, guidance_scale=5.0, max_sequence_length=512,
                    frames_4k1=True, dynamic_cfg=False, size_multiple=vae.get("scale_factor_spatial", 8) * patch[1],
                    alg_needs_cfg=False)

    @classmethod
    def settle_options(cls, folder: Path, run: dict, guidance_scale_2: float | None = None, sigmas=None,
                       **options) -> dict:
        """`guidance_scale_2`: the low-noise expert's scale (Wan 2.2 A14B); default: `guidance_scale`. `sigmas`: the
        run's noise levels, one per step from 1 down, unshifted (the solver shifts them by the flow shift), for the
        step-distilled LoRAs' fixed schedules; the Euler and LCM solvers follow them. Default: the solver's own."""
        super().settle_options(folder, run, **options)
        steps = run["num_inference_steps"]
        if sigmas is not None and (not isinstance(sigmas, (list, tuple)) or len(sigmas) != steps or any(
                isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1 for s in sigmas)
                or any(a <= b for a, b in zip(sigmas, sigmas[1:]))):
            raise ValueError(f"sigmas must be {steps} decreasing numbers in (0, 1], one per step, got {sigmas!r}")
        if guidance_scale_2 is not None and "transformer_2" not in cls.components_of(folder):
            raise ValueError("guidance_scale_2 is for checkpoints with two experts (Wan 2.2 A14B); this one has one")
        if guidance_scale_2 is not None and (isinstance(guidance_scale_2, bool) or
                                             not isinstance(guidance_scale_2, (int, float)) or guidance_scale_2 < 0):
            raise ValueError(f"guidance_scale_2 must be a number >= 0, got {guidance_scale_2!r}")
        return {"guidance_scale_2": run["guidance_scale"] if guidance_scale_2 is None else guidance_scale_2,
                "sigmas": None if sigmas is None else [float(s) for s in sigmas]}

    def schedule_of(self, steps: int, run: dict) -> dict:
        return {} if run["sigmas"] is None else {"sigmas": run["sigmas"]}

    def denoiser_at(self, t, run: dict) -> tuple[torch.nn.Module, float]:
        """The high-noise expert (or the only transformer) while t >= boundary, then the low-noise expert."""
        if self.transformer_2 is None or t >= self.boundary:
            model, w = self.transformer, run["guidance_scale"]
        else:
            model, w = self.transformer_2, run["guidance_scale_2"]
        if model is not self.resident and not self.streamed:  # swap: the expert in use alone on the device
            self.resident.to("cpu")
            self.resident = model.to(self.device)
        return model, w

    def encode_text(self, prompts: list[str], run: dict, pixels) -> list[torch.Tensor]:
        """UMT5 states of the cleaned prompts, zero past each prompt's end: [(1, L, C)]."""
        hidden, mask = self._text_states([clean_prompt(p) for p in prompts], run["max_sequence_length"], masked=True)
        hidden = hidden * mask[..., None]  # the reference trims to the prompt's length, then pads with zeros
        return [h[None].to(self.dtype) for h in hidden]

    def prepare(self, pixels, height, width, num_frames, generator):
        """Noise, the condition and the model-size image; CLIP sees the image as given, like the reference."""
        self.image_tokens = None
        if self.image_encoder is not None:
            pixel_values = clip_preprocess(pixels, self.processor_config).to(self.device, torch.float32)
            self.image_tokens = self.image_encoder.to(self.device)(pixel_values).to(self.dtype)  # (1, 257, 1280)
            self.image_encoder.to(self.encoder_device)
        frame = media.to_model_input(media.resize(pixels, height, width, "lanczos")).to(self.device)  # (1,3,H,W)
        stride = self.vae.config.scale_factor_spatial
        shape = (1, self.vae.config.z_dim, (num_frames - 1) // 4 + 1, height // stride, width // stride)
        x = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)  # noise first
        return x, self.condition(frame, num_frames), frame

    def condition(self, frame: torch.Tensor, num_frames: int, generator=None) -> torch.Tensor:
        """c, normalized: TI2V (1, z, 1, h, w), the image's latent; else (1, 4 + z, T, h, w), the mask and the
        latent of (image, zeros...). The latent is the posterior mode, or a sample drawn with `generator`
        (pixel-space ALG)."""
        video = frame[:, :, None]  # (1, 3, 1, H, W)
        if not self.expand_timesteps:
            video = torch.cat([video, frame.new_zeros(1, 3, num_frames - 1, *frame.shape[-2:])], dim=2)
        mean, logvar = self.vae.encode(video.to(torch.float32))
        z = self.vae.normalize(mean if generator is None else sample_posterior(mean, logvar, generator))
        if self.expand_timesteps:
            return z
        mask = torch.zeros_like(z[:, :4])  # the first latent frame holds 4 video frames: all of them known
        mask[:, :, 0] = 1
        return torch.cat([mask, z], dim=1)

    def denoise(self, model, x, t, conditions: list, texts: list) -> tuple[torch.Tensor, ...]:
        """One batched call of `model` over several (condition, text) passes; the velocity of each."""
        n = len(conditions)
        if self.expand_timesteps:  # frame 0 is the image's latent, at timestep 0; the others are x, at t
            batch = torch.cat([torch.cat([c, x[:, :, 1:]], dim=2) for c in conditions]).to(self.dtype)
            timestep = ((torch.arange(x.shape[2], device=x.device) > 0).float() * t).expand(n, -1)  # (n, F)
        else:
            batch = torch.cat([torch.cat([x, c], dim=1) for c in conditions]).to(self.dtype)  # (n, 16 + 20, T, h, w)
            timestep = t.expand(n)
        text, rows, cache = self.text_rows(model, texts)  # (P, L, C), each pass's row, the run's step cache
        return model(batch, timestep, text, self.image_tokens, rows, cache).chunk(n)  # one image for every pass

    def decode(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if self.expand_timesteps:  # the image's latent is written into frame 0 again before decoding
            x = torch.cat([condition, x[:, :, 1:]], dim=2)
        return self.vae.decode(self.vae.denormalize(x.to(torch.float32)))[0]
