"""Consistency models on any linear forward SDE (DESIGN section 5; T section 6.2).

Song et al. 2303.01469 (CM) and Song & Dhariwal 2310.14189 (iCT) write everything for
EDM's VE process x_s = x0 + s z. A linear SDE has x_t = alpha(t) x0 + sigma(t) z, so the
scaled variable y = x / alpha(t) follows exactly that process with effective noise level
s(t) = sigma(t) / alpha(t) = exp(-log_snr(t)). Its probability-flow ODE (T 6.1) becomes
EDM's: with g^2 = d(sigma^2)/dt + 2 b sigma^2 and score_y(y) = alpha score_x(alpha y),

    dy/dt = -(g^2 / (2 alpha^2)) score_y = -(1/2) d(s^2)/dt score_y,   i.e.  dy/ds = -s score_y(y, s).

The ODE flow from t to t_min is therefore x -> alpha(t_min) Phi_s(x / alpha(t)) with Phi the
EDM flow from s(t) to s_min = s(t_min), and the CM parametrisation carries over verbatim:

    f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)),
    c_skip = (alpha(t_min) / alpha(t)) sd^2 / ((s - s_min)^2 + sd^2),
    c_out  = alpha(t_min) sd (s - s_min) / sqrt(s^2 + sd^2),
    c_in   = 1 / (alpha sqrt(s^2 + sd^2)),   c_noise = log(s) / 4  (`precond.edm_scalings`),

sd = sigma_data. At t = t_min: c_skip = 1, c_out = 0, so f(x, t_min) = x (T 6.15); both are
continuous in t. The boundary value is also enforced where t == t_min, so that rounding of
vectorised transcendental kernels can never break it.

Distillation (CD, T 6.16-6.17) takes one Euler or Heun step of the probability-flow ODE of
a score model from t_{n+1} to t_n; training (CT) uses the coupled pair
x_{t_k} = alpha(t_k) x0 + sigma(t_k) z with one z, which in (y, s) is the Euler step with
the one-sample score estimate -(x - alpha x0) / sigma^2 (CM, Theorem 2).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from ..core.sde import LinearSDE, ScoreFn, batch_time, expand_like, probability_flow_drift
from ..sampling.consistency import ConsistencyModel, consistency_times, effective_sigma

__all__ = [
    "effective_sigma", "consistency_scalings", "ConsistencyModel", "consistency_times",
    "teacher_step", "cd_pair", "ct_pair", "distance", "improved_ct_steps", "lognormal_index_probs",
    "ConsistencyLoss", "consistency_sample", "multistep_times",
]

Distance = Literal["l2", "pseudo_huber"]
Solver = Literal["euler", "heun"]












def teacher_step(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, t: Tensor, t_next: Tensor,
                 solver: Solver = "heun") -> Tensor:
    """One Euler or Heun step of the probability-flow ODE (T 6.1, 6.7) from t to t_next (per-sample times)."""
    drift = probability_flow_drift(sde, score_fn)
    t, t_next = batch_time(t, x), batch_time(t_next, x)
    h = expand_like(t_next - t, x)
    d = drift(t, x)
    if solver == "euler":
        return x + h * d
    if solver == "heun":
        return x + h * (d + drift(t_next, x + h * d)) / 2
    raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")


def cd_pair(sde: LinearSDE, score_fn: ScoreFn, x0: Tensor, t: Tensor, t_next: Tensor, noise: Tensor,
            solver: Solver = "heun") -> tuple[Tensor, Tensor]:
    """Distillation pair (x_{t_{n+1}}, x-hat_{t_n}) of T 6.16: noise x0 to t_next, one teacher step back to t."""
    x_next = sde.sample_marginal(x0, t_next, noise)
    return x_next, teacher_step(sde, score_fn, x_next, t_next, t, solver)


def ct_pair(sde: LinearSDE, x0: Tensor, t: Tensor, t_next: Tensor, noise: Tensor,
            noise_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Training pair (x_{t_{n+1}}, x_{t_n}); coupled through one `noise` unless `noise_t` is given
    (independent noise is the "wrong coupling" of T section 6.2, used in T 6.18)."""
    return sde.sample_marginal(x0, t_next, noise), sde.sample_marginal(x0, t, noise if noise_t is None else noise_t)


