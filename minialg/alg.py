"""Adaptive Low-pass Guidance (Choi et al., arXiv 2506.08456): the paper, in one file.

Image-to-video models copy the conditioning image's fine detail in the first denoising steps and then barely move.
ALG low-pass filters the image condition c during those early steps and restores the sharp c later. At an active
step the guidance direction is taken between two passes that both see the filtered condition c_lp:

    eps = D(x, c, negative) + w * (D(x, c_lp, prompt) - D(x, c_lp, negative))

This file holds the settings (ALGConfig), the strength schedule s(i), the filter LP and that combination. Strengths
are Python floats computed from the step index, never from tensors, so nothing here waits on the GPU.
"""

import difflib
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

FILTERS = ("none", "down_up", "gaussian_blur")
SCHEDULES = ("none", "interval", "linear", "exponential")
FAMILIES = ("wan", "cogvideox", "hunyuan_video", "ltx")


@dataclass
class ALGConfig:
    """The `alg:` section of a run config; names and defaults are the reference pipelines' arguments."""

    use_low_pass_guidance: bool = False
    lp_filter_type: str = "none"  # one of FILTERS
    lp_filter_in_latent: bool = False  # filter the VAE latent (True) or the pixels before encoding (False)
    lp_blur_sigma: float = 15.0
    lp_blur_kernel_size: float | int = 0.02734375  # int: pixels; float: fraction of the filtered height
    lp_resize_factor: float = 0.25
    lp_strength_schedule_type: str = "none"  # one of SCHEDULES
    schedule_blur_kernel_size: bool = False  # scale the kernel size by the strength too
    schedule_interval_start_time: float = 0.0
    schedule_interval_end_time: float = 0.05
    schedule_linear_start_weight: float = 1.0
    schedule_linear_end_weight: float = 0.0
    schedule_linear_end_time: float = 0.5
    schedule_exp_decay_rate: float = 10.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "ALGConfig":
        """Build from a YAML `alg:` mapping; missing or null keys take the defaults, unknown keys are refused."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"alg must be a mapping of settings, got {d!r}")
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]}?" if close else "known keys: " + ", ".join(known)
                raise ValueError(f"unknown alg key {key!r}: {hint}")
        return cls(**{key: value for key, value in d.items() if value is not None})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is bool and not isinstance(value, bool):
                raise ValueError(f"alg.{f.name} must be true or false, got {value!r}")
            if f.type is str and not isinstance(value, str):
                raise ValueError(f"alg.{f.name} must be a string, got {value!r}")
            if f.type in (float, float | int):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"alg.{f.name} must be a finite number, got {value!r}")
                if f.type is float:
                    setattr(self, f.name, float(value))  # an int kernel size stays an int: it means pixels

        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"alg.{name} {rule}, got {getattr(self, name)!r}")

        check(self.lp_filter_type in FILTERS, "lp_filter_type", f"must be one of {', '.join(FILTERS)}")
        check(self.lp_strength_schedule_type in SCHEDULES, "lp_strength_schedule_type",
              f"must be one of {', '.join(SCHEDULES)}")
        check(0 < self.lp_resize_factor <= 1, "lp_resize_factor", "must be in (0, 1]")
        check(self.lp_blur_sigma >= 0, "lp_blur_sigma", "must be >= 0")
        k = self.lp_blur_kernel_size
        if isinstance(k, int):
            check(k > 0, "lp_blur_kernel_size", "must be a size in pixels > 0 (an int) or a fraction in (0, 1]")
        else:
            check(0 < k <= 1, "lp_blur_kernel_size", "must be a fraction of the height in (0, 1] (or an int size)")
        check(self.schedule_interval_start_time <= self.schedule_interval_end_time, "schedule_interval_start_time",
              f"must be <= schedule_interval_end_time ({self.schedule_interval_end_time})")
        for name in ("schedule_linear_start_weight", "schedule_linear_end_weight"):
            check(0 <= getattr(self, name) <= 1, name, "must be a strength in [0, 1]")

    @property
    def enabled(self) -> bool:
        """ALG is on. Even a filter that does nothing (type "none", r = 1, sigma = 0) keeps the three-pass
        steps of the reference, and in pixel space their posterior samples, so runs stay comparable."""
        return self.use_low_pass_guidance


def check_guidance_scale(cfg: ALGConfig, guidance_scale: float) -> None:
    """Refuse ALG without classifier-free guidance (Wan, CogVideoX); the pipeline calls this before any compute.
    HunyuanVideo-I2V runs ALG without CFG too (one pass on the filtered condition), so it skips this check."""
    if cfg.enabled and guidance_scale <= 1:
        raise ValueError(f"ALG needs classifier-free guidance: guidance_scale must be > 1, got {guidance_scale}")


# ----------------------------------------------------------------------------------------------------------------
# The strength schedule s(i) in [0, 1]: 1 filters fully, 0 leaves the condition sharp.

def strength(cfg: ALGConfig, i: int, num_steps: int) -> float:
    """Filter strength at step i of num_steps (i = 0 is the noisiest step)."""
    u = i / max(num_steps - 1, 1)  # progress through sampling, 0 .. 1
    schedule = cfg.lp_strength_schedule_type
    if schedule == "interval":
        return 1.0 if cfg.schedule_interval_start_time <= u <= cfg.schedule_interval_end_time else 0.0
    if schedule == "linear":
        end_time = cfg.schedule_linear_end_time
        if end_time <= 0:
            return cfg.schedule_linear_start_weight
        if u >= end_time:
            return cfg.schedule_linear_end_weight
        t = u / end_time
        return cfg.schedule_linear_start_weight * (1 - t) + cfg.schedule_linear_end_weight * t
    if schedule == "exponential":
        return math.exp(-abs(cfg.schedule_exp_decay_rate) * u)
    return 1.0  # "none": full strength at every step


def three_pass(cfg: ALGConfig, s: float, family: str) -> bool:
    """Whether a step at strength s runs the three-pass ALG batch, by the family's reference rule.

    Wan, HunyuanVideo (with true CFG) and LTX-Video: whenever s != 0. CogVideoX: also s != 0, but the exponential tail
    (s < 0.1) falls back to two passes; CogVideoX's two-pass steps still see low_pass(c, cfg, s) (equal to c when
    s == 0), Wan's and HunyuanVideo's see c.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)}")
    if not cfg.enabled or s == 0:
        return False
    return not (family == "cogvideox" and cfg.lp_strength_schedule_type == "exponential" and s < 0.1)


