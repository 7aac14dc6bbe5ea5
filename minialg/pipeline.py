"""Image to video: encode the inputs, run the denoising loop with CFG and ALG, decode the frames.

    image ─ resize ─┬─ VAE encode ─> condition c ───────────────┐
                    └─ CLIP ─> image tokens ───────────────────┐│
    prompt ─ tokenizer ─ UMT5 ─> text tokens ──────────────────┤│
    seed ─> noise x ─> for each step i:                        ││
                 c_lp = low_pass(c, strength(i))   <───────────┘┘  (ALG, only while its strength is > 0)
                 v    = guidance over one batch of denoiser passes
                 x    = solver.step(v, i, x)
           VAE decode ─> frames (F, H, W, 3) in [0, 1]
"""

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import alg as lowpass
from . import checkpoint, media
from .models.clip import CLIPVision, CLIPVisionConfig, preprocess as clip_preprocess
from .models.t5 import T5Config, T5Encoder, Tokenizer, clean_prompt
from .models.wan import WanTransformer, WanTransformerConfig
from .models.wan_vae import WanVAE, WanVAEConfig, sample_posterior
from .sampling import make_solver


@dataclass(frozen=True)
class Family:
    """What a model family is made of, and its defaults where a run leaves a value as None."""
    name: str
    components: dict  # sub-folder -> (module class, config class)
    height: int
    width: int
    num_frames: int
    guidance_scale: float
    max_sequence_length: int


WAN = Family(
    name="wan",
    components={"transformer": (WanTransformer, WanTransformerConfig), "vae": (WanVAE, WanVAEConfig),
                "text_encoder": (T5Encoder, T5Config), "image_encoder": (CLIPVision, CLIPVisionConfig)},
    height=480, width=832, num_frames=81, guidance_scale=5.0, max_sequence_length=512)
FAMILIES = {"WanImageToVideoPipeline": WAN}
FILES = ["tokenizer/spiece.model", "image_processor/preprocessor_config.json", "scheduler/scheduler_config.json"]


def family_of(folder: Path) -> Family:
    name = checkpoint.read_json(folder / "model_index.json").get("_class_name")
    if name not in FAMILIES:
        raise checkpoint.CheckpointError(f"{folder}: unsupported pipeline '{name}' in model_index.json "
                                         f"(minialg knows {', '.join(FAMILIES)})")
    return FAMILIES[name]


def check(model) -> list[dict]:
    """Validate a checkpoint from its configs and safetensors headers alone; one summary dict per component."""
    folder = checkpoint.resolve(model)
    family = family_of(folder)
    for file in FILES:
        if not (folder / file).is_file():
            raise checkpoint.CheckpointError(f"missing file: {folder / file}")
    summary = []
    for sub, (model_cls, config_cls) in family.components.items():
        module = checkpoint.build(model_cls, config_cls, folder / sub)
        files = checkpoint.plan(module, folder / sub)
        params = sum(t.numel() for t in module.state_dict().values())
        summary.append({"component": sub, "class": model_cls.__name__, "files": len(files),
                        "tensors": sum(len(names) for names in files.values()), "parameters": params})
    return summary


def settle(family: Family, *, height=None, width=None, num_frames=None, num_inference_steps=50,
           guidance_scale=None, alg=None, max_sequence_length=None) -> dict:
    """Fill a run's defaults from the family and check every value before any compute."""
    run = dict(height=height or family.height, width=width or family.width,
               num_frames=family.num_frames if num_frames is None else num_frames,
               guidance_scale=family.guidance_scale if guidance_scale is None else guidance_scale,
               max_sequence_length=max_sequence_length or family.max_sequence_length,
               alg=alg if isinstance(alg, lowpass.ALGConfig) else lowpass.ALGConfig.from_dict(alg))
    for name in ("height", "width"):
        if isinstance(run[name], bool) or not isinstance(run[name], int) or run[name] <= 0 or run[name] % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {run[name]!r}")
    frames = run["num_frames"]
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {frames!r}")
    if frames % 4 != 1:
        run["num_frames"] = frames // 4 * 4 + 1
        warnings.warn(f"num_frames must be 4k+1: rounding {frames} to {run['num_frames']}, as the reference does")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps!r}")
    if not isinstance(run["max_sequence_length"], int) or run["max_sequence_length"] < 1:
        raise ValueError(f"max_sequence_length must be a positive integer, got {run['max_sequence_length']!r}")
    lowpass.check_guidance_scale(run["alg"], run["guidance_scale"])
    return run


