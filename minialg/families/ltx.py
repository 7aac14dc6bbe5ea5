"""LTX-Video image to video (0.9.0 to 0.9.8, 2B and 13B): the image's latent is latent frame 0 of the model input.

The condition sits in the sequence: latent frame 0 of every pass's input is the image's latent c (normalized with
the VAE's latents_mean / latents_std), its tokens see timestep 0, and only the other frames are stepped; ALG puts
c_lp there in the filtered passes (ALG.md section 9). The checkpoint picks one of diffusers' two samplers:
- 0.9.0 / 0.9.1 (LTXImageToVideoPipeline; the hub folder says LTXPipeline): the posterior sample of the image is
  drawn before the noise; sigmas 1 .. 1/N shifted by mu from the token count, stretched to shift_terminal; rotary
  positions from the latent grid scaled by (8 / frame_rate, 32, 32).
- 0.9.5+ (LTXConditionPipeline; also any checkpoint with the 0.9.5 VAE): the noise is drawn first; the linear-
  quadratic schedule or given `timesteps`; rotary positions from the causal pixel coordinates; every step frame 0
  is c + image_cond_noise_scale * eps * sigma^2 with fresh eps, and it is decoded as the last step left it.
Both: CFG [negative, prompt] with optional guidance_rescale; a timestep-conditioned VAE (0.9.1+) decodes
(1 - s) z + s eps at decode_timestep, s = decode_noise_scale, eps and the decoder's own noise from the run's
generator (diffusers draws the decoder's from the global RNG).
Latents are kept (1, C, F, h, w); the transformer sees them packed, one token per latent pixel.
"""

import math
from pathlib import Path

import torch

from .. import checkpoint, media
from ..models.ltx import LTXVideoTransformer, LTXVideoTransformerConfig, pack, unpack
from ..models.ltx_upsampler import LTXLatentUpsampler, LTXLatentUpsamplerConfig, upsample
from ..models.ltx_vae import LTXVideoVAE, LTXVideoVAEConfig
from ..models.t5 import T5Config, T5Encoder
from ..models.wan_vae import sample_posterior
from ..pipeline import settle
from .t5 import T5Pipeline

OPTIONS = {  # the family's keywords (diffusers' names) and their defaults
    "frame_rate": 25, "guidance_rescale": 0.0, "decode_timestep": 0.0, "decode_noise_scale": None,
    "image_cond_noise_scale": 0.15, "timesteps": None}
MULTI_SCALE = {  # the two-stage recipe of 0.9.7/0.9.8 (LTXLatentUpsamplePipeline between two LTXConditionPipeline runs)
    "upsampler": None, "downscale_factor": 2 / 3, "adain_factor": 0.0, "tone_map_compression_ratio": 0.0,
    "refine_steps": 10, "refine_strength": 0.4, "refine_timesteps": None}
CONDITION_ONLY = ("image_cond_noise_scale", "timesteps", "upsampler")  # LTXConditionPipeline's own
SETTLE = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "alg", "max_sequence_length")


def linear_quadratic(steps: int, threshold: float = 0.025) -> list[float]:
    """LTXConditionPipeline's schedule: 1 - sigma rises linearly to `threshold` over the first half of the steps,
    then quadratically to 1; the N noise levels from 1 down (as float32, the reference builds it in torch)."""
    if steps < 2:
        return [1.0]
    linear = steps // 2
    quadratic = steps - linear
    gap = linear - threshold * steps  # what the quadratic part must add beyond the linear slope
    a = gap / (linear * quadratic ** 2)
    b = threshold / linear - 2 * gap / quadratic ** 2
    c = a * linear ** 2
    rising = [i * threshold / linear for i in range(linear)] + [a * i * i + b * i + c for i in range(linear, steps)]
    return torch.tensor([1.0 - r for r in rising]).tolist()


