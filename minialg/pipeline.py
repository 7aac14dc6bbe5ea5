"""Image to video: encode the inputs, run the denoising loop with CFG and ALG, decode the frames.

    image ─ resize ─┬─ VAE encode ─> condition c ───────────────┐
                    └─ CLIP (Wan) ─> image tokens ─────────────┐│
    prompt ─ tokenizer ─ T5 ─> text tokens ────────────────────┤│
    seed ─> noise x ─> for each step i:                        ││
                 c_lp = low_pass(c, strength(i))   <───────────┘┘  (ALG)
                 v    = guidance over one batch of denoiser passes
                 x    = solver.step(v, i, x)
           VAE decode ─> frames (F, H, W, 3) in [0, 1]

`Pipeline` holds the loop; `Wan` and `CogVideoX` fill in what differs between the families: how text and
image become the condition, the denoiser call, and decoding.
"""

import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from . import alg as lowpass
from . import checkpoint, gpu, media
from .models.clip import CLIPVision, CLIPVisionConfig, preprocess as clip_preprocess
from .models.cogvideox import CogVideoXTransformer, CogVideoXTransformerConfig
from .models.cogvideox_vae import CogVideoXVAE, CogVideoXVAEConfig
from .models.t5 import T5Config, T5Encoder, Tokenizer, clean_prompt
from .models.wan import WanTransformer, WanTransformerConfig
from .models.wan_vae import WanVAE, WanVAEConfig, sample_posterior
from .sampling import make_solver

FILES = ["tokenizer/spiece.model", "scheduler/scheduler_config.json"]  # read as they are, beside the modules


def pipeline_class(folder: Path) -> type["Pipeline"]:
    name = checkpoint.read_json(folder / "model_index.json").get("_class_name")
    for cls in (Wan, CogVideoX):
        if cls.reference == name:
            return cls
    raise checkpoint.CheckpointError(f"{folder}: unsupported pipeline '{name}' in model_index.json "
                                     f"(minialg knows WanImageToVideoPipeline, CogVideoXImageToVideoPipeline)")


def check(model) -> list[dict]:
    """Validate a checkpoint from its configs and safetensors headers alone; one summary dict per component."""
    folder = checkpoint.resolve(model)
    cls = pipeline_class(folder)
    for file in FILES + cls.files:
        if not (folder / file).is_file():
            raise checkpoint.CheckpointError(f"missing file: {folder / file}")
    summary = []
    for sub, (model_cls, config_cls) in cls.components.items():
        module = checkpoint.build(model_cls, config_cls, folder / sub)
        files = checkpoint.plan(module, folder / sub)
        params = sum(t.numel() for t in module.state_dict().values())
        summary.append({"component": sub, "class": model_cls.__name__, "files": len(files),
                        "tensors": sum(len(names) for names in files.values()), "parameters": params})
    return summary


def load(model, device="cuda", dtype=torch.bfloat16, *, offload_encoders: bool = False, compile: bool = False,
         stream_blocks: bool = False) -> "Pipeline":
    """Load a checkpoint folder (diffusers' layout) or hub repo id into a ready-to-call pipeline.

    The denoiser and text encoder run in `dtype`; Wan's VAE and CLIP stay float32, as the authors run them.
    With `offload_encoders`, the text and image encoders live on the CPU and visit `device` only to encode.
    `compile` compiles each transformer block (regional torch.compile); `stream_blocks` keeps the transformer's
    blocks in CPU memory and streams them to `device` one at a time (minialg.gpu), for small GPUs.
    """
    device = gpu.check_device(device)  # fail in one line when the device is not usable here
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
    device = torch.device(device)
    folder = checkpoint.resolve(model)
    check(folder)  # every component's names and shapes, before any tensor data is read
    cls = pipeline_class(folder)
    encoder_device = torch.device("cpu") if offload_encoders else device
    modules = {}
    for sub, (model_cls, config_cls) in cls.components.items():
        where = encoder_device if sub.endswith("encoder") else device
        if sub == "transformer" and stream_blocks:
            where = torch.device("cpu")  # stream_blocks moves what is not a block to the device
        modules[sub] = checkpoint.load(model_cls, config_cls, folder / sub, where, cls.dtypes.get(sub, dtype))
    if stream_blocks:
        gpu.stream_blocks(modules["transformer"], device)
    if compile:
        gpu.compile_blocks(modules["transformer"])
    return cls(folder, modules, device, encoder_device, dtype)


