"""The solvers: UniPC (Wan 2.1's default), plain Euler and LCM for flow matching; DDIM and DPM for CogVideoX.

Flow matching interpolates x = (1 - sigma) * x0 + sigma * noise, sigma running from 1 (noise) to 0 (data), and the
model predicts the velocity v = noise - x0, so x0 = x - sigma * v. CogVideoX is a DDPM-style model instead:
x = sqrt(a) * x0 + sqrt(1 - a) * noise with a = alpha_bar(t) running from 0 (noise) to 1 (data), and it predicts
v = sqrt(a) * noise - sqrt(1 - a) * x0, so x0 = sqrt(a) * x - sqrt(1 - a) * v. All solvers share one interface:

    solver = make_solver("auto", scheduler_config, num_steps, generator=generator)  # the checkpoint's own
    for i, t in enumerate(solver.timesteps):   # (N,) on the CPU, the timesteps the model is called with
        v = model(x, t)
        x = solver.step(v, i, x)               # from timesteps[i] to the next noise level

A solver holds the state of one run (UniPC and DPM remember their last predictions, DPM draws noise from the run's
generator): make a new one per run.

The numerics follow diffusers' UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler, CogVideoXDDIMScheduler and
CogVideoXDPMScheduler op for op: schedules in float64 (numpy there, Python floats here) or in the tensor dtype
diffusers uses; step coefficients as 0-dim tensors on the CPU, which PyTorch treats as scalars on any device, so a
step never waits for the GPU; sample-sized arithmetic in the sample's dtype.
"""

import math

import torch


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy.linspace in float64, bit for bit: k * step + start, the last point exactly stop."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [k * step + start for k in range(num - 1)] + [stop]