def linear_quadratic_timesteps(steps: int) -> list[float]:
    """The schedule's timesteps as LTXConditionPipeline passes them: 1000 sigma, in float32."""
    return (torch.tensor(linear_quadratic(steps)) * 1000).tolist()


def upsampler_folder(model) -> Path:
    """The latent upsampler's weights folder: latent_upsampler/ of a LTXLatentUpsamplePipeline folder
    (Lightricks/ltxv-spatial-upscaler-0.9.7) or a LTXLatentUpsamplerModel folder itself."""
    folder = checkpoint.resolve(model)
    return folder / "latent_upsampler" if (folder / "latent_upsampler").is_dir() else folder


def stage_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """The two-stage recipe's first size: int(side x factor), down to a multiple of 32 (diffusers' example)."""
    return tuple(max(32, int(n * factor) // 32 * 32) for n in (height, width))


def check_timesteps(name: str, steps, count: int) -> None:
    """Given timesteps: `count` numbers in [0, 1000], decreasing."""
    if steps is None:
        return
    if not isinstance(steps, (list, tuple)) or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                                       and 0 <= t <= 1000 for t in steps):
        raise ValueError(f"{name} must be a list of numbers in [0, 1000], got {steps!r}")
    if len(steps) != count or list(steps) != sorted(steps, reverse=True):
        raise ValueError(f"{name} must hold {count} values (one per step), decreasing; got {list(steps)}")


class LTXVideo(T5Pipeline):
    references = ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")
    family, two_pass_filters = "ltx", False  # two-pass steps see the sharp condition (the Wan rule)
    tiled_decode = False  # set True to decode in overlapping spatial tiles (less memory at large sizes)
    sequence_parallel = False  # not yet: the guidance passes can be shared out, the tokens not

    @classmethod
    def components_of(cls, folder: Path) -> dict:
        return {"transformer": (LTXVideoTransformer, LTXVideoTransformerConfig),
                "vae": (LTXVideoVAE, LTXVideoVAEConfig), "text_encoder": (T5Encoder, T5Config)}

    @staticmethod
    def conditioned(folder: Path) -> bool:
        """Whether the checkpoint samples as LTXConditionPipeline (0.9.5+) rather than LTXImageToVideoPipeline."""
        index = checkpoint.read_json(folder / "model_index.json")
        vae = checkpoint.read_json(folder / "vae" / "config.json")
        blocks = vae.get("down_block_types", ())
        return index["_class_name"] == "LTXConditionPipeline" or "LTXVideo095DownBlock3D" in blocks

    @classmethod
    def preset_of(cls, folder: Path) -> str:
        layers = checkpoint.read_json(folder / "transformer" / "config.json").get("num_layers", 28)
        return "ltx13b_alg" if layers >= 48 else "ltx_alg"

    @staticmethod
    def defaults_of(folder: Path) -> dict:
        """diffusers' LTX pipelines' defaults: 704 x 512, 161 frames (8k + 1, refused otherwise), guidance 3."""
        return dict(height=512, width=704, num_frames=161, guidance_scale=3.0, max_sequence_length=128,
                    frames_8k1=True, dynamic_cfg=False, size_multiple=32, alg_needs_cfg=False)

    @classmethod
    def settle_options(cls, folder: Path, run: dict, **options) -> dict:
        """LTX's keywords, diffusers' names: frame_rate, guidance_rescale, decode_timestep, decode_noise_scale
        (None: decode_timestep); for 0.9.5+ image_cond_noise_scale, timesteps (one per step, from ~1000) and the
        two-stage recipe (MULTI_SCALE: `upsampler`, a LTXLatentUpsamplePipeline folder, turns it on)."""
        unknown = sorted(set(options) - set(OPTIONS) - set(MULTI_SCALE))
        if unknown:
            raise TypeError(f"unexpected keyword argument '{unknown[0]}' for this checkpoint")
        conditioned = cls.conditioned(folder)
        for name in CONDITION_ONLY:
            if options.get(name) is not None and not conditioned:
                raise ValueError(f"{name} is an option of 0.9.5+ checkpoints (LTXConditionPipeline); this one "
                                 "samples as LTXImageToVideoPipeline")
        defaults = dict(OPTIONS, **MULTI_SCALE)
        settled = {k: defaults[k] if options.get(k) is None else options[k] for k in defaults}
        if settled["upsampler"] is None and any(options.get(k) is not None for k in MULTI_SCALE):
            raise ValueError(f"{next(k for k in MULTI_SCALE if options.get(k) is not None)} belongs to the "
                             "two-stage recipe: give the upsampler too")
        for name in ("frame_rate", "guidance_rescale", "decode_timestep", "decode_noise_scale",
                     "image_cond_noise_scale", "downscale_factor", "adain_factor", "tone_map_compression_ratio",
                     "refine_strength", "refine_steps"):
            value, positive = settled[name], name in ("frame_rate", "downscale_factor", "refine_strength")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                      or (positive and value == 0)):
                raise ValueError(f"{name} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
        for name in ("refine_strength", "tone_map_compression_ratio"):
            if settled[name] > 1:
                raise ValueError(f"{name} must be at most 1, got {settled[name]!r}")
        check_timesteps("timesteps", settled["timesteps"], run["num_inference_steps"])
        check_timesteps("refine_timesteps", settled["refine_timesteps"], settled["refine_steps"])
        if settled["upsampler"] is not None:
            count = len(settled["refine_timesteps"] or ()) or settled["refine_steps"]
            if not isinstance(settled["refine_steps"], int) or int(count * settled["refine_strength"]) < 1:
                raise ValueError(f"refine_strength {settled['refine_strength']} of {count} refine steps keeps no "
                                 "step (the refinement runs the last int(steps x strength))")
            settled["upsampler"] = upsampler_folder(settled["upsampler"])
            checkpoint.plan(checkpoint.build(LTXLatentUpsampler, LTXLatentUpsamplerConfig, settled["upsampler"]),
                            settled["upsampler"])
        if settled["decode_noise_scale"] is None:
            settled["decode_noise_scale"] = settled["decode_timestep"]
        return settled

    @torch.no_grad()
    def __call__(self, image, prompt: str, **options) -> torch.Tensor:
        """With `upsampler`, the two-stage recipe of 0.9.7/0.9.8 as diffusers documents it: stage 1 (with ALG) at
        downscale_factor of the size (rounded down to multiples of 32), the latents upsampled 2x (AdaIN toward
        them by adain_factor, then the tone map), stage 2 from them: the last refine_strength of refine_steps
        (or of refine_timesteps) without ALG at twice the stage-1 size, each stage seeded anew with `seed`; the
        frames resized to the size asked for (as 8-bit images, Pillow's default bicubic, as diffusers' example does).
        Without it, one run."""
        if options.get("upsampler") is None:
            return super().__call__(image, prompt, **options)
        run = settle(self.defaults, **{k: options[k] for k in SETTLE if k in options})
        stage = self.settle_options(self.folder, run, **{k: v for k, v in options.items() if k in OPTIONS or
                                                         k in MULTI_SCALE})
        options = {k: v for k, v in options.items() if k not in MULTI_SCALE}
        height, width = stage_size(run["height"], run["width"], stage["downscale_factor"])
        latents = super().__call__(image, prompt, **dict(options, height=height, width=width, output_type="latent"))
        latents = torch.cat([self.frame0, latents[:, :, 1:]], dim=2)
        timings = dict(self.timings)
        if self.upsampler is None or self.upsampler[0] != stage["upsampler"]:
            module = checkpoint.load(LTXLatentUpsampler, LTXLatentUpsamplerConfig, stage["upsampler"], self.device,
                                     self.dtype)
            self.upsampler = (stage["upsampler"], module)
        vae = self.vae
        with self._timer("upsample"):
            latents = upsample(self.upsampler[1], latents, vae.latents_mean, vae.latents_std,
                               vae.config.scaling_factor, stage["adain_factor"], stage["tone_map_compression_ratio"])
        steps = stage["refine_timesteps"] or linear_quadratic_timesteps(stage["refine_steps"])
        kept = min(int(len(steps) * stage["refine_strength"]), len(steps))  # diffusers' denoise_strength
        steps = steps[len(steps) - kept:]
        self.start = (latents.float(), torch.tensor(steps[0] / 1000, dtype=torch.float32).item())
        try:
            frames = super().__call__(image, prompt, **dict(options, height=2 * height, width=2 * width, alg=None,
                                                            num_inference_steps=len(steps), timesteps=steps))
        finally:
            self.start = None
        self.timings = {k: timings.get(k, 0.0) + self.timings.get(k, 0.0) for k in {**timings, **self.timings}}
        if frames.shape[1:3] != (run["height"], run["width"]):
            pixels = (frames * 255).round().to(torch.uint8)
            frames = torch.stack([media.resize(f, run["height"], run["width"], "bicubic") for f in pixels]) / 255
        return frames

    def __init__(self, folder, modules, device, encoder_device, dtype, streamed=False):
        super().__init__(folder, modules, device, encoder_device, dtype, streamed)
        self.is_conditioned = self.conditioned(folder)
        self.spatial, self.temporal = self.vae.spatial_compression, self.vae.temporal_compression
        self.upsampler = None  # (folder, module) of the two-stage recipe, loaded at its first use
        self.start = None  # stage 2: (latents (1, C, F, h, w), sigma) to start from instead of pure noise

    def grid_of(self, run: dict) -> tuple[int, int, int]:
        """The latent (frames, height, width) of a run."""
        return ((run["num_frames"] - 1) // self.temporal + 1, run["height"] // self.spatial,
                run["width"] // self.spatial)

    def schedule_of(self, steps: int, run: dict) -> dict:
        if self.is_conditioned:
            return {"timesteps": run["timesteps"] or linear_quadratic_timesteps(steps)}
        c = self.scheduler_config  # mu: linear in the token count between (base, base_shift) and (max, max_shift)
        base, top = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        slope = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (top - base)
        mu = math.prod(self.grid_of(run)) * slope + c.get("base_shift", 0.5) - slope * base
        return {"sigmas": torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64).tolist(), "mu": mu}

    def encode_text(self, prompts: list[str], run: dict, pixels) -> list[tuple]:
        """T5 states of the padded prompts and the mask the transformer gets: [((1, L, C), (1, L))]. The encoder
        attends to the padding in LTXImageToVideoPipeline, not in LTXConditionPipeline."""
        states, mask = self._text_states(prompts, run["max_sequence_length"], masked=self.is_conditioned)
        return [(h[None].to(self.dtype), m[None]) for h, m in zip(states, mask)]

    def prepare(self, pixels, height, width, num_frames, generator):
        """The state x (1, C, F, h, w) with c in frame 0, c (1, C, 1, h, w) and the model-size image (1, 3, H, W),
        in the reference's order of draws (0.9.0: the image's sample, then the noise; 0.9.5+: the other way)."""
        frame = media.to_model_input(media.resize(pixels, height, width, "lanczos")).to(self.device)
        self.grid = self.grid_of(self.run)
        self.tokens = math.prod(self.grid)
        shape = (1, self.transformer.config.in_channels, *self.grid)
        if self.is_conditioned:
            noise = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
            if self.start is not None:  # stage 2: the upsampled latents, noised to the first sigma
                latents, sigma = self.start
                noise = sigma * noise + (1 - sigma) * latents
            c = self.condition(frame, num_frames, generator)
        else:
            c = self.condition(frame, num_frames, generator)
            noise = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
        self.frame0 = self.frame0_clean = c  # the state's frame 0: c, or (0.9.5+) c plus the last step's noise
        self.run_generator = generator
        if self.is_conditioned:  # the causal pixel coordinates of each token: frame (8f + 1 - 8)+ / rate, 32 h, 32 w
            f, h, w = (torch.arange(n, device=self.device) for n in self.grid)
            f = (f * self.temporal + 1 - self.temporal).clamp(min=0).float() * (1.0 / self.run["frame_rate"])
            coords = torch.meshgrid(f, h.float() * self.spatial, w.float() * self.spatial, indexing="ij")
            self.coords = torch.stack(coords).reshape(1, 3, -1)  # (1, 3, L)
        return torch.cat([c, noise[:, :, 1:]], dim=2), c, frame

    def condition(self, frame: torch.Tensor, num_frames: int, generator=None) -> torch.Tensor:
        """c = the normalized posterior sample of the image's latent (1, C, 1, h, w), float32."""
        mean, logvar = self.vae.encode(frame[:, :, None].to(self.vae_dtype))
        z = sample_posterior(mean, logvar, generator).float()
        return self.vae.normalize(z, 1.0)  # the reference normalizes with scale 1 (and denormalizes with the config's)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def denoise(self, model, x, t, conditions: list, texts: list) -> tuple[torch.Tensor, ...]:
        """One batched call over the passes; frame 0 of each pass's input is its condition (c or c_lp). 0.9.5+:
        the step's conditioning noise, drawn once, is added to each pass's frame 0."""
        n, rest = len(conditions), x[:, :, 1:]
        if self.is_conditioned:
            scale = self.run["image_cond_noise_scale"]
            if scale > 0:  # the reference draws eps over all tokens and keeps frame 0's
                eps = torch.randn(pack(x).shape, generator=self.run_generator, device=x.device, dtype=x.dtype)
                eps = unpack(eps, self.grid)[:, :, :1] * (scale * (t.float() / 1000) ** 2)
                conditions = [c + eps for c in conditions]
                self.frame0 = self.frame0_clean + eps
        batch = pack(torch.cat([torch.cat([c, rest], dim=2) for c in conditions])).to(self.dtype)  # (n, L, C)
        first = self.grid[1] * self.grid[2]  # frame 0's tokens, at timestep 0
        timestep = torch.cat([torch.zeros(first, device=x.device), t.float().expand(self.tokens - first)])
        text = torch.cat([h for h, _ in texts]).to(self.dtype)  # (n, L_text, C)
        mask = torch.cat([m for _, m in texts])
        positions = {"coords": self.coords.expand(n, -1, -1)} if self.is_conditioned else {
            "grid": self.grid, "rope_interpolation_scale": (self.temporal / self.run["frame_rate"],
                                                            self.spatial, self.spatial)}
        v = model(batch, timestep.expand(n, -1), text, mask, **positions).float()  # (n, L, C)
        return unpack(v, self.grid).chunk(n)  # 0.9.5+ steps on -v with sigmas read from the timesteps: the same

    def finish_guidance(self, v: torch.Tensor, conditional: torch.Tensor, run: dict) -> torch.Tensor:
        """guidance_rescale (Lin et al. 2023, section 3.4): rescale v to the prompt pass's standard deviation."""
        phi = run["guidance_rescale"]
        if phi <= 0:
            return v
        rescaled = v * (conditional.std() / v.std())
        return phi * rescaled + (1 - phi) * v

    def decode(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        vae, z = self.vae, torch.cat([self.frame0, x[:, :, 1:]], dim=2)
        z = vae.denormalize(z)
        timestep = None
        if vae.config.timestep_conditioning:
            noise = torch.randn(z.shape, generator=self.run_generator, device=z.device, dtype=z.dtype)
            s = self.run["decode_noise_scale"]
            z = (1 - s) * z + s * noise
            timestep = torch.tensor([self.run["decode_timestep"]], device=z.device, dtype=z.dtype)
        return vae.decode(z.to(self.vae_dtype), timestep, generator=self.run_generator, tiled=self.tiled_decode)[0]