class Pipeline:
    """A loaded image-to-video model; call it with an image and a prompt."""
    reference: str  # diffusers' pipeline class, as model_index.json names it
    components: dict  # sub-folder -> (module class, config class)
    files: list = []  # other files the family reads
    dtypes: dict = {}  # components that keep their own dtype
    family: str  # the ALG family rule (alg.three_pass)
    progress: tuple[int, int] = (0, 0)  # (solver steps done, steps) of the current or last call

    def __init__(self, folder: Path, modules: dict, device: torch.device, encoder_device: torch.device,
                 dtype: torch.dtype):
        self.folder, self.device, self.encoder_device, self.dtype = folder, device, encoder_device, dtype
        self.transformer, self.vae, self.text_encoder = modules["transformer"], modules["vae"], modules["text_encoder"]
        self.tokenizer = Tokenizer(folder / "tokenizer" / "spiece.model")
        self.scheduler_config = checkpoint.read_json(folder / "scheduler" / "scheduler_config.json")
        self.defaults = self.defaults_of(folder)
        self.timings = {}  # seconds per stage of the last call

    @torch.no_grad()
    def __call__(self, image, prompt: str, *, negative_prompt: str = "", num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, seed: int = 42, alg=None,
                 max_sequence_length: int | None = None, use_dynamic_cfg: bool = False,
                 flow_shift: float | None = None, solver: str = "auto", progress: bool = True) -> torch.Tensor:
        """Generate a video: float32 (frames, height, width, 3) in [0, 1], on the CPU."""
        run = settle(self.defaults, height=height, width=width, num_frames=num_frames, alg=alg,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                     max_sequence_length=max_sequence_length, use_dynamic_cfg=use_dynamic_cfg)
        alg, w, steps = run["alg"], run["guidance_scale"], num_inference_steps
        self.progress = (0, steps)
        cfg, use_alg = w > 1.0, run["alg"].enabled
        dynamic_cfg = use_dynamic_cfg and not use_alg  # the reference ignores it while ALG is on
        pixels = media.load_image(image)  # fail on a bad image before any compute
        self.timings.clear()
        generator = torch.Generator(self.device).manual_seed(seed)

        with self._timer("text"):
            prompts = [prompt, negative_prompt] if cfg else [prompt]
            text = self.encode_text(prompts, run["max_sequence_length"])  # [(1, L, C)]: prompt, negative
        with self._timer("condition"):
            x, condition, frame = self.prepare(pixels, run["height"], run["width"], run["num_frames"], generator)
        solver = make_solver(solver, self.scheduler_config, steps, flow_shift, generator)
        timesteps = solver.timesteps.tolist()  # Python ints/floats: no device reads in the loop

        def condition_lp(s: float) -> torch.Tensor:
            if alg.lp_filter_in_latent:
                return lowpass.low_pass(condition, alg, s)
            return self.condition(lowpass.low_pass(frame, alg, s), run["num_frames"], generator)

        with self._timer("denoise"):
            for i, t in enumerate(tqdm(solver.timesteps.to(self.device), desc="denoising", unit="step",
                                       disable=not progress, leave=False)):
                s = lowpass.strength(alg, i, steps) if use_alg else 0.0
                if use_alg and cfg and lowpass.three_pass(alg, s, self.family):
                    c_lp = condition_lp(s)
                    uncond, cond_lp, uncond_lp = self.denoise(x, t, [condition, c_lp, c_lp], [text[1], text[0], text[1]])
                    v = lowpass.guided(uncond, cond_lp, w, uncond_lp)
                else:
                    c = condition_lp(s) if use_alg and self.two_pass_filters else condition
                    if cfg:
                        uncond, cond = self.denoise(x, t, [c, c], [text[1], text[0]])
                        v = lowpass.guided(uncond, cond, dynamic_scale(w, timesteps[i], steps) if dynamic_cfg else w)
                    else:
                        (v,) = self.denoise(x, t, [c], [text[0]])
                x = solver.step(v, i, x)
                self.progress = (i + 1, steps)
        with self._timer("decode"):
            video = self.decode(x)  # (3, F, H, W) in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float().cpu()

    @contextmanager
    def _timer(self, stage: str):
        """Adds the stage's wall time (after a device sync) to self.timings."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def _text_states(self, prompts: list[str], max_length: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states (P, L, C) of the prompts, attending to padding or not, and the padding mask (P, L)."""
        ids, mask = self.tokenizer(prompts, max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.text_encoder.to(self.device)(ids, mask if masked else None)
        self.text_encoder.to(self.encoder_device)
        return hidden, mask


class Wan(Pipeline):
    """Wan 2.1 I2V: condition = [mask ; VAE latent of (image, zeros...)], CLIP image tokens, UniPC."""
    reference = "WanImageToVideoPipeline"
    components = {"transformer": (WanTransformer, WanTransformerConfig), "vae": (WanVAE, WanVAEConfig),
                  "text_encoder": (T5Encoder, T5Config), "image_encoder": (CLIPVision, CLIPVisionConfig)}
    files = ["image_processor/preprocessor_config.json"]
    dtypes = {"vae": torch.float32, "image_encoder": torch.float32}
    family, two_pass_filters = "wan", False  # two-pass steps see the sharp condition

    def __init__(self, folder, modules, device, encoder_device, dtype):
        super().__init__(folder, modules, device, encoder_device, dtype)
        self.image_encoder = modules["image_encoder"]
        self.processor_config = checkpoint.read_json(folder / "image_processor" / "preprocessor_config.json")

    @staticmethod
    def defaults_of(folder: Path) -> dict:
        return dict(height=480, width=832, num_frames=81, guidance_scale=5.0, max_sequence_length=512,
                    frames_4k1=True, dynamic_cfg=False)

    def encode_text(self, prompts: list[str], max_length: int) -> list[torch.Tensor]:
        """UMT5 states of the cleaned prompts, zero past each prompt's end: [(1, L, C)]."""
        hidden, mask = self._text_states([clean_prompt(p) for p in prompts], max_length, masked=True)
        hidden = hidden * mask[..., None]  # the reference trims to the prompt's length, then pads with zeros
        return [h[None].to(self.dtype) for h in hidden]

    def prepare(self, pixels, height, width, num_frames, generator):
        """Noise, the condition and the model-size image; CLIP sees the image as given, like the reference."""
        pixel_values = clip_preprocess(pixels, self.processor_config).to(self.device, torch.float32)
        self.image_tokens = self.image_encoder.to(self.device)(pixel_values).to(self.dtype)  # (1, 257, 1280)
        self.image_encoder.to(self.encoder_device)
        frame = media.to_model_input(media.resize(pixels, height, width, "lanczos")).to(self.device)  # (1,3,H,W)
        shape = (1, self.vae.config.z_dim, (num_frames - 1) // 4 + 1, height // 8, width // 8)
        x = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)  # noise first
        return x, self.condition(frame, num_frames), frame

    def condition(self, frame: torch.Tensor, num_frames: int, generator=None) -> torch.Tensor:
        """c = [mask ; VAE latent of (image, zeros...)], normalized: (1, 4 + z, T, h, w).

        The latent is the posterior mode, or a posterior sample drawn with `generator` (pixel-space ALG).
        """
        video = torch.cat([frame[:, :, None], frame.new_zeros(1, 3, num_frames - 1, *frame.shape[-2:])], dim=2)
        mean, logvar = self.vae.encode(video.to(torch.float32))
        z = self.vae.normalize(mean if generator is None else sample_posterior(mean, logvar, generator))
        mask = torch.zeros_like(z[:, :4])  # the first latent frame holds 4 video frames: all of them known
        mask[:, :, 0] = 1
        return torch.cat([mask, z], dim=1)

    def denoise(self, x, t, conditions: list, texts: list) -> tuple[torch.Tensor, ...]:
        """One batched denoiser call over several (condition, text) passes; the velocity of each."""
        n = len(conditions)
        batch = torch.cat([torch.cat([x, c], dim=1) for c in conditions]).to(self.dtype)  # (n, 16 + 20, T, h, w)
        return self.transformer(batch, t.expand(n), torch.cat(texts), self.image_tokens.expand(n, -1, -1)).chunk(n)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.vae.denormalize(x.to(torch.float32)))[0]