def load(model, device="cuda", dtype=torch.bfloat16, *, offload_encoders: bool = False) -> "Pipeline":
    """Load a checkpoint folder (diffusers' layout) or hub repo id into a ready-to-call pipeline.

    The denoiser and text encoder run in `dtype`; the VAE and CLIP stay float32, as the authors run them.
    With `offload_encoders`, the text and image encoders live on the CPU and visit `device` only to encode.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
    device = torch.device(device)
    folder = checkpoint.resolve(model)
    check(folder)  # every component's names and shapes, before any tensor data is read
    family = family_of(folder)
    encoder_device = "cpu" if offload_encoders else device
    dtypes = {"transformer": dtype, "text_encoder": dtype, "vae": torch.float32, "image_encoder": torch.float32}
    modules = {sub: checkpoint.load(model_cls, config_cls, folder / sub,
                                    encoder_device if sub.endswith("encoder") else device, dtypes[sub])
               for sub, (model_cls, config_cls) in family.components.items()}
    return Pipeline(folder, family, modules, device, encoder_device)


class Pipeline:
    """A loaded image-to-video model; call it with an image and a prompt."""

    def __init__(self, folder: Path, family: Family, modules: dict, device: torch.device, encoder_device):
        self.folder, self.family, self.device, self.encoder_device = folder, family, device, encoder_device
        self.transformer, self.vae = modules["transformer"], modules["vae"]
        self.text_encoder, self.image_encoder = modules["text_encoder"], modules["image_encoder"]
        self.tokenizer = Tokenizer(folder / "tokenizer" / "spiece.model")
        self.processor_config = checkpoint.read_json(folder / "image_processor" / "preprocessor_config.json")
        self.scheduler_config = checkpoint.read_json(folder / "scheduler" / "scheduler_config.json")
        self.timings = {}  # seconds per stage of the last call

    @torch.no_grad()
    def __call__(self, image, prompt: str, *, negative_prompt: str = "", num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, seed: int = 42, alg=None,
                 max_sequence_length: int | None = None, use_dynamic_cfg: bool = False,
                 flow_shift: float | None = None, solver: str = "auto", progress: bool = True) -> torch.Tensor:
        """Generate a video: float32 (frames, height, width, 3) in [0, 1], on the CPU."""
        run = settle(self.family, height=height, width=width, num_frames=num_frames,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, alg=alg,
                     max_sequence_length=max_sequence_length)
        height, width, num_frames, guidance_scale, max_sequence_length, alg = (
            run[k] for k in ("height", "width", "num_frames", "guidance_scale", "max_sequence_length", "alg"))
        if use_dynamic_cfg:
            raise ValueError("use_dynamic_cfg is a CogVideoX option; Wan uses a constant guidance scale")
        use_alg, cfg = alg.enabled, guidance_scale > 1.0
        pixels = media.load_image(image)  # fail on a bad image before any compute
        self.timings.clear()
        timer = self._timer
        generator = torch.Generator(self.device).manual_seed(seed)

        with timer("text"):
            text = self.encode_text([prompt, negative_prompt] if cfg else [prompt], max_sequence_length)
        with timer("image"):
            image_tokens = self.encode_image(pixels)  # CLIP sees the image as given, like the reference
            frame = media.to_model_input(media.resize(pixels, height, width, "lanczos")).to(self.device)  # (1,3,H,W)
        with timer("condition"):
            # noise first, then the condition: the reference's order of generator draws
            shape = (1, self.vae.config.z_dim, (num_frames - 1) // 4 + 1, height // 8, width // 8)
            x = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
            condition = self.condition(frame, num_frames)  # (1, 4 + 16, T, h, w)
        solver = make_solver(solver, self.scheduler_config, num_inference_steps, flow_shift, generator)

        def condition_lp(s: float) -> torch.Tensor:
            if alg.lp_filter_in_latent:
                return lowpass.low_pass(condition, alg, s)
            return self.condition(lowpass.low_pass(frame, alg, s), num_frames, generator)

        with timer("denoise"):
            steps = tqdm(solver.timesteps.to(self.device), desc="denoising", unit="step", disable=not progress, leave=False)
            for i, t in enumerate(steps):
                s = lowpass.strength(alg, i, num_inference_steps) if use_alg else 0.0
                if use_alg and lowpass.three_pass(alg, s, family="wan"):
                    c_lp = condition_lp(s)
                    uncond, cond_lp, uncond_lp = self.denoise(
                        x, t, [condition, c_lp, c_lp], [text[1], text[0], text[1]], image_tokens)
                    v = lowpass.guided(uncond, cond_lp, guidance_scale, uncond_lp)
                elif cfg:
                    uncond, cond = self.denoise(x, t, [condition, condition], [text[1], text[0]], image_tokens)
                    v = lowpass.guided(uncond, cond, guidance_scale)
                else:
                    (v,) = self.denoise(x, t, [condition], [text[0]], image_tokens)
                x = solver.step(v, i, x)
        with timer("decode"):
            video = self.vae.decode(self.vae.denormalize(x.to(torch.float32)))  # (1, 3, F, H, W) in [-1, 1]
        return (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float().cpu()

    def encode_text(self, prompts: list[str], max_length: int) -> list[torch.Tensor]:
        """UMT5 embeddings, trimmed to each prompt's length then zero-padded to max_length: [(1, L, C)]."""
        ids, mask = self.tokenizer([clean_prompt(p) for p in prompts], max_length)
        hidden = self.text_encoder.to(self.device)(ids.to(self.device), mask.to(self.device))  # (P, L, C)
        self.text_encoder.to(self.encoder_device)
        hidden = hidden * mask.to(hidden.device)[..., None]  # zero past each prompt's end
        return [h[None].to(self.transformer_dtype) for h in hidden]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP penultimate hidden states of the image: (1, 257, 1280)."""
        pixel_values = clip_preprocess(pixels, self.processor_config).to(self.device, torch.float32)
        tokens = self.image_encoder.to(self.device)(pixel_values)
        self.image_encoder.to(self.encoder_device)
        return tokens.to(self.transformer_dtype)

    def condition(self, frame: torch.Tensor, num_frames: int, generator=None) -> torch.Tensor:
        """c = [mask ; VAE latent of (image, zeros...)], normalized: (1, 4 + z, T, h, w).

        The latent is the posterior mode, or a posterior sample drawn with `generator` when one is given
        (pixel-space ALG).
        """
        video = torch.cat([frame[:, :, None], frame.new_zeros(1, 3, num_frames - 1, *frame.shape[-2:])], dim=2)
        mean, logvar = self.vae.encode(video.to(torch.float32))
        z = mean if generator is None else sample_posterior(mean, logvar, generator)
        z = self.vae.normalize(z)
        mask = torch.zeros_like(z[:, :4])  # the first latent frame holds 4 video frames: all of them known
        mask[:, :, 0] = 1
        return torch.cat([mask, z], dim=1)

    def denoise(self, x, t, conditions: list, texts: list, image_tokens) -> tuple[torch.Tensor, ...]:
        """One batched denoiser call over several (condition, text) passes; the velocity of each."""
        n = len(conditions)
        batch = torch.cat([torch.cat([x, c], dim=1) for c in conditions]).to(self.transformer_dtype)
        v = self.transformer(batch, t.expand(n), torch.cat(texts), image_tokens.expand(n, -1, -1))
        return v.chunk(n)

    @property
    def transformer_dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    @contextmanager
    def _timer(self, stage: str):
        """Adds the stage's wall time (after a device sync) to self.timings."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