def _shift(sigma: float, shift: float) -> float:
    """The flow shift: with shift > 1 more of the steps are spent at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _require(config: dict, key: str, allowed: tuple, default) -> None:
    """Reject a scheduler config whose `key` (or its default when absent) we cannot reproduce."""
    value = config.get(key, default)
    if value not in allowed:
        raise ValueError(f"scheduler config {key}={value!r} is not supported (supported: {allowed})")


# Options of diffusers' schedulers that change the schedule or the update in ways we do not reproduce.
_UNSUPPORTED_OPTIONS = ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                        "use_dynamic_shifting", "shift_terminal")


class UniPC:
    """UniPC multistep solver (Zhao et al. 2023, arXiv:2302.04867) on flow sigmas, in its x0-predicting form.

    It works in lambda = log(alpha / sigma), alpha = 1 - sigma. A step from sigma_s to sigma_t of size h = lambda_t -
    lambda_s is the exponential-integrator update on the x0 predictions m_s, m_{s-1}, ...:

        x_t = sigma_t / sigma_s * x_s - alpha_t * (e^-h - 1) * m_s - alpha_t * B(h) * sum_k rho_k * D_k,

    with divided differences D_k = (m_{s-k} - m_s) / r_k, r_k = (lambda_{s-k} - lambda_s) / h, and the rho_k from
    a small Vandermonde system in the r_k (0.5 when there is a single one). B(h) = -h ("bh1") or e^-h - 1 ("bh2").
    Each step first corrects (UniC) the sample it is given, redoing the previous update with the new model output
    as one more difference, then predicts (UniP) the next sample from the last `order` x0 predictions.
    """

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor, order: int = 2, solver_type: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: tuple[int, ...] = ()):
        self.sigmas = sigmas  # (N + 1,) float32 on the CPU, from ~1 down to 0 (or sigma_min)
        self.timesteps = timesteps  # (N,) int64, what the model sees
        self.order = order
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final  # use order 1 on the last step(s)
        self.disable_corrector = set(disable_corrector)  # steps whose result is not corrected
        self.x0_preds: list[torch.Tensor] = []  # the last `order` x0 predictions, newest last
        self.last_sample: torch.Tensor | None = None  # the sample the last prediction started from
        self.last_order = 0

    @classmethod
    def from_config(cls, config: dict, num_steps: int, flow_shift: float | None = None) -> "UniPC":
        """Build from a UniPCMultistepScheduler config (scheduler/scheduler_config.json)."""
        _require(config, "use_flow_sigmas", (True,), False)
        _require(config, "prediction_type", ("flow_prediction",), "epsilon")
        _require(config, "predict_x0", (True,), True)
        _require(config, "solver_type", ("bh1", "bh2"), "bh2")
        _require(config, "final_sigmas_type", ("zero", "sigma_min"), "zero")
        _require(config, "solver_p", (None,), None)
        for key in _UNSUPPORTED_OPTIONS:
            _require(config, key, (False, None), None)
        order, final = config.get("solver_order", 2), config.get("final_sigmas_type", "zero")
        if order > 1 and not config.get("lower_order_final", True) and final == "zero":
            raise ValueError("scheduler config lower_order_final=False with final_sigmas_type='zero' is not "
                             "supported (a multistep last step to sigma 0 divides by zero)")
        # timestep_spacing and steps_offset have no effect with flow sigmas.
        shift = config.get("flow_shift", 1.0) if flow_shift is None else flow_shift
        n_train = config.get("num_train_timesteps", 1000)
        sigmas = [_shift(s, shift) for s in _linspace(1, 1 / n_train, num_steps + 1)[:-1]]
        if abs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6  # keeps log(alpha) finite on the first step
        timesteps = torch.tensor([int(s * n_train) for s in sigmas], dtype=torch.int64)  # truncated
        sigmas.append(sigmas[-1] if final == "sigma_min" else 0.0)
        return cls(torch.tensor(sigmas, dtype=torch.float32), timesteps, order,
                   config.get("solver_type", "bh2"), config.get("lower_order_final", True),
                   tuple(config.get("disable_corrector", ())))

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Correct x (at sigmas[i]) with the new model output, then predict the sample at sigmas[i + 1]."""
        x0 = x - self.sigmas[i] * velocity  # the model's x0 prediction
        if self.last_sample is not None and i - 1 not in self.disable_corrector:
            newest_first = self.x0_preds[::-1][:self.last_order]
            x = self._update(self.last_sample, i - 1, i, newest_first, x0_target=x0)
        self.x0_preds = (self.x0_preds + [x0])[-self.order:]
        order = min(self.order, len(self.x0_preds))  # lower orders while the history fills up
        if self.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        self.last_sample, self.last_order = x, order
        return self._update(x, i, i + 1, self.x0_preds[::-1][:order])

    def _lambda(self, k: int) -> torch.Tensor:
        """log(alpha / sigma) at sigmas[k], a 0-dim float32 tensor."""
        sigma = self.sigmas[k]
        return torch.log(1 - sigma) - torch.log(sigma)

    def _update(self, x: torch.Tensor, s: int, t: int, x0s: list[torch.Tensor],
                x0_target: torch.Tensor | None = None) -> torch.Tensor:
        """Move x from sigmas[s] to sigmas[t] given the x0 predictions x0s[k] at sigmas[s - k].

        The predictor uses len(x0s) - 1 differences; the corrector (x0_target given, the prediction at sigmas[t])
        adds x0_target - x0s[0] as one more.
        """
        sigma_s, sigma_t = self.sigmas[s], self.sigmas[t]
        alpha_t = 1 - sigma_t
        h = self._lambda(t) - self._lambda(s)
        rks = [(self._lambda(s - k) - self._lambda(s)) / h for k in range(1, len(x0s))]
        diffs = [(x0s[k] - x0s[0]) / rk for k, rk in enumerate(rks, start=1)]
        if x0_target is not None:
            rks.append(torch.ones(()))
            diffs.append(x0_target - x0s[0])
        hh = -h
        h_phi_1 = torch.expm1(hh)  # e^-h - 1
        b_h = hh if self.solver_type == "bh1" else torch.expm1(hh)

        x_t = sigma_t / sigma_s * x - alpha_t * h_phi_1 * x0s[0]
        if len(diffs) == 0:
            return x_t.to(x.dtype)
        if len(diffs) == 1:
            rhos = torch.ones(1, dtype=x.dtype) * 0.5
        else:
            # Order conditions: sum_k rho_k r_k^(j-1) = b_j, b_j = j! h phi_{j+1}(-h) / B(h), with the
            # phi-function recursion h phi_{j+1} = h phi_j / hh - 1 / j!.
            b, factorial, h_phi_k = [], 1, h_phi_1 / hh - 1
            for j in range(1, len(rks) + 1):
                b.append(h_phi_k * factorial / b_h)
                factorial *= j + 1
                h_phi_k = h_phi_k / hh - 1 / factorial
            vandermonde = torch.stack([torch.stack(rks) ** j for j in range(len(rks))])  # (K, K)
            rhos = torch.linalg.solve(vandermonde, torch.stack(b)).to(x.dtype)
        residual = sum(rho * d for rho, d in zip(rhos[:-1], diffs[:-1]))
        residual = residual + rhos[-1] * diffs[-1]
        x_t = x_t - alpha_t * b_h * residual
        return x_t.to(x.dtype)