class CogVideoX(Pipeline):
    """CogVideoX I2V: condition = scaled VAE latent of the image, zero-padded over time; (B, F, C, H, W) layout."""
    reference = "CogVideoXImageToVideoPipeline"
    components = {"transformer": (CogVideoXTransformer, CogVideoXTransformerConfig),
                  "vae": (CogVideoXVAE, CogVideoXVAEConfig), "text_encoder": (T5Encoder, T5Config)}
    family, two_pass_filters = "cogvideox", True  # two-pass steps see the filtered condition
    tiled_decode = False  # set True to decode in overlapping spatial tiles (less memory at large sizes)

    @staticmethod
    def defaults_of(folder: Path) -> dict:
        config = checkpoint.read_json(folder / "transformer" / "config.json")
        size = (config.get("sample_height", 60) * 8, config.get("sample_width", 90) * 8)
        text_length = config.get("max_text_seq_length", 226)
        return dict(height=size[0], width=size[1], num_frames=config.get("sample_frames", 49), guidance_scale=6.0,
                    max_sequence_length=text_length, max_text_length=text_length,
                    fixed_size=size if config.get("use_learned_positional_embeddings") else None,
                    frames_4k1=False, dynamic_cfg=True)

    def encode_text(self, prompts: list[str], max_length: int) -> list[torch.Tensor]:
        """T5 states of the prompts as they are, padding included (the reference passes no mask): [(1, L, C)]."""
        return [h[None].to(self.dtype) for h in self._text_states(prompts, max_length, masked=False)[0]]

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

    def denoise(self, x, t, conditions: list, texts: list) -> tuple[torch.Tensor, ...]:
        n = len(conditions)
        batch = torch.cat([torch.cat([x, c], dim=2) for c in conditions])  # (n, F, 16 + 16, h, w)
        return self.transformer(batch, t.expand(n), torch.cat(texts)).float().chunk(n)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        z = 1 / self.vae.config.scaling_factor * x[:, self.extra_frames:].permute(0, 2, 1, 3, 4)  # the reference's op
        return self.vae.decode(z, tiled=self.tiled_decode)[0]