def distance(a: Tensor, b: Tensor, kind: Distance = "l2", c: float | None = None) -> Tensor:
    """Per-sample distance: squared L2 |a - b|^2, or pseudo-Huber sqrt(|a - b|^2 + c^2) - c
    (iCT eq. 8; default c = 0.00054 sqrt(d))."""
    sq = (a - b).flatten(1).pow(2).sum(1)
    if kind == "l2":
        return sq
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(a[0].numel()) if c is None else c
        if not c > 0:
            raise ValueError(f"c must be > 0, got {c}")
        return torch.sqrt(sq + c**2) - c
    raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {kind!r}")


def improved_ct_steps(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT discretisation curriculum (2310.14189 eq. 5): N(k) = min(s0 2^floor(k / K'), s1),
    K' = floor(K / (log2 floor(s1 / s0) + 1)); returns the number of intervals N(k)."""
    if not 1 <= s0 <= s1:
        raise ValueError(f"need 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    if total_steps < 1 or not 0 <= step:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got {total_steps}, {step}")
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1)


def lognormal_index_probs(s: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT index distribution (2310.14189 eq. 9): p(n) proportional to
    erf((log s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((log s_n - P_mean) / (sqrt 2 P_std))."""
    if not p_std > 0:
        raise ValueError(f"p_std must be > 0, got {p_std}")
    cdf = torch.erf((torch.log(s) - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return p / p.sum()


class ConsistencyLoss(nn.Module):
    """Per-sample consistency loss lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_{theta^-}(x-hat_{t_n}, t_n)) (T 6.17).

    mode "cd": x-hat_{t_n} by one `solver` step of the teacher score's probability flow (T 6.16);
    mode "ct": the coupled pair, no teacher. The target network theta^- is an EMA of the model
    with decay `target_decay` (0: stop-gradient copy of the current weights, as in iCT),
    refreshed at the start of each call, i.e. after every optimiser step of a plain loop;
    it and the step counter live in this module's state_dict.

    curriculum "constant" uses `n_steps` intervals; "improved" the iCT doubling schedule over
    `total_steps` calls (from s0 = `n_steps` to `max_steps`). index "uniform" draws n uniformly
    (CM), "lognormal" as in iCT; weighting "uniform" (CM) or "inverse_gap" 1 / (s_{n+1} - s_n) (iCT).
    """

    def __init__(self, sde: LinearSDE, mode: Literal["cd", "ct"] = "cd", teacher: ScoreFn | None = None, *,
                 n_steps: int = 18, solver: Solver = "heun", distance: Distance = "l2", huber_c: float | None = None,
                 curriculum: Literal["constant", "improved"] = "constant", total_steps: int | None = None,
                 max_steps: int = 1280, index: Literal["uniform", "lognormal"] = "uniform",
                 p_mean: float = -1.1, p_std: float = 2.0,
                 weighting: Literal["uniform", "inverse_gap"] = "uniform", target_decay: float = 0.95,
                 rho: float = 7.0):
        super().__init__()
        if mode not in ("cd", "ct"):
            raise ValueError(f"mode must be 'cd' or 'ct', got {mode!r}")
        if mode == "cd" and teacher is None:
            raise ValueError("teacher (a score_fn) is required for mode 'cd'")
        if solver not in ("euler", "heun"):
            raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
        if distance not in ("l2", "pseudo_huber"):
            raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {distance!r}")
        if curriculum not in ("constant", "improved"):
            raise ValueError(f"curriculum must be 'constant' or 'improved', got {curriculum!r}")
        if curriculum == "improved" and (total_steps is None or total_steps < 1):
            raise ValueError("total_steps (>= 1) is required for curriculum 'improved'")
        if index not in ("uniform", "lognormal"):
            raise ValueError(f"index must be 'uniform' or 'lognormal', got {index!r}")
        if weighting not in ("uniform", "inverse_gap"):
            raise ValueError(f"weighting must be 'uniform' or 'inverse_gap', got {weighting!r}")
        if not 0 <= target_decay < 1:
            raise ValueError(f"target_decay must be in [0, 1), got {target_decay}")
        if n_steps < 1 or max_steps < n_steps:
            raise ValueError(f"need 1 <= n_steps <= max_steps, got {n_steps}, {max_steps}")
        self.sde, self.mode = sde, mode
        self.__dict__["teacher"] = teacher  # never a submodule: the teacher is not saved with the student
        self.n_steps, self.solver, self.distance, self.huber_c = n_steps, solver, distance, huber_c
        self.curriculum, self.total_steps, self.max_steps = curriculum, total_steps, max_steps
        self.index, self.p_mean, self.p_std, self.weighting = index, p_mean, p_std, weighting
        self.target_decay, self.rho = target_decay, rho
        self.target: nn.Module | None = None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._grids: dict[int, Tensor] = {}

    def current_steps(self) -> int:
        """N(k) intervals at the current step k."""
        if self.curriculum == "constant":
            return self.n_steps
        return improved_ct_steps(int(self.step), self.total_steps, self.n_steps, self.max_steps)

    def grid(self, n: int) -> Tensor:
        if n not in self._grids:
            self._grids[n] = consistency_times(self.sde, n, self.rho)
        return self._grids[n]

    @torch.no_grad()
    def attach(self, model: nn.Module) -> None:
        """Create the EMA target network as a copy of `model` (done by the first call; call it
        before `load_state_dict` when resuming)."""
        if self.target_decay > 0 and self.target is None:
            self.target = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def _refresh_target(self, model: nn.Module) -> None:
        for p_t, p in zip(self.target.parameters(), model.parameters()):
            p_t.lerp_(p, 1 - self.target_decay)
        for b_t, b in zip(self.target.buffers(), model.buffers()):
            b_t.copy_(b)

    def forward(self, model: nn.Module, x0: Tensor, generator: torch.Generator | None = None, *,
                update: bool = True, target: nn.Module | None = None, noise: Tensor | None = None) -> Tensor:
        """Per-sample losses for data x0. With update=True (training) the own target is first refreshed
        from `model` and the step counter advances; update=False (evaluation) leaves both alone.
        A given `target` module is used as theta^- instead of the own EMA (a trainer's EMA, say);
        `noise` (shape of x0) replaces the draw of z."""
        if target is None and self.target_decay > 0 and self.target is None:
            self.attach(model)
        elif target is None and self.target_decay > 0 and update and self.step > 0:
            self._refresh_target(model)
        target_net = target if target is not None else model if self.target_decay == 0 else self.target
        if update:
            self.step += 1
        n_int = self.current_steps()
        t_grid = self.grid(n_int).to(x0)
        if self.index == "uniform":
            n = torch.randint(0, n_int, (x0.shape[0],), generator=generator, device=x0.device)
        else:
            probs = lognormal_index_probs(effective_sigma(self.sde, t_grid), self.p_mean, self.p_std)
            n = torch.multinomial(probs, x0.shape[0], replacement=True, generator=generator)
        t, t_next = t_grid[n], t_grid[n + 1]
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        with torch.no_grad():
            if self.mode == "cd":
                x_next, x_t = cd_pair(self.sde, self.teacher, x0, t, t_next, noise, self.solver)
            else:
                x_next, x_t = ct_pair(self.sde, x0, t, t_next, noise)
            f_target = target_net(x_t, t)
        loss = distance(model(x_next, t_next), f_target, self.distance, self.huber_c)
        if self.weighting == "inverse_gap":
            loss = loss / (effective_sigma(self.sde, t_next) - effective_sigma(self.sde, t))
        return loss
