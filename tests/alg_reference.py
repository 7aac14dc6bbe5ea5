"""An independent ALG reference for the end-to-end tests, written straight from ALG.md (sections 2 and 3)."""

import math

import torch
import torch.nn.functional as F

ALG_DEFAULTS = dict(use_low_pass_guidance=True, lp_filter_type="down_up", lp_filter_in_latent=True,
                    lp_blur_sigma=15.0, lp_blur_kernel_size=0.02734375, lp_resize_factor=0.25,
                    lp_strength_schedule_type="none", schedule_blur_kernel_size=False,
                    schedule_interval_start_time=0.0, schedule_interval_end_time=0.05,
                    schedule_linear_start_weight=1.0, schedule_linear_end_weight=0.0, schedule_linear_end_time=0.5,
                    schedule_exp_decay_rate=10.0)


def ref_strength(alg, i, n):
    u = i / max(n - 1, 1)
    kind = alg["lp_strength_schedule_type"]
    if kind == "interval":
        return 1.0 if alg["schedule_interval_start_time"] <= u <= alg["schedule_interval_end_time"] else 0.0
    if kind == "linear":
        start, end, end_time = (alg[k] for k in ("schedule_linear_start_weight", "schedule_linear_end_weight",
                                                  "schedule_linear_end_time"))
        if end_time <= 0:
            return start
        return end if u >= end_time else start * (1 - u / end_time) + end * (u / end_time)
    if kind == "exponential":
        return math.exp(-abs(alg["schedule_exp_decay_rate"]) * u)
    return 1.0


def ref_low_pass(x, alg, s):
    """Filter a (B, C, H, W) or (B, C, F, H, W) tensor frame by frame, 2-D kernels as torchvision builds them."""
    shape = x.shape
    x = x.reshape(-1, 1, *shape[-2:])
    if alg["lp_filter_type"] == "down_up":
        r = 1 - (1 - alg["lp_resize_factor"]) * s
        if r != 1:
            h, w = shape[-2:]
            small = (max(1, round(h * r)), max(1, round(w * r)))
            x = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=True)
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    elif alg["lp_filter_type"] == "gaussian_blur":
        sigma, k = alg["lp_blur_sigma"] * s, alg["lp_blur_kernel_size"]
        if sigma != 0:
            if alg["schedule_blur_kernel_size"]:
                k = max(int(k * s), 1) if isinstance(k, int) else k * s
            k = k if isinstance(k, int) else max(int(k * shape[-2]), 1)
            k += 1 - k % 2
            taps = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
            g = torch.exp(-0.5 * (taps / sigma) ** 2)
            g = g / g.sum()
            kernel = (g[:, None] * g[None, :])[None, None]
            x = F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect"), kernel)
    return x.reshape(shape)
