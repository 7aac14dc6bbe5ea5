"""minialg.sampling against diffusers' UniPCMultistepScheduler and FlowMatchEulerDiscreteScheduler."""

import json
import math

import numpy as np
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from minialg.sampling import FlowEuler, UniPC, make_solver

WAN_SCHEDULER = (Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "Wan2.1-I2V-14B-480P-Diffusers/scheduler/scheduler_config.json")
COGVIDEOX_SCHEDULER = (Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "CogVideoX-5b-I2V/scheduler/scheduler_config.json")
STEPS = [1, 2, 3, 10, 50]


@pytest.fixture(scope="module")
def wan_config() -> dict:
    return json.loads(WAN_SCHEDULER.read_text())


def pseudo_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the DiT: a smooth velocity field that depends on x and t."""
    return torch.sin(1.7 * x.float() + t.float() / 300) - 0.3 * x.float() + 0.1 * torch.cos(t.float() / 70)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run_both(ours, reference, steps: int, x_dtype=torch.float32, v_dtype=torch.float32):
    """Step both solvers with the same model outputs (computed on the reference trajectory); return the
    trajectories (every intermediate sample)."""
    torch.manual_seed(0)
    x_ref = torch.randn(2, 4, 3, 5, 6).to(x_dtype)  # (B, C, F, H, W)
    x_ours = x_ref.clone()
    ours_path, ref_path = [], []
    for i, t in enumerate(reference.timesteps):
        v = pseudo_model(x_ref, t).to(v_dtype)
        x_ref = reference.step(v, t, x_ref, return_dict=False)[0]
        x_ours = ours.step(v, i, x_ours)
        ref_path.append(x_ref)
        ours_path.append(x_ours)
    assert len(ours_path) == steps
    return ours_path, ref_path


UNIPC_VARIANTS = {
    "real": {},
    "bh1_sigma_min": {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "sigma_min": {"final_sigmas_type": "sigma_min"},
    "order1": {"solver_order": 1},
    "order3": {"solver_order": 3},
    "order3_bh1_sigma_min": {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "no_lower_order_final": {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    "disable_corrector": {"disable_corrector": [0, 2, 5]},
    "trailing_spacing": {"timestep_spacing": "trailing"},  # no effect with flow sigmas
}


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(UNIPC_VARIANTS))
def test_unipc_matches_diffusers(wan_config, variant, steps):
    config = {**wan_config, **UNIPC_VARIANTS[variant]}
    reference = UniPCMultistepScheduler.from_config(config)
    reference.set_timesteps(steps)
    ours = UniPC.from_config(config, steps)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert torch.equal(ours.sigmas, reference.sigmas)
    ours_path, ref_path = run_both(ours, reference, steps)
    for i, (a, b) in enumerate(zip(ours_path, ref_path)):
        assert rel_err(a, b) <= 1e-5, (variant, steps, i, rel_err(a, b))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("flow_shift", [1.0, 3.0, 5.0, 7.3])
def test_unipc_flow_shift_override(wan_config, flow_shift, steps):
    reference = UniPCMultistepScheduler.from_config({**wan_config, "flow_shift": flow_shift})
    reference.set_timesteps(steps)
    ours = UniPC.from_config(wan_config, steps, flow_shift=flow_shift)
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert torch.equal(ours.sigmas, reference.sigmas)
    ours_path, ref_path = run_both(ours, reference, steps)
    for i, (a, b) in enumerate(zip(ours_path, ref_path)):
        assert rel_err(a, b) <= 1e-5, (flow_shift, steps, i, rel_err(a, b))


def test_unipc_timesteps_many_step_counts(wan_config):
    """The int64 truncation of sigma * 1000 lands exactly on diffusers' values for every step count."""
    for flow_shift in (1.0, 3.0, 5.0):
        for steps in range(1, 201):
            reference = UniPCMultistepScheduler.from_config({**wan_config, "flow_shift": flow_shift})
            reference.set_timesteps(steps)
            ours = UniPC.from_config(wan_config, steps, flow_shift=flow_shift)
            assert torch.equal(ours.timesteps, reference.timesteps), (flow_shift, steps)
            assert torch.equal(ours.sigmas, reference.sigmas), (flow_shift, steps)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_unipc_bf16_model_output(wan_config, x_dtype):
    """bf16 velocities (the DiT in bf16) with float32 or bf16 samples: the same dtype flow as diffusers."""
    reference = UniPCMultistepScheduler.from_config(wan_config)
    reference.set_timesteps(10)
    ours = UniPC.from_config(wan_config, 10)
    ours_path, ref_path = run_both(ours, reference, 10, x_dtype=x_dtype, v_dtype=torch.bfloat16)
    for i, (a, b) in enumerate(zip(ours_path, ref_path)):
        assert a.dtype == b.dtype == x_dtype
        assert rel_err(a, b) <= 1e-5, (i, rel_err(a, b))