class FlowEuler:
    """Euler's method on the flow ODE dx/dsigma = v: x_next = x + (sigma_next - sigma) * v."""

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        self.sigmas = sigmas  # (N + 1,) float32 on the CPU, from 1 down to 0
        self.timesteps = timesteps  # (N,) float32, sigma * num_train_timesteps

    @classmethod
    def from_config(cls, config: dict, num_steps: int, flow_shift: float | None = None,
                    sigmas: list[float] | None = None, timesteps: list[float] | None = None,
                    mu: float | None = None) -> "FlowEuler":
        """Build from a FlowMatchEulerDiscreteScheduler config (key `shift`), or from a flow UniPC config (key
        `flow_shift`); flow_shift overrides either. A pipeline may give its own schedule, as diffusers'
        set_timesteps takes it: `sigmas`, the num_steps unshifted noise levels (HunyuanVideo-I2V, LTX-Video 0.9.0:
        1 down to 1/N), or `timesteps`, used as given (LTX-Video 0.9.5+), their sigmas t / T. Given levels are
        shifted in float32: by the flow shift, or, where the config says use_dynamic_shifting, by `mu` (LTX-Video
        0.9.0 computes it from the token count): sigma -> e^mu / (e^mu + 1 / sigma - 1). A config's
        shift_terminal then stretches them so that 1 - sigma scales and the last one lands on shift_terminal."""
        _require(config, "use_flow_sigmas", (True,), True)
        _require(config, "prediction_type", ("flow_prediction",), "flow_prediction")
        _require(config, "time_shift_type", ("exponential",), "exponential")
        for key in _UNSUPPORTED_OPTIONS + ("invert_sigmas", "stochastic_sampling"):
            if key not in ("use_dynamic_shifting", "shift_terminal"):
                _require(config, key, (False, None), None)
        dynamic = bool(config.get("use_dynamic_shifting"))
        if dynamic and (mu is None or (sigmas is None and timesteps is None)):
            raise ValueError("this scheduler config shifts by the token count (use_dynamic_shifting): its pipeline "
                             "must give the sigmas and mu")
        if flow_shift is None:
            flow_shift = config.get("flow_shift", config.get("shift", 1.0))
        n_train = config.get("num_train_timesteps", 1000)
        given_t = None if timesteps is None else torch.tensor(timesteps, dtype=torch.float64).float()
        if sigmas is None and timesteps is None:
            shifted = cls.default_sigmas(num_steps, flow_shift, n_train)
        else:
            given = given_t / n_train if sigmas is None else torch.tensor(sigmas, dtype=torch.float64).float()
            if len(given) != num_steps:
                raise ValueError(f"{len(given)} {'sigmas' if sigmas is not None else 'timesteps'} for {num_steps} "
                                 "steps")
            if dynamic:  # float32 throughout, as numpy there
                e_mu = torch.tensor(math.exp(mu), dtype=torch.float32)
                shifted = e_mu / (e_mu + (1 / given - 1))
            else:
                shifted = flow_shift * given / (1 + (flow_shift - 1) * given)
        terminal = config.get("shift_terminal")
        if terminal:
            if shifted[-1] == 1:  # diffusers divides 0 by 0 here and samples NaN
                raise ValueError("a schedule stretched to shift_terminal needs a last noise level below 1 "
                                 "(at least 2 steps)")
            one_minus = 1 - shifted
            shifted = 1 - one_minus / (one_minus[-1] / (1 - terminal))
        shifted = shifted.float()
        return cls(torch.cat([shifted, torch.zeros(1)]), shifted * n_train if given_t is None else given_t)

    @staticmethod
    def default_sigmas(num_steps: int, flow_shift: float, n_train: int) -> torch.Tensor:
        """diffusers' own schedule: shift the ends of the training schedule (in float32), space the steps linearly
        between them, and shift the result again; (N,)."""
        ends = torch.tensor([n_train, 1.0]) / n_train
        sigma_max, sigma_min = (flow_shift * ends / (1 + (flow_shift - 1) * ends)).tolist()
        sigmas = [_shift(t / n_train, flow_shift)
                  for t in _linspace(sigma_max * n_train, sigma_min * n_train, num_steps)]
        return torch.tensor(sigmas, dtype=torch.float64)  # float64 up to a shift_terminal stretch, as numpy there

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The sample at sigmas[i + 1], in float32 then cast to the velocity's dtype (as diffusers does)."""
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (x.float() + dt * velocity).to(velocity.dtype)


