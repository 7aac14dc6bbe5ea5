"""minialg.sampling's DDIM and DPM against diffusers' CogVideoXDDIMScheduler and CogVideoXDPMScheduler, driven as
CogVideoXImageToVideoPipeline's denoising loop drives them."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from minialg.sampling import DDIM, DPM, UniPC, make_solver

REAL_CONFIGS = Path(__file__).resolve().parent.parent / "minialg" / "real_configs"
STEPS = [1, 2, 3, 10, 50]

# Config variations: the real CogVideoX-5b-I2V config, the SNR shift of CogVideoX-2b (3.0, also the classes'
# default), and the other options the schedule code reads.
VARIANTS = {
    "real": {},
    "snr_shift_3": {"snr_shift_scale": 3.0},
    "snr_shift_1.5": {"snr_shift_scale": 1.5},
    "alpha_zero_final": {"set_alpha_to_one": False},
    "no_zero_snr": {"rescale_betas_zero_snr": False},
    "linear_betas": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                     "rescale_betas_zero_snr": False, "set_alpha_to_one": False},
    "leading_offset": {"timestep_spacing": "leading", "steps_offset": 1},
    "linspace": {"timestep_spacing": "linspace", "snr_shift_scale": 3.0},
}


@pytest.fixture(scope="module")
def cog_config() -> dict:
    return json.loads((REAL_CONFIGS / "CogVideoX-5b-I2V" / "scheduler" / "scheduler_config.json").read_text())


def pseudo_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the DiT, float32 like the pipeline's noise_pred.float()."""
    return torch.sin(1.7 * x.float() + t.float() / 300) - 0.3 * x.float() + 0.1 * torch.cos(t.float() / 70)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def reference_path(scheduler, steps: int, x: torch.Tensor, generator: torch.Generator | None) -> list[torch.Tensor]:
    """diffusers' scheduler stepped exactly as the CogVideoX I2V pipeline's loop does; every sample."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[:steps]  # see test_trailing_drops_spurious_timestep
    dpm = isinstance(scheduler, CogVideoXDPMScheduler)
    path, old_pred_original_sample = [], None
    for i, t in enumerate(timesteps):
        noise_pred = pseudo_model(x, t)
        if not dpm:
            x_next = scheduler.step(noise_pred, t, x, eta=0.0, generator=generator, return_dict=False)[0]
        else:
            x_next, old_pred_original_sample = scheduler.step(
                noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, x,
                eta=0.0, generator=generator, return_dict=False)
        x = x_next.to(x.dtype)  # the pipeline's latents.to(prompt_embeds.dtype)
        path.append(x)
    return path


def our_path(solver, x: torch.Tensor) -> list[torch.Tensor]:
    path = []
    for i, t in enumerate(solver.timesteps):
        x = solver.step(pseudo_model(x, t), i, x)
        path.append(x)
    return path


def start(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0)).to(dtype)  # (B, F, C, H, W)


def compare(ours: list[torch.Tensor], reference: list[torch.Tensor], steps: int, label) -> float:
    assert len(ours) == len(reference) == steps, label
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert a.dtype == b.dtype, (label, i)
        assert torch.isfinite(a).all(), (label, i)
        worst = max(worst, rel_err(a, b))
        assert rel_err(a, b) <= 1e-6, (label, i, rel_err(a, b))
    return worst


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ddim_matches_diffusers(cog_config, variant, steps):
    config = {**cog_config, **VARIANTS[variant]}
    ours = DDIM.from_config(config, steps)
    reference = CogVideoXDDIMScheduler.from_config(config)
    ref = reference_path(reference, steps, start(), torch.Generator().manual_seed(1))
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, reference.timesteps[:steps])
    compare(our_path(ours, start()), ref, steps, (variant, steps))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dpm_matches_diffusers(cog_config, variant, steps):
    config = {**cog_config, **VARIANTS[variant], "_class_name": "CogVideoXDPMScheduler"}
    ours_generator, ref_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = DPM.from_config(config, steps, ours_generator)
    reference = CogVideoXDPMScheduler.from_config(config)
    ref = reference_path(reference, steps, start(), ref_generator)
    assert torch.equal(ours.timesteps, reference.timesteps[:steps])
    compare(our_path(ours, start()), ref, steps, (variant, steps))
    # the same number of draws: the generators leave the run in the same state
    assert torch.equal(ours_generator.get_state(), ref_generator.get_state())


@pytest.mark.parametrize("name, scheduler_class", [("ddim", CogVideoXDDIMScheduler), ("dpm", CogVideoXDPMScheduler)])
def test_bf16_latents(cog_config, name, scheduler_class):
    """The real pipeline's dtypes: bf16 latents (and DPM noise), float32 model outputs, latents cast back."""
    ours = make_solver(name, cog_config, 10, generator=torch.Generator().manual_seed(3))
    ref = reference_path(scheduler_class.from_config(cog_config), 10, start(torch.bfloat16),
                         torch.Generator().manual_seed(3))
    path = our_path(ours, start(torch.bfloat16))
    assert path[-1].dtype == torch.bfloat16
    compare(path, ref, 10, name)


def test_dpm_global_rng(cog_config):
    """Without a generator DPM draws from torch's global RNG, as diffusers does."""
    torch.manual_seed(11)
    ref = reference_path(CogVideoXDPMScheduler.from_config(cog_config), 5, start(), None)
    torch.manual_seed(11)
    compare(our_path(DPM.from_config(cog_config, 5), start()), ref, 5, "global")