# ----------------------------------------------------------------------------------------------------------------
# The low-pass filter at strength s: weaker filters as s goes to 0.

def resize_factor_at(cfg: ALGConfig, s: float) -> float:
    """down_up: r_i = 1 - (1 - r) s, so s = 1 resizes by r and s = 0 not at all."""
    return 1.0 - (1.0 - cfg.lp_resize_factor) * s


def blur_sigma_at(cfg: ALGConfig, s: float) -> float:
    """gaussian_blur: sigma_i = sigma s."""
    return cfg.lp_blur_sigma * s


def blur_kernel_size_at(cfg: ALGConfig, s: float, height: int) -> int:
    """gaussian_blur: odd kernel size in pixels; a float size is a fraction of the filtered tensor's height."""
    k = cfg.lp_blur_kernel_size
    if isinstance(k, int):
        size = max(int(k * s), 1) if cfg.schedule_blur_kernel_size else k
    else:
        fraction = k * s if cfg.schedule_blur_kernel_size else k
        size = max(int(fraction * height), 1)
    return size + 1 if size % 2 == 0 else size


def low_pass(x: torch.Tensor, cfg: ALGConfig, s: float) -> torch.Tensor:
    """Spatially low-pass filter every (H, W) slice of x (..., H, W) independently at strength s.

    Computes in float32 and returns x's dtype; returns x itself when the filter does nothing at this strength.
    """
    h, w = x.shape[-2:]
    if cfg.lp_filter_type == "down_up":
        r = resize_factor_at(cfg, s)
        if r == 1:
            return x
        planes = x.reshape(-1, 1, h, w).float()  # (N, 1, H, W)
        small = (max(1, round(h * r)), max(1, round(w * r)))  # Python's round, as the reference
        planes = F.interpolate(planes, size=small, mode="bilinear", antialias=True, align_corners=False)
        planes = F.interpolate(planes, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return planes.reshape(x.shape).to(x.dtype)
    if cfg.lp_filter_type == "gaussian_blur":
        sigma = blur_sigma_at(cfg, s)
        if sigma == 0:
            return x
        k = blur_kernel_size_at(cfg, s, h)
        return gaussian_blur(x.reshape(-1, 1, h, w).float(), k, sigma).reshape(x.shape).to(x.dtype)
    return x


def gaussian_blur(planes: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """Separable normalised Gaussian over (N, 1, H, W) with reflect padding, as torchvision's gaussian_blur."""
    taps = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=planes.device)  # (k,)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    planes = F.pad(planes, (k // 2, k // 2, k // 2, k // 2), mode="reflect")  # (N, 1, H + k - 1, W + k - 1)
    planes = F.conv2d(planes, kernel.view(1, 1, 1, k))  # along W: (N, 1, H + k - 1, W)
    return F.conv2d(planes, kernel.view(1, 1, k, 1))  # along H: (N, 1, H, W)


# ----------------------------------------------------------------------------------------------------------------
# Guidance: classifier-free guidance, and ALG's three-pass form of it.

def guided(uncond: torch.Tensor, cond: torch.Tensor, w: float, uncond_lp: torch.Tensor | None = None) -> torch.Tensor:
    """uncond + w (cond - base), base = uncond_lp if given, else uncond.

    CFG:  guided(D(x, c, neg), D(x, c, prompt), w).
    ALG:  guided(D(x, c, neg), D(x, c_lp, prompt), w, uncond_lp=D(x, c_lp, neg)); the reference batches these
          as [uncond, uncond_lp, cond], CFG as [uncond, cond].
    """
    base = uncond if uncond_lp is None else uncond_lp
    return uncond + w * (cond - base)