def dynamic_scale(w: float, t: int, steps: int) -> float:
    """CogVideoX's dynamic CFG: the scale rises from 1 to 1 + w along a cosine of the timestep t."""
    return 1 + w * (1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2


def settle(defaults: dict, *, height=None, width=None, num_frames=None, num_inference_steps=50,
           guidance_scale=None, alg=None, max_sequence_length=None, use_dynamic_cfg=False) -> dict:
    """Fill a run's defaults from the checkpoint and check every value before any compute."""
    run = dict(height=height or defaults["height"], width=width or defaults["width"],
               num_frames=defaults["num_frames"] if num_frames is None else num_frames,
               guidance_scale=defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
               max_sequence_length=max_sequence_length or defaults["max_sequence_length"],
               alg=alg if isinstance(alg, lowpass.ALGConfig) else lowpass.ALGConfig.from_dict(alg))
    for name in ("height", "width"):
        if isinstance(run[name], bool) or not isinstance(run[name], int) or run[name] <= 0 or run[name] % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {run[name]!r}")
    if defaults.get("fixed_size") and (run["height"], run["width"]) != defaults["fixed_size"]:
        raise ValueError(f"this checkpoint's learned positional embedding fixes the size to "
                         f"{defaults['fixed_size'][0]}x{defaults['fixed_size'][1]}, got {run['height']}x{run['width']}")
    frames = run["num_frames"]
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {frames!r}")
    if defaults["frames_4k1"] and frames % 4 != 1:
        run["num_frames"] = frames // 4 * 4 + 1
        warnings.warn(f"num_frames must be 4k+1: rounding {frames} to {run['num_frames']}, as the reference does")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps!r}")
    length, limit = run["max_sequence_length"], defaults.get("max_text_length")
    if not isinstance(length, int) or length < 1 or (limit and length > limit):
        raise ValueError(f"max_sequence_length must be an integer in [1, {limit or 'inf'}], got {length!r}")
    if defaults.get("fixed_size") and length != limit:  # the learned table has one row per text position
        raise ValueError(f"max_sequence_length must be {limit} for this checkpoint, got {length}")
    if use_dynamic_cfg and not defaults["dynamic_cfg"]:
        raise ValueError("use_dynamic_cfg is a CogVideoX option; Wan uses a constant guidance scale")
    lowpass.check_guidance_scale(run["alg"], run["guidance_scale"])
    return run
