"""ALG transform: schedules, filters, config validation and the guidance combination, against hand-computed values."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minialg.alg import (
    ALGConfig,
    blur_kernel_size_at,
    blur_sigma_at,
    check_guidance_scale,
    guided,
    low_pass,
    resize_factor_at,
    strength,
    three_pass,
)

WAN = dict(use_low_pass_guidance=True, lp_filter_type="down_up", lp_filter_in_latent=True, lp_resize_factor=0.4,
           lp_strength_schedule_type="interval", schedule_interval_start_time=0.0, schedule_interval_end_time=0.20)
COGVIDEOX = dict(WAN, lp_resize_factor=0.25, schedule_interval_end_time=0.04)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------------- schedules

def test_interval_presets_activate_the_first_steps():
    wan, cog = ALGConfig.from_dict(WAN), ALGConfig.from_dict(COGVIDEOX)
    assert [strength(wan, i, 50) for i in range(50)] == [1.0] * 10 + [0.0] * 40  # u(9) = 0.184, u(10) = 0.204
    assert [strength(cog, i, 50) for i in range(50)] == [1.0] * 2 + [0.0] * 48  # u(1) = 0.0204, u(2) = 0.0408


def test_interval_boundaries_are_inclusive():
    cfg = ALGConfig(lp_strength_schedule_type="interval", schedule_interval_start_time=0.25,
                    schedule_interval_end_time=0.5)
    assert [strength(cfg, i, 5) for i in range(5)] == [0.0, 1.0, 1.0, 0.0, 0.0]  # u = 0, .25, .5, .75, 1
    assert strength(cfg, 0, 1) == 0.0  # one step: u = 0, before the interval
    assert strength(ALGConfig(lp_strength_schedule_type="interval"), 0, 1) == 1.0


def test_linear_schedule():
    cfg = ALGConfig(lp_strength_schedule_type="linear", schedule_linear_start_weight=1.0,
                    schedule_linear_end_weight=0.2, schedule_linear_end_time=0.5)
    got = [strength(cfg, i, 11) for i in (0, 2, 4, 5, 10)]  # u = 0, .2, .4, .5, 1
    assert got == pytest.approx([1.0, 0.6 + 0.2 * 0.4, 0.2 + 0.2 * 0.8, 0.2, 0.2], abs=1e-15)
    assert strength(cfg, 0, 1) == 1.0
    for end_time in (0.0, -0.5):  # end_time <= 0: the start weight at every step
        flat = ALGConfig(lp_strength_schedule_type="linear", schedule_linear_start_weight=0.7,
                         schedule_linear_end_time=end_time)
        assert [strength(flat, i, 4) for i in range(4)] == [0.7] * 4


def test_exponential_and_none_schedules():
    cfg = ALGConfig(lp_strength_schedule_type="exponential", schedule_exp_decay_rate=10.0)
    assert [strength(cfg, i, 11) for i in (0, 1, 5)] == pytest.approx([1.0, math.exp(-1), math.exp(-5)], rel=1e-15)
    negative = ALGConfig(lp_strength_schedule_type="exponential", schedule_exp_decay_rate=-10.0)
    assert strength(negative, 1, 11) == pytest.approx(math.exp(-1), rel=1e-15)
    assert strength(cfg, 0, 1) == 1.0
    assert [strength(ALGConfig(), i, 3) for i in range(3)] == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------------- parameters

def test_filter_parameters_follow_the_strength():
    cfg = ALGConfig(lp_resize_factor=0.4, lp_blur_sigma=15.0)
    assert resize_factor_at(cfg, 1.0) == pytest.approx(0.4) and resize_factor_at(cfg, 0.5) == pytest.approx(0.7)
    assert resize_factor_at(cfg, 0.0) == 1.0
    assert blur_sigma_at(cfg, 0.5) == 7.5 and blur_sigma_at(cfg, 0.0) == 0.0


def test_kernel_size_float_int_scheduled():
    fraction = ALGConfig(lp_blur_kernel_size=0.02734375)
    assert blur_kernel_size_at(fraction, 0.5, 480) == 13  # int(13.125) = 13, not scheduled
    assert blur_kernel_size_at(fraction, 1.0, 60) == 1  # int(1.64): a 60-row latent gets a 1-tap kernel
    scheduled = ALGConfig(lp_blur_kernel_size=0.02734375, schedule_blur_kernel_size=True)
    assert blur_kernel_size_at(scheduled, 0.5, 480) == 7  # int(6.5625) = 6, even -> 7
    pixels = ALGConfig(lp_blur_kernel_size=9)
    assert blur_kernel_size_at(pixels, 0.5, 480) == 9
    assert blur_kernel_size_at(ALGConfig(lp_blur_kernel_size=8), 1.0, 480) == 9  # even -> odd
    pixels_scheduled = ALGConfig(lp_blur_kernel_size=9, schedule_blur_kernel_size=True)
    assert blur_kernel_size_at(pixels_scheduled, 0.5, 480) == 5  # int(4.5) = 4 pixels, even -> 5 (not 0.5 * H)
    assert blur_kernel_size_at(pixels_scheduled, 0.05, 480) == 1  # int(0.45) = 0 -> at least 1


# ---------------------------------------------------------------------------------------------------- down_up

def test_down_up_matches_two_interpolations_with_python_rounding():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    cfg = ALGConfig(lp_filter_type="down_up", lp_resize_factor=0.5)
    # round(2.5) = 2 and round(3.5) = 4 (round half to even, as the reference's Python round)
    small = F.interpolate(x, size=(2, 4), mode="bilinear", antialias=True, align_corners=False)
    want = F.interpolate(small, size=(5, 7), mode="bilinear", antialias=True, align_corners=False)
    got = low_pass(x, cfg, 1.0)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert max_rel_err(got, want) <= 1e-6
    # at half strength r_i = 0.75: sizes round(3.75) = 4, round(5.25) = 5
    small = F.interpolate(x, size=(4, 5), mode="bilinear", antialias=True, align_corners=False)
    want = F.interpolate(small, size=(5, 7), mode="bilinear", antialias=True, align_corners=False)
    assert max_rel_err(low_pass(x, cfg, 0.5), want) <= 1e-6


def test_down_up_tiny_size_is_at_least_one_pixel():
    x = torch.arange(8.0).view(1, 1, 2, 4)
    cfg = ALGConfig(lp_filter_type="down_up", lp_resize_factor=0.2)  # round(0.4) = 0 -> 1, round(0.8) = 1
    got = low_pass(x, cfg, 1.0)
    assert torch.allclose(got, torch.full_like(x, 3.5))  # one pixel: the mean of all eight, spread back


def test_down_up_keeps_constants_and_is_a_noop_at_zero_strength():
    cfg = ALGConfig(lp_filter_type="down_up", lp_resize_factor=0.25)
    x = torch.full((1, 20, 3, 12, 16), 0.75)
    assert (low_pass(x, cfg, 1.0) - 0.75).abs().max() <= 1e-6
    noise = torch.randn(1, 2, 12, 16)
    assert low_pass(noise, cfg, 0.0) is noise
    assert low_pass(noise, ALGConfig(lp_filter_type="none"), 1.0) is noise
    assert not torch.allclose(low_pass(noise, cfg, 1.0), noise)  # it does filter


@pytest.mark.parametrize("filter_type", ["down_up", "gaussian_blur"])
def test_five_d_input_equals_per_slice_four_d(filter_type):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 16, 12)  # (B, C, F, H, W)
    cfg = ALGConfig(lp_filter_type=filter_type, lp_resize_factor=0.4, lp_blur_sigma=2.0, lp_blur_kernel_size=5)
    got = low_pass(x, cfg, 1.0)
    for f in range(4):  # the same numbers up to the conv/resize kernels' batch-dependent summation order
        assert max_rel_err(got[:, :, f], low_pass(x[:, :, f], cfg, 1.0)) <= 1e-6
    assert max_rel_err(got[0, 1, 2], low_pass(x[0, 1, 2], cfg, 1.0)) <= 1e-6  # a single (H, W) plane
    assert max_rel_err(got[0, 1, 2], low_pass(x[0, 1, 3], cfg, 1.0)) > 0.1  # and slices do not mix


def test_bf16_input_is_filtered_in_float32():
    torch.manual_seed(2)
    x = torch.randn(1, 4, 16, 16).bfloat16()
    cfg = ALGConfig(lp_filter_type="down_up", lp_resize_factor=0.4)
    got = low_pass(x, cfg, 1.0)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, low_pass(x.float(), cfg, 1.0).bfloat16())


# ---------------------------------------------------------------------------------------------------- gaussian

def numpy_blur(x: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """Direct 2-D convolution with the outer-product kernel, reflect padding, float64."""
    taps = np.linspace(-(k - 1) / 2, (k - 1) / 2, k)
    g = np.exp(-0.5 * (taps / sigma) ** 2)
    g /= g.sum()
    kernel = np.outer(g, g)
    p = k // 2
    out = np.zeros_like(x, dtype=np.float64)
    for plane in np.ndindex(x.shape[:-2]):
        padded = np.pad(x[plane].astype(np.float64), p, mode="reflect")
        for r in range(x.shape[-2]):
            for c in range(x.shape[-1]):
                out[plane + (r, c)] = (padded[r:r + k, c:c + k] * kernel).sum()
    return out


def test_gaussian_blur_matches_hand_built_kernel():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 11)
    cfg = ALGConfig(lp_filter_type="gaussian_blur", lp_blur_sigma=1.5, lp_blur_kernel_size=5)
    got = low_pass(x, cfg, 1.0)
    assert got.shape == x.shape
    err = max_rel_err(got, torch.from_numpy(numpy_blur(x.numpy(), 5, 1.5)))
    assert err <= 1e-5, err
    # half strength: sigma 0.75, the kernel size stays 5 (not scheduled)
    err = max_rel_err(low_pass(x, cfg, 0.5), torch.from_numpy(numpy_blur(x.numpy(), 5, 0.75)))
    assert err <= 1e-5, err


def test_gaussian_float_kernel_size_uses_height_and_even_becomes_odd():
    torch.manual_seed(4)
    x = torch.randn(1, 2, 10, 16)  # H = 10, W = 16
    fraction = ALGConfig(lp_filter_type="gaussian_blur", lp_blur_sigma=2.0, lp_blur_kernel_size=0.3)
    want = torch.from_numpy(numpy_blur(x.numpy(), 3, 2.0))  # int(0.3 * 10) = 3 (the width would give 5)
    assert max_rel_err(low_pass(x, fraction, 1.0), want) <= 1e-5
    even = ALGConfig(lp_filter_type="gaussian_blur", lp_blur_sigma=2.0, lp_blur_kernel_size=4)
    want = torch.from_numpy(numpy_blur(x.numpy(), 5, 2.0))  # 4 -> 5
    assert max_rel_err(low_pass(x, even, 1.0), want) <= 1e-5
    assert ALGConfig.from_dict({"lp_blur_kernel_size": 4}).lp_blur_kernel_size == 4  # int kept as int
    assert isinstance(ALGConfig.from_dict({"lp_blur_kernel_size": 1.0}).lp_blur_kernel_size, float)


def test_gaussian_zero_sigma_is_a_noop():
    x = torch.randn(1, 1, 8, 8)
    assert low_pass(x, ALGConfig(lp_filter_type="gaussian_blur", lp_blur_sigma=0.0), 1.0) is x
    assert low_pass(x, ALGConfig(lp_filter_type="gaussian_blur", lp_blur_sigma=3.0), 0.0) is x


# ---------------------------------------------------------------------------------------------------- config

def test_defaults_and_nulls():
    cfg = ALGConfig.from_dict(None)
    assert cfg == ALGConfig() and not cfg.enabled
    assert (cfg.lp_filter_type, cfg.lp_resize_factor, cfg.schedule_interval_end_time) == ("none", 0.25, 0.05)
    assert ALGConfig.from_dict({"lp_blur_sigma": None, "lp_filter_type": None}) == ALGConfig()
    cfg = ALGConfig.from_dict({"lp_blur_sigma": 3, "schedule_exp_decay_rate": -2})  # ints accepted for floats
    assert isinstance(cfg.lp_blur_sigma, float) and cfg.lp_blur_sigma == 3.0


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean lp_resize_factor"):
        ALGConfig.from_dict({"lp_resize_facor": 0.4})
    with pytest.raises(ValueError, match="'xyzzy'"):
        ALGConfig.from_dict({"xyzzy": 1})


@pytest.mark.parametrize("key, value", [
    ("lp_blur_sigma", "15"),  # a string for a float
    ("lp_resize_factor", True),  # a bool for a number
    ("use_low_pass_guidance", 1.0),  # a float for a bool
    ("lp_filter_in_latent", "yes"),
    ("lp_filter_type", 3),
    ("lp_resize_factor", 0.0),
    ("lp_resize_factor", 1.5),
    ("lp_blur_sigma", -1.0),
    ("lp_blur_sigma", float("nan")),
    ("lp_blur_kernel_size", 0),
    ("lp_blur_kernel_size", -3),
    ("lp_blur_kernel_size", 0.0),
    ("lp_blur_kernel_size", 9.0),  # a float is a fraction of the height
    ("lp_filter_type", "box_blur"),
    ("lp_strength_schedule_type", "cosine"),
    ("schedule_linear_start_weight", 1.5),
])
def test_bad_values_name_key_and_value(key, value):
    with pytest.raises(ValueError) as info:
        ALGConfig.from_dict({key: value})
    message = str(info.value)
    assert key in message and repr(value) in message and "\n" not in message


def test_interval_start_after_end_is_refused():
    with pytest.raises(ValueError, match="schedule_interval_start_time"):
        ALGConfig.from_dict({"schedule_interval_start_time": 0.5, "schedule_interval_end_time": 0.2})
    with pytest.raises(ValueError, match="mapping"):
        ALGConfig.from_dict([("lp_blur_sigma", 1.0)])


def test_enabled_follows_the_switch_alone_as_the_reference_does():
    assert ALGConfig.from_dict(WAN).enabled
    assert not ALGConfig.from_dict(dict(WAN, use_low_pass_guidance=False)).enabled
    # a filter that does nothing still runs the reference's three-pass steps
    assert ALGConfig.from_dict(dict(WAN, lp_filter_type="none")).enabled
    assert ALGConfig.from_dict(dict(WAN, lp_resize_factor=1.0)).enabled
    assert three_pass(ALGConfig.from_dict(dict(WAN, lp_resize_factor=1.0)), 1.0, "wan")


def test_guidance_scale_check():
    with pytest.raises(ValueError, match="ALG needs classifier-free guidance: guidance_scale must be > 1"):
        check_guidance_scale(ALGConfig.from_dict(WAN), 1.0)
    check_guidance_scale(ALGConfig.from_dict(WAN), 1.5)
    check_guidance_scale(ALGConfig(), 1.0)  # ALG off: anything goes


# ---------------------------------------------------------------------------------------------------- guidance

def test_guided_cfg_and_alg_on_numbers():
    uncond, cond, uncond_lp = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]), torch.tensor([2.0, 1.0])
    assert torch.equal(guided(uncond, cond, 5.0), torch.tensor([11.0, 10.5]))  # 1 + 5 (3 - 1), -2 + 5 (0.5 + 2)
    assert torch.equal(guided(uncond, cond, 5.0, uncond_lp), torch.tensor([6.0, -4.5]))  # 1 + 5 (3 - 2), ...


def test_three_pass_family_rules():
    wan_exp = ALGConfig.from_dict(dict(WAN, lp_strength_schedule_type="exponential"))
    steps = [strength(wan_exp, i, 50) for i in range(50)]
    assert all(three_pass(wan_exp, s, "wan") for s in steps)  # Wan: every exponential step has s != 0
    cog = [three_pass(wan_exp, s, "cogvideox") for s in steps]  # exp(-10 u) < 0.1 once u > 0.2303, i >= 12
    assert cog == [True] * 12 + [False] * 38
    assert three_pass(wan_exp, 0.1, "cogvideox") and not three_pass(wan_exp, 0.0999, "cogvideox")
    interval = ALGConfig.from_dict(WAN)
    for family in ("wan", "cogvideox"):
        assert three_pass(interval, 1.0, family) and not three_pass(interval, 0.0, family)
        assert not three_pass(ALGConfig.from_dict(dict(WAN, use_low_pass_guidance=False)), 1.0, family)
    linear = ALGConfig.from_dict(dict(WAN, lp_strength_schedule_type="linear"))
    assert three_pass(linear, 0.05, "cogvideox")  # the s < 0.1 cut is only for exponential
    with pytest.raises(ValueError, match="hunyuan"):
        three_pass(interval, 1.0, "hunyuan")