def test_unipc_bh1_zero_final_is_x0(wan_config):
    """bh1 with a final sigma of 0: diffusers' last step is -inf * 0 = NaN; ours returns the x0 prediction,
    the exact order-1 step to sigma 0. All earlier steps match diffusers."""
    config = {**wan_config, "solver_type": "bh1"}
    reference = UniPCMultistepScheduler.from_config(config)
    reference.set_timesteps(10)
    ours = UniPC.from_config(config, 10)
    torch.manual_seed(0)
    x_ref = torch.randn(2, 4, 3, 5, 6)
    x_ours = x_ref.clone()
    for i, t in enumerate(reference.timesteps):
        v = pseudo_model(x_ref, t)
        x_ref = reference.step(v, t, x_ref, return_dict=False)[0]
        x_in, x_ours = x_ours, ours.step(v, i, x_ours)
        if i < 9:
            assert rel_err(x_ours, x_ref) <= 1e-5, (i, rel_err(x_ours, x_ref))
    # The model's x0 prediction from the sample it was given at the last step.
    assert torch.equal(x_ours, x_in - ours.sigmas[9] * v)


def test_euler_from_unipc_config_matches_diffusers(wan_config):
    for steps in STEPS:
        for flow_shift in (None, 1.0, 3.0, 5.0):
            shift = wan_config["flow_shift"] if flow_shift is None else flow_shift
            reference = FlowMatchEulerDiscreteScheduler(shift=shift)
            reference.set_timesteps(steps)
            ours = FlowEuler.from_config(wan_config, steps, flow_shift=flow_shift)
            assert ours.timesteps.dtype == torch.float32
            assert torch.equal(ours.timesteps, reference.timesteps), (steps, shift)
            assert torch.equal(ours.sigmas, reference.sigmas), (steps, shift)
            ours_path, ref_path = run_both(ours, reference, steps)
            for i, (a, b) in enumerate(zip(ours_path, ref_path)):
                assert rel_err(a, b) <= 1e-5, (steps, shift, i, rel_err(a, b))


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_euler_from_euler_config_bf16(shift):
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(10)
    ours = FlowEuler.from_config(dict(reference.config), 10)
    assert torch.equal(ours.timesteps, reference.timesteps)
    ours_path, ref_path = run_both(ours, reference, 10, v_dtype=torch.bfloat16)
    for i, (a, b) in enumerate(zip(ours_path, ref_path)):
        assert a.dtype == b.dtype == torch.bfloat16  # diffusers casts to the model output's dtype
        assert rel_err(a, b) <= 1e-5, (i, rel_err(a, b))


def test_euler_final_sample_is_x0(wan_config):
    """The last Euler step lands on sigma 0, i.e. on the model's x0 prediction x - sigma * v."""
    solver = FlowEuler.from_config(wan_config, 4)
    x, v = torch.randn(3, 7), torch.randn(3, 7)
    expected = x - solver.sigmas[3] * v
    assert rel_err(solver.step(v, 3, x), expected) <= 1e-6
    assert solver.sigmas[-1] == 0 and math.isclose(solver.sigmas[0].item(), 1.0)


@pytest.mark.parametrize("key, value", [
    ("thresholding", True),
    ("use_karras_sigmas", True),
    ("use_exponential_sigmas", True),
    ("use_beta_sigmas", True),
    ("use_dynamic_shifting", True),
    ("use_flow_sigmas", False),
    ("prediction_type", "epsilon"),
    ("predict_x0", False),
    ("solver_type", "midpoint"),
    ("final_sigmas_type", "sigma_max"),
])
def test_unipc_rejects(wan_config, key, value):
    with pytest.raises(ValueError, match=key):
        UniPC.from_config({**wan_config, key: value}, 10)