class FlowLCM(FlowEuler):
    """The consistency step of lightx2v's step-distilled Wan 2.1 (their WanStepDistillScheduler; ComfyUI's "lcm"
    sampler, diffusers' FlowMatchLCMScheduler): predict x0 = x - sigma * v, then noise it afresh to the next level,
    x_next = (1 - sigma_next) * x0 + sigma_next * noise, the noise drawn from the run's generator (none after the last
    step). Its schedule is FlowEuler's."""

    generator: torch.Generator | None = None

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        x0, sigma_next = x.float() - self.sigmas[i] * velocity.float(), self.sigmas[i + 1]
        if i + 1 == len(self.timesteps):
            return x0.to(velocity.dtype)
        noise = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=torch.float32)
        return ((1 - sigma_next) * x0 + sigma_next * noise).to(velocity.dtype)


def _cogvideox_alphas(config: dict) -> torch.Tensor:
    """alpha_bar(t) for t = 0 .. T-1 of CogVideoX's DDPM schedule, in diffusers' dtype: float64 for scaled_linear
    betas, float32 for linear ones. SNR-shifted as in SD3 (alpha_bar / (s + (1 - s) * alpha_bar)), then optionally
    rescaled to zero terminal SNR (Lin et al. 2023, arXiv:2305.08891): sqrt(alpha_bar) shifted so its last value is
    0 and scaled so its first value stays put."""
    _require(config, "beta_schedule", ("scaled_linear", "linear"), "scaled_linear")
    _require(config, "trained_betas", (None,), None)
    n_train = config.get("num_train_timesteps", 1000)
    beta_start, beta_end = config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
    if config.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n_train, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(beta_start, beta_end, n_train, dtype=torch.float32)
    alphas = torch.cumprod(1.0 - betas, dim=0)
    shift = config.get("snr_shift_scale", 3.0)
    alphas = alphas / (shift + (1 - shift) * alphas)
    if config.get("rescale_betas_zero_snr", False):
        root = alphas.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        alphas = root ** 2
    return alphas


def _cogvideox_timesteps(config: dict, num_steps: int) -> list[int]:
    """The N inference timesteps, from high noise to low, as diffusers' set_timesteps spaces them.

    "trailing" is round(T - k * T / N) - 1 in numpy.arange's arithmetic. For some N (61, 103, ...) numpy's
    arange also yields a last point ~1e-13 from 0, which diffusers keeps as a spurious extra timestep -1 (a step
    from the fully denoised sample back to alpha_bar(T - 1) = 0); we drop it and keep the N real steps.
    """
    _require(config, "timestep_spacing", ("trailing", "leading", "linspace"), "leading")
    n_train, spacing = config.get("num_train_timesteps", 1000), config.get("timestep_spacing", "leading")
    if num_steps > n_train:
        raise ValueError(f"num_steps={num_steps} exceeds the scheduler config's num_train_timesteps={n_train}")
    if spacing == "trailing":
        start = float(n_train)
        delta = (start - n_train / num_steps) - start  # numpy.arange fills start + k * delta
        return [round(start + k * delta) - 1 for k in range(num_steps)]
    if spacing == "leading":
        stride, offset = n_train // num_steps, config.get("steps_offset", 0)
        if (num_steps - 1) * stride + offset >= n_train:
            raise ValueError(f"scheduler config steps_offset={offset} puts the first of {num_steps} steps past "
                             f"num_train_timesteps={n_train}")
        return [k * stride + offset for k in reversed(range(num_steps))]
    return [round(t) for t in reversed(_linspace(0, n_train - 1, num_steps))]