def test_dpm_noise_matters(cog_config):
    """The DPM trajectory depends on the generator (so the matching above is not vacuous)."""
    a = our_path(DPM.from_config(cog_config, 5, torch.Generator().manual_seed(0)), start())
    b = our_path(DPM.from_config(cog_config, 5, torch.Generator().manual_seed(1)), start())
    assert rel_err(a[2], b[2]) > 1e-2


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_every_step_count(cog_config, spacing):
    """Our timesteps equal diffusers' for every N up to num_train_timesteps."""
    config = {**cog_config, "timestep_spacing": spacing, "steps_offset": 1}
    reference = CogVideoXDDIMScheduler.from_config(config)
    for steps in range(1, 1001):
        reference.set_timesteps(steps)
        if reference.timesteps.max() >= 1000:  # leading with an offset: diffusers would index past the table
            with pytest.raises(ValueError, match="steps_offset"):
                DDIM.from_config(config, steps)
            continue
        ours = DDIM.from_config(config, steps)
        assert torch.equal(ours.timesteps, reference.timesteps[:steps]), (spacing, steps)
        assert len(reference.timesteps) == steps or reference.timesteps[steps:].tolist() == [-1], (spacing, steps)


def test_trailing_drops_spurious_timestep(cog_config):
    """For N = 61 numpy's arange gives diffusers a 62nd timestep, -1; we run the 61 real steps, which equal
    diffusers' first 61 (its 61st sample is already the fully denoised one)."""
    reference = CogVideoXDDIMScheduler.from_config(cog_config)
    reference.set_timesteps(61)
    assert len(reference.timesteps) == 62 and reference.timesteps[-1] == -1
    ours = DDIM.from_config(cog_config, 61)
    assert len(ours.timesteps) == 61 and ours.timesteps[-1] == 15
    compare(our_path(ours, start()), reference_path(reference, 61, start(), None), 61, "N=61")


def test_last_step_lands_on_x0(cog_config):
    """With set_alpha_to_one the last step of either solver returns the x0 prediction sqrt(a) x - sqrt(1 - a) v."""
    for solver in (DDIM.from_config(cog_config, 4), DPM.from_config(cog_config, 4, torch.Generator())):
        x, v = torch.randn(3, 7), torch.randn(3, 7)
        solver.last_x0 = torch.zeros(3, 7)
        alpha = solver.alphas[3]
        assert rel_err(solver.step(v, 3, x), alpha ** 0.5 * x - (1 - alpha) ** 0.5 * v) <= 1e-6


def test_steps_read_no_sample_data(cog_config):
    """A step runs on meta tensors: its coefficients live on the CPU and it never reads the sample back."""
    for name in ("ddim", "dpm"):
        solver = make_solver(name, cog_config, 5)
        x = torch.empty(2, 3, 4, device="meta", dtype=torch.bfloat16)
        for i in range(5):
            x = solver.step(torch.empty(2, 3, 4, device="meta"), i, x)
        assert x.device.type == "meta" and x.dtype == torch.bfloat16
        assert solver.timesteps.device.type == "cpu"  # dynamic CFG reads them with no device sync


def test_make_solver_auto(cog_config):
    wan_config = json.loads((REAL_CONFIGS / "Wan2.1-I2V-14B-480P-Diffusers" / "scheduler" /
                             "scheduler_config.json").read_text())
    assert type(make_solver("auto", cog_config, 5)) is DDIM
    assert type(make_solver(None, cog_config, 5)) is DDIM
    dpm_config = {**cog_config, "_class_name": "CogVideoXDPMScheduler"}
    generator = torch.Generator()
    solver = make_solver("auto", dpm_config, 5, generator=generator)
    assert type(solver) is DPM and solver.generator is generator
    assert type(make_solver("auto", wan_config, 5)) is UniPC
    assert type(make_solver("dpm", cog_config, 5)) is DPM  # the DDIM config drives DPM too, as in diffusers
    assert type(make_solver("ddim", dpm_config, 5)) is DDIM
    with pytest.raises(ValueError, match="_class_name"):
        make_solver("auto", {**cog_config, "_class_name": "DDIMScheduler"}, 5)
    with pytest.raises(ValueError, match="_class_name"):
        make_solver("auto", {k: v for k, v in cog_config.items() if k != "_class_name"}, 5)
    with pytest.raises(ValueError, match="flow_shift"):
        make_solver("auto", cog_config, 5, flow_shift=3.0)
    with pytest.raises(ValueError, match="'ddim'.*prediction_type"):
        make_solver("ddim", wan_config, 5)
    with pytest.raises(ValueError, match="'unipc'.*use_flow_sigmas"):
        make_solver("unipc", cog_config, 5)
    with pytest.raises(ValueError, match="num_steps"):
        make_solver("auto", cog_config, 0)


@pytest.mark.parametrize("key, value", [
    ("prediction_type", "epsilon"),
    ("prediction_type", "sample"),
    ("timestep_spacing", "karras"),
    ("beta_schedule", "squaredcos_cap_v2"),
    ("trained_betas", [0.01] * 1000),
])
def test_rejects(cog_config, key, value):
    for solver in ("ddim", "dpm"):
        with pytest.raises(ValueError, match=key):
            make_solver(solver, {**cog_config, key: value}, 10)


def test_rejects_more_steps_than_training(cog_config):
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DDIM.from_config(cog_config, 1001)