def test_unipc_rejects_missing_flow_keys(wan_config):
    config = {k: v for k, v in wan_config.items() if k not in ("use_flow_sigmas",)}
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        UniPC.from_config(config, 10)
    with pytest.raises(ValueError, match="lower_order_final"):
        UniPC.from_config({**wan_config, "lower_order_final": False}, 10)


@pytest.mark.parametrize("key, value", [
    ("use_karras_sigmas", True),
    ("use_dynamic_shifting", True),
    ("invert_sigmas", True),
    ("stochastic_sampling", True),
    ("use_flow_sigmas", False),
])
def test_euler_rejects(key, value):
    with pytest.raises(ValueError, match=key):
        FlowEuler.from_config({**FlowMatchEulerDiscreteScheduler().config, key: value}, 10)


@pytest.mark.parametrize("steps", [2, 10])
def test_euler_default_schedule_stretched_to_shift_terminal(steps):
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1)
    reference.set_timesteps(steps)
    ours = FlowEuler.from_config(dict(reference.config), steps)
    assert torch.equal(ours.sigmas, reference.sigmas) and torch.equal(ours.timesteps, reference.timesteps)


def test_euler_rejects_cogvideox_config():
    with pytest.raises(ValueError, match="prediction_type"):
        FlowEuler.from_config(json.loads(COGVIDEOX_SCHEDULER.read_text()), 10)
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        UniPC.from_config(json.loads(COGVIDEOX_SCHEDULER.read_text()), 10)


def test_make_solver(wan_config):
    assert isinstance(make_solver("unipc", wan_config, 5), UniPC)
    assert isinstance(make_solver("euler", wan_config, 5), FlowEuler)
    assert torch.equal(make_solver("unipc", wan_config, 5, flow_shift=5.0).sigmas,
                       UniPC.from_config(wan_config, 5, flow_shift=5.0).sigmas)
    with pytest.raises(ValueError, match="dpm"):
        make_solver("dpm", wan_config, 5)
    with pytest.raises(ValueError, match="num_steps"):
        make_solver("unipc", wan_config, 0)


def test_solver_state_is_per_run(wan_config):
    """Two fresh solvers on the same inputs give identical results; the history lives in the object."""
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    a, b = UniPC.from_config(wan_config, 3), UniPC.from_config(wan_config, 3)
    xa = a.step(v, 0, x)
    assert len(a.x0_preds) == 1 and len(b.x0_preds) == 0
    assert torch.equal(xa, b.step(v, 0, x))


LTX_CONFIGS = Path(__file__).resolve().parent.parent / "minialg" / "real_configs"


@pytest.mark.parametrize("steps", [2, 3, 8, 50])
@pytest.mark.parametrize("tokens", [96, 1500, 6000])  # below, between and above base/max_image_seq_len
def test_ltx_dynamic_shift_and_terminal_stretch_equal_diffusers(steps, tokens):
    """LTX-Video 0.9.0: sigmas 1 .. 1/N, shifted by mu from the token count, stretched to shift_terminal."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx.pipeline_ltx_image2video import calculate_shift

    config = json.loads((LTX_CONFIGS / "LTX-Video" / "scheduler" / "scheduler_config.json").read_text())
    mu = calculate_shift(tokens, 1024, 4096, 0.95, 2.05)
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = make_solver("auto", config, steps, sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    assert torch.equal(ours.sigmas, reference.sigmas) and torch.equal(ours.timesteps, reference.timesteps)
    with pytest.raises(ValueError, match="mu"):
        make_solver("auto", config, steps)
    with pytest.raises(ValueError, match="at least 2 steps"):  # diffusers samples NaN there
        make_solver("auto", config, 1, sigmas=[1.0], mu=mu)


@pytest.mark.parametrize("steps", [2, 7, 40])
def test_ltx_given_timesteps_equal_diffusers(steps):
    """LTX-Video 0.9.5+: the linear-quadratic timesteps used as given, their sigmas t / 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx.pipeline_ltx_condition import linear_quadratic_schedule

    config = json.loads((LTX_CONFIGS / "LTX-Video-later" / "scheduler_0.9.5+_config_DERIVED.json").read_text())
    timesteps = linear_quadratic_schedule(steps) * 1000
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    reference.set_timesteps(steps, timesteps=timesteps)
    ours = make_solver("auto", config, steps, timesteps=timesteps.tolist())
    assert torch.equal(ours.sigmas, reference.sigmas) and torch.equal(ours.timesteps, reference.timesteps)
