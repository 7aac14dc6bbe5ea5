"""Image to video: encode the inputs, run the denoising loop with CFG and ALG, decode the frames.

    image ─ resize ─┬─ VAE encode ─> condition c ───────────────┐
                    └─ CLIP (Wan 2.1) ─> image tokens ─────────┐│
    prompt ─ tokenizer ─ T5 ─> text tokens ────────────────────┤│
    seed ─> noise x ─> for each step i:                        ││
                 c_lp = low_pass(c, strength(i))   <───────────┘┘  (ALG)
                 v    = guidance over one batch of denoiser passes
                 x    = solver.step(v, i, x)
           VAE decode ─> frames (F, H, W, 3) in [0, 1]

`Pipeline` holds the loop and knows no family. Each family (minialg/families/) subclasses it and fills in what
differs: which components its folder holds, how text and image become the condition (the text encoders, and what
"text" holds per pass), the denoiser call (and which denoiser, where a checkpoint has two experts), and decoding.
minialg/registry.py lists the families and picks one for a checkpoint folder (load, check).
"""

import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from . import alg as lowpass
from . import checkpoint, media, parallel
from .sampling import make_solver


class Pipeline:
    """A loaded image-to-video model; call it with an image and a prompt."""
    references: tuple[str, ...]  # diffusers' pipeline classes, as model_index.json names them
    dtypes: dict = {}  # components that keep their own dtype
    family: str  # the ALG family rule (alg.three_pass)
    two_pass_filters: bool  # whether the CFG passes of a step without the ALG batch see c_lp (True) or c
    lp_at_every_step: bool = False  # without CFG, whether ALG's one pass sees c_lp also where s == 0
    sequence_parallel: bool = True  # whether the transformer splits its tokens over ranks (minialg.parallel)
    takes_loras: bool = False  # whether load merges LoRAs into its transformers (minialg.lora: Wan's names)
    layout = parallel.Layout()  # this process's place among the ranks (load sets it under torchrun)
    cache_steps: bool = True  # keep step-invariant work between the steps of a run (load's cache_cross_attention)

    def __init__(self, folder: Path, modules: dict, device: torch.device, encoder_device: torch.device,
                 dtype: torch.dtype, streamed: bool = False):
        self.folder, self.device, self.encoder_device, self.dtype = folder, device, encoder_device, dtype
        self.streamed = streamed  # transformer blocks stream from CPU memory
        self.transformer, self.vae, self.text_encoder = modules["transformer"], modules["vae"], modules["text_encoder"]
        self.scheduler_config = checkpoint.read_json(folder / "scheduler" / "scheduler_config.json")
        self.defaults = self.defaults_of(folder)
        self.timings = {}  # seconds per stage of the last call
        self.progress = (0, 0)  # (steps done, steps) of the current or last call
        self.step_caches = {}  # during a run: {(denoiser, text ids): the dict its transformer keeps things in}

    @classmethod
    def check_index(cls, folder: Path, index: dict) -> None:
        """Refuse a model_index.json this family cannot run (a one-line CheckpointError)."""

    @classmethod
    def preset_of(cls, folder: Path) -> str:
        """The ALG preset (minialg/configs) for this folder's model; a family with variants picks per variant."""
        return f"{cls.family}_alg"

    @classmethod
    def files_of(cls, folder: Path) -> list[str]:
        """Files the family reads as they are, beside the modules."""
        return ["scheduler/scheduler_config.json"]

    @classmethod
    def weights_from(cls, folder: Path, component: str, path) -> "checkpoint.Weights":
        """A component's weights from a file or folder of its own (load's transformer=, transformer_2=)."""
        raise checkpoint.CheckpointError(f"{folder}: a {cls.__name__} checkpoint takes no {component} from a "
                                         "separate file; its folder's is used")

    @classmethod
    def dtype_of(cls, component: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype a component runs in when the pipeline is loaded in `dtype`."""
        return cls.dtypes.get(component, dtype)

    @classmethod
    def offload_by_default(cls, device: torch.device) -> bool:
        """Whether load() offloads the encoders when not told (the family's memory needs against the card)."""
        return False

    def schedule_of(self, steps: int, run: dict) -> dict:
        """What the reference pipeline passes its scheduler beyond the step count (sampling.make_solver's `sigmas`,
        `timesteps`, `mu`); empty for the scheduler's own schedule."""
        return {}

    def finish_guidance(self, v: torch.Tensor, conditional: torch.Tensor, run: dict) -> torch.Tensor:
        """A family's last touch to a guided prediction (LTX-Video: guidance_rescale against the prompt's pass)."""
        return v

    @torch.no_grad()
    def __call__(self, image, prompt: str, *, negative_prompt: str = "", num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, seed: int = 42, alg=None,
                 max_sequence_length: int | None = None, use_dynamic_cfg: bool = False,
                 flow_shift: float | None = None, solver: str = "auto", progress: bool = True,
                 output_type: str = "frames", **family_options) -> torch.Tensor:
        """Generate a video: float32 (frames, height, width, 3) in [0, 1], on the CPU.

        `family_options` are a family's own keywords (Wan 2.2 A14B: `guidance_scale_2`; HunyuanVideo-I2V:
        `true_cfg_scale`); others are refused. output_type "latent" returns the denoised state instead, on the
        device, undecoded (a family's multi-stage recipe goes on from there).
        """
        if output_type not in ("frames", "latent"):
            raise ValueError(f"output_type must be 'frames' or 'latent', got {output_type!r}")
        run = settle(self.defaults, height=height, width=width, num_frames=num_frames, alg=alg,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                     max_sequence_length=max_sequence_length, use_dynamic_cfg=use_dynamic_cfg)
        run.update(self.settle_options(self.folder, run, **family_options))
        self.run = run  # the call's settled settings, for the family's hooks
        alg, steps = run["alg"], num_inference_steps
        self.progress = (0, steps)  # (solver steps done, steps): read by the CLI when a run is interrupted
        cfg, use_alg = run["cfg"], alg.enabled  # cfg: real classifier-free guidance (negative passes)
        dynamic_cfg = use_dynamic_cfg and not use_alg  # the reference ignores it while ALG is on
        parallel.check_passes(self.layout, cfg, use_alg)  # enough passes per step for the guidance groups
        pixels = media.load_image(image)  # fail on a bad image before any compute
        self.timings.clear()
        generator = torch.Generator(self.device).manual_seed(seed)
        schedule = self.schedule_of(steps, run)  # the reference pipeline's own sigmas / timesteps / mu, if any
        solver = make_solver(solver, self.scheduler_config, steps, flow_shift, generator, **schedule)
        timesteps = solver.timesteps.tolist()  # Python ints/floats: no device reads in the loop

        with self._timer("text"):
            prompts = [prompt, negative_prompt] if cfg else [prompt]
            text = self.encode_text(prompts, run, pixels)  # one entry per prompt: prompt, negative
        with self._timer("condition"):
            x, condition, frame = self.prepare(pixels, run["height"], run["width"], run["num_frames"], generator)

        filtered = {}  # latent space: c_lp of the last strength, reused while the strength stays (interval schedule)

        def condition_lp(s: float) -> torch.Tensor:
            if alg.lp_filter_in_latent:
                if s not in filtered or not self.cache_steps:
                    filtered.clear()
                    filtered[s] = lowpass.low_pass(condition, alg, s)
                return filtered[s]
            return self.condition(lowpass.low_pass(frame, alg, s), run["num_frames"], generator)

        with self._timer("denoise"):
            self.step_caches = {}
            for i, t in enumerate(tqdm(solver.timesteps.to(self.device), desc="denoising", unit="step",
                                       disable=not (progress and self.layout.writes), leave=False)):
                model, w = self.denoiser_at(timesteps[i], run)  # the step's denoiser and guidance scale
                s = lowpass.strength(alg, i, steps) if use_alg else 0.0
                if use_alg and cfg and lowpass.three_pass(alg, s, self.family):
                    c_lp = condition_lp(s)
                    uncond, cond_lp, uncond_lp = self.denoise(model, x, t, [condition, c_lp, c_lp],
                                                              [text[1], text[0], text[1]])
                    v = self.finish_guidance(lowpass.guided(uncond, cond_lp, w, uncond_lp), cond_lp, run)
                else:  # without CFG, ALG is one pass on c_lp (ALG.md section 5; HunyuanVideo: section 8)
                    filtered_pass = self.two_pass_filters if cfg else s != 0 or self.lp_at_every_step
                    c = condition_lp(s) if use_alg and filtered_pass else condition
                    if cfg:
                        uncond, cond = self.denoise(model, x, t, [c, c], [text[1], text[0]])
                        v = lowpass.guided(uncond, cond, self.dynamic_scale(w, timesteps[i], steps) if dynamic_cfg
                                           else w)
                        v = self.finish_guidance(v, cond, run)
                    else:
                        (v,) = self.denoise(model, x, t, [c], [text[0]])
                x = solver.step(v, i, x)
                self.progress = (i + 1, steps)
            self.step_caches = {}  # free the device memory before decoding
        if output_type == "latent":
            return x
        with self._timer("decode"):
            video = self.decode(x, condition)  # (3, F, H, W) in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float().cpu()

    @classmethod
    def settle_options(cls, folder: Path, run: dict, **options) -> dict:
        """Check and fill the family's own keywords (before any compute); a family without any refuses them all."""
        if options:
            raise TypeError(f"unexpected keyword argument '{next(iter(options))}' for this checkpoint")
        return {}

    def denoiser_at(self, t, run: dict) -> tuple[torch.nn.Module, float]:
        """The denoiser for timestep t and its guidance scale (one denoiser unless the family has experts)."""
        return self.transformer, run["guidance_scale"]

    def text_rows(self, model, texts: list) -> tuple[torch.Tensor, tuple[int, ...], dict | None]:
        """A step's texts as the transformer takes them: the distinct ones (P, T, C), the row of each pass, and the
        run's cache of `model` for these texts (None when caching is off). A new key drops the old cache: an
        expert, once left, does not come back within a run."""
        distinct = list({id(t): t for t in texts}.values())
        rows = tuple(next(i for i, d in enumerate(distinct) if d is t) for t in texts)
        if not self.cache_steps:
            return torch.cat(distinct), rows, None
        key = (model, *map(id, distinct))
        if key not in self.step_caches:
            self.step_caches = {key: {}}
        return torch.cat(distinct), rows, self.step_caches[key]

    @contextmanager
    def _timer(self, stage: str):
        """Adds the stage's wall time (after a device sync) to self.timings."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


def settle(defaults: dict, *, height=None, width=None, num_frames=None, num_inference_steps=50,
           guidance_scale=None, alg=None, max_sequence_length=None, use_dynamic_cfg=False) -> dict:
    """Fill a run's defaults from the checkpoint and check every value before any compute."""
    run = dict(height=height or defaults["height"], width=width or defaults["width"],
               num_frames=defaults["num_frames"] if num_frames is None else num_frames,
               guidance_scale=defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
               max_sequence_length=max_sequence_length or defaults["max_sequence_length"],
               alg=alg if isinstance(alg, lowpass.ALGConfig) else lowpass.ALGConfig.from_dict(alg))
    run["cfg"] = run["guidance_scale"] > 1.0  # a family whose CFG scale is another keyword resets it
    run["num_inference_steps"] = num_inference_steps
    multiple = defaults.get("size_multiple", 16)  # VAE stride x patch size
    for name in ("height", "width"):
        if isinstance(run[name], bool) or not isinstance(run[name], int) or run[name] <= 0 or run[name] % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {run[name]!r}")
    if defaults.get("fixed_size") and (run["height"], run["width"]) != defaults["fixed_size"]:
        raise ValueError(f"this checkpoint's learned positional embedding fixes the size to "
                         f"{defaults['fixed_size'][0]}x{defaults['fixed_size'][1]}, got {run['height']}x{run['width']}")
    frames = run["num_frames"]
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {frames!r}")
    if defaults.get("frames_8k1") and frames % 8 != 1:  # LTX-Video: refused, as its reference does
        raise ValueError(f"num_frames must be 8k+1 (1, 9, 17, ...) for this checkpoint, got {frames}")
    if defaults.get("frames_4k1") and frames % 4 != 1:
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
        raise ValueError("use_dynamic_cfg is a CogVideoX option; this checkpoint uses a constant guidance scale")
    if defaults.get("alg_needs_cfg", True):
        lowpass.check_guidance_scale(run["alg"], run["guidance_scale"])
    return run