def _cogvideox_schedule(config: dict, num_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bool]]:
    """What CogVideoX's DDIM and DPM step between: (timesteps (N,) int64, alpha_bar at each (N,), alpha_bar at the
    step's target (N,), whether that target is the final one).

    The target of a step from t is t - T // N (diffusers' "previous timestep"), not the next inference timestep:
    the two can differ (by one with trailing spacing where T / N is not an integer). Below 0 the target is the
    final alpha_bar: 1 (set_alpha_to_one) or alpha_bar(0).
    """
    _require(config, "prediction_type", ("v_prediction",), "epsilon")
    alphas = _cogvideox_alphas(config)
    final = torch.tensor(1.0, dtype=alphas.dtype) if config.get("set_alpha_to_one", True) else alphas[0]
    timesteps = _cogvideox_timesteps(config, num_steps)
    targets = [t - config.get("num_train_timesteps", 1000) // num_steps for t in timesteps]
    alphas_next = torch.stack([alphas[s] if s >= 0 else final for s in targets])
    return (torch.tensor(timesteps, dtype=torch.int64), alphas[timesteps], alphas_next, [s < 0 for s in targets])


class DDIM:
    """Deterministic DDIM (Song et al. 2020, arXiv:2010.02502) on v-predictions, as CogVideoX runs it.

    From alpha_bar a to a' it keeps the x0 prediction and rescales the noise part:

        x' = sqrt(a') * x0 + sqrt(1 - a') * eps = A * x + (sqrt(a') - sqrt(a) * A) * x0,  A = sqrt((1 - a') / (1 - a)).
    """

    def __init__(self, timesteps: torch.Tensor, alphas: torch.Tensor, alphas_next: torch.Tensor):
        self.timesteps = timesteps  # (N,) int64 on the CPU, what the model sees
        self.alphas = alphas  # (N,) alpha_bar at each timestep, on the CPU
        self.alphas_next = alphas_next  # (N,) alpha_bar each step lands on

    @classmethod
    def from_config(cls, config: dict, num_steps: int) -> "DDIM":
        """Build from a CogVideoXDDIMScheduler (or CogVideoXDPMScheduler) config."""
        timesteps, alphas, alphas_next, _ = _cogvideox_schedule(config, num_steps)
        return cls(timesteps, alphas, alphas_next)

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The sample at the next noise level, cast back to x's dtype."""
        alpha, alpha_next = self.alphas[i], self.alphas_next[i]
        x0 = alpha ** 0.5 * x - (1 - alpha) ** 0.5 * v
        a = ((1 - alpha_next) / (1 - alpha)) ** 0.5
        b = alpha_next ** 0.5 - alpha ** 0.5 * a
        return (a * x + b * x0).to(x.dtype)


class DPM:
    """CogVideoX's stochastic DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), on v-predictions.

    In lambda = log sqrt(a / (1 - a)), a step from a to a' of size h = lambda' - lambda is

        x' = sqrt((1 - a') / (1 - a)) * e^-h * x + sqrt(a') * (1 - e^-2h) * D + sqrt(1 - a') * sqrt(1 - e^-2h) * z,

    with z fresh Gaussian noise and D the x0 prediction m, or, from the second step on and except into the final
    alpha_bar, the multistep estimate (1 + 1 / 2r) * m - 1 / 2r * m_last, r = h_last / h. Like diffusers, a
    multistep step draws z twice (the first draw is its unused first-order update's), so the generator's state
    follows the reference draw for draw.
    """

    def __init__(self, timesteps: torch.Tensor, alphas: torch.Tensor, alphas_next: torch.Tensor,
                 to_final: list[bool], generator: torch.Generator | None = None):
        self.timesteps = timesteps  # (N,) int64 on the CPU, what the model sees
        self.alphas = alphas  # (N,) alpha_bar at each timestep, on the CPU
        self.alphas_next = alphas_next  # (N,) alpha_bar each step lands on
        self.to_final = to_final  # (N,) whether a step lands on the final alpha_bar (then first order)
        self.generator = generator  # the run's generator (None: torch's global one)
        self.last_x0: torch.Tensor | None = None  # the previous step's x0 prediction

    @classmethod
    def from_config(cls, config: dict, num_steps: int, generator: torch.Generator | None = None) -> "DPM":
        """Build from a CogVideoXDPMScheduler (or CogVideoXDDIMScheduler) config."""
        return cls(*_cogvideox_schedule(config, num_steps), generator)

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The sample at the next noise level, cast back to x's dtype; draws noise shaped like x."""
        alpha, alpha_next = self.alphas[i], self.alphas_next[i]
        x0 = alpha ** 0.5 * x - (1 - alpha) ** 0.5 * v
        lam, lam_next = self._lambda(alpha), self._lambda(alpha_next)
        h = lam_next - lam
        x_scale = ((1 - alpha_next) / (1 - alpha)) ** 0.5 * (-h).exp()
        x0_scale = (-2 * h).expm1() * alpha_next ** 0.5  # -sqrt(a') * (1 - e^-2h)
        noise_scale = (1 - alpha_next) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        noise = self._noise(x)
        if i == 0 or self.to_final[i]:
            x_next = x_scale * x - x0_scale * x0 + noise_scale * noise
        else:
            r = (lam - self._lambda(self.alphas[i - 1])) / h
            x0_multistep = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * self.last_x0
            noise = self._noise(x)
            x_next = x_scale * x - x0_scale * x0_multistep + noise_scale * noise
        self.last_x0 = x0
        return x_next.to(x.dtype)

    @staticmethod
    def _lambda(alpha: torch.Tensor) -> torch.Tensor:
        """log sqrt(a / (1 - a)): -inf at a = 0 (zero terminal SNR), +inf at a = 1."""
        return ((alpha / (1 - alpha)) ** 0.5).log()

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like x in x's dtype, drawn on the generator's device and moved to x's (as
        diffusers' randn_tensor draws)."""
        device = x.device if self.generator is None else self.generator.device
        return torch.randn(x.shape, generator=self.generator, device=device, dtype=x.dtype).to(x.device)


Solver = UniPC | FlowEuler | DDIM | DPM
SOLVERS = {"unipc": UniPC, "euler": FlowEuler, "lcm": FlowLCM, "ddim": DDIM, "dpm": DPM}
# The solver that reproduces each diffusers scheduler, for make_solver("auto", ...).
SCHEDULER_SOLVERS = {"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "euler",
                     "CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}


def make_solver(name: str | None, scheduler_config: dict, num_steps: int, flow_shift: float | None = None,
                generator: torch.Generator | None = None, sigmas: list[float] | None = None,
                timesteps: list[float] | None = None, mu: float | None = None) -> Solver:
    """A fresh solver for one run, set up from the checkpoint's scheduler config.

    name: "auto" or None picks the solver of the config's own scheduler (its `_class_name`: UniPC for Wan 2.1,
    DDIM for CogVideoX); "unipc", "euler" or "lcm" for flow-matching configs, "ddim" or "dpm" for CogVideoX configs,
    any of a family on a config of the same family. flow_shift overrides a flow config's shift; generator is the
    run's noise source, used by DPM and LCM only; sigmas or timesteps, a pipeline's own schedule, and mu, its dynamic
    shift: Euler and LCM only (FlowEuler.from_config).
    """
    if name in (None, "auto"):
        scheduler = scheduler_config.get("_class_name")
        if scheduler not in SCHEDULER_SOLVERS:
            raise ValueError(f"scheduler config _class_name={scheduler!r} has no solver (known: "
                             f"{', '.join(SCHEDULER_SOLVERS)}); name one of {sorted(SOLVERS)}")
        name = SCHEDULER_SOLVERS[scheduler]
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r} (choose one of {sorted(SOLVERS)} or 'auto')")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if (sigmas is not None or timesteps is not None) and name not in ("euler", "lcm"):
        raise ValueError(f"solver {name!r}: this run sets its own noise levels, which only 'euler' and 'lcm' follow")
    try:
        if name in ("euler", "lcm"):
            solver = SOLVERS[name].from_config(scheduler_config, num_steps, flow_shift, sigmas, timesteps, mu)
            solver.generator = generator  # lcm's fresh noise
            return solver
        if name == "unipc":
            return UniPC.from_config(scheduler_config, num_steps, flow_shift)
        if flow_shift is not None:
            raise ValueError(f"flow_shift={flow_shift} applies to the flow-matching solvers only")
        if name == "ddim":
            return DDIM.from_config(scheduler_config, num_steps)
        return DPM.from_config(scheduler_config, num_steps, generator)
    except ValueError as error:
        raise ValueError(f"solver {name!r}: {error}") from None
