"""Flow-matching solvers: UniPC (Wan 2.1's default) and plain Euler.

Flow matching interpolates x = (1 - sigma) * x0 + sigma * noise, sigma running from 1 (noise) to 0 (data), and the
model predicts the velocity v = noise - x0, so x0 = x - sigma * v. Both solvers share one small interface:

    solver = make_solver("unipc", scheduler_config, num_steps)
    for i, t in enumerate(solver.timesteps):   # (N,) the timesteps the model is called with
        v = model(x, t)
        x = solver.step(v, i, x)               # from sigmas[i] to sigmas[i + 1]

A solver holds the state of one run (UniPC remembers its last model outputs): make a new one per run.

The numerics follow diffusers' UniPCMultistepScheduler and FlowMatchEulerDiscreteScheduler op for op: schedules
in float64 (numpy there, Python floats here), stored as float32; step coefficients as 0-dim float32 tensors on the
CPU, which PyTorch treats as scalars on any device, so a step never waits for the GPU; sample-sized arithmetic in
the sample's dtype.
"""

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
    def from_config(cls, config: dict, num_steps: int, flow_shift: float | None = None) -> "FlowEuler":
        """Build from a FlowMatchEulerDiscreteScheduler config (key `shift`), or from a flow UniPC config (key
        `flow_shift`); flow_shift overrides either."""
        _require(config, "use_flow_sigmas", (True,), True)
        _require(config, "prediction_type", ("flow_prediction",), "flow_prediction")
        for key in _UNSUPPORTED_OPTIONS + ("invert_sigmas", "stochastic_sampling"):
            _require(config, key, (False, None), None)
        if flow_shift is None:
            flow_shift = config.get("flow_shift", config.get("shift", 1.0))
        n_train = config.get("num_train_timesteps", 1000)
        # diffusers' convention: shift the ends of the training schedule (in float32), space the steps
        # linearly between them, and shift the result again.
        ends = torch.tensor([n_train, 1.0]) / n_train
        sigma_max, sigma_min = (flow_shift * ends / (1 + (flow_shift - 1) * ends)).tolist()
        sigmas = [_shift(t / n_train, flow_shift)
                  for t in _linspace(sigma_max * n_train, sigma_min * n_train, num_steps)]
        sigmas = torch.tensor(sigmas, dtype=torch.float32)
        return cls(torch.cat([sigmas, torch.zeros(1)]), sigmas * n_train)

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The sample at sigmas[i + 1], in float32 then cast to the velocity's dtype (as diffusers does)."""
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (x.float() + dt * velocity).to(velocity.dtype)


Solver = UniPC | FlowEuler
SOLVERS = {"unipc": UniPC, "euler": FlowEuler}


def make_solver(name: str, scheduler_config: dict, num_steps: int, flow_shift: float | None = None) -> Solver:
    """A fresh solver for one run: "unipc" (the Wan default) or "euler", set up from the checkpoint's scheduler
    config; flow_shift overrides the config's."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r} (choose one of {sorted(SOLVERS)})")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return SOLVERS[name].from_config(scheduler_config, num_steps, flow_shift)
