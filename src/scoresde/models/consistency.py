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
a score model from t_{n+1} to t_n (`ode.pf_step`); training (CT) uses the coupled pair
x_{t_k} = alpha(t_k) x0 + sigma(t_k) z with one z, which in (y, s) is the Euler step with
the one-sample score estimate -(x - alpha x0) / sigma^2 (CM, Theorem 2).

The loss is a pure function: the training step k (which sets the curriculum's N(k)) and the
target network theta^- (an EMA of the model, kept by the caller, e.g. `ConsistencyTrainer`) are
arguments; its options are one validated `ConsistencyOptions`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..core.sde import LinearSDE, ScoreFn
from ..core.validate import check, integer, number, one_of, positive
from ..sampling.consistency import consistency_times, effective_sigma
from ..sampling.ode import pf_step

__all__ = [
    "ConsistencyOptions",
    "cd_pair",
    "consistency_loss",
    "ct_pair",
    "distance",
    "improved_ct_steps",
    "lognormal_index_probs",
]

Distance = Literal["l2", "pseudo_huber"]
Solver = Literal["euler", "heun"]


def cd_pair(sde: LinearSDE, score_fn: ScoreFn, x0: Tensor, t: Tensor, t_next: Tensor, noise: Tensor,
            solver: Solver = "heun") -> tuple[Tensor, Tensor]:
    """Distillation pair (x_{t_{n+1}}, x-hat_{t_n}) of T 6.16: noise x0 to t_next, one teacher step back to t."""
    x_next = sde.sample_marginal(x0, t_next, noise)
    return x_next, pf_step(sde, score_fn, x_next, t_next, t, solver)


def ct_pair(sde: LinearSDE, x0: Tensor, t: Tensor, t_next: Tensor, noise: Tensor,
            noise_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Training pair (x_{t_{n+1}}, x_{t_n}); coupled through one `noise` unless `noise_t` is given
    (independent noise is the "wrong coupling" of T section 6.2, used in T 6.18)."""
    return sde.sample_marginal(x0, t_next, noise), sde.sample_marginal(x0, t, noise if noise_t is None else noise_t)


def distance(a: Tensor, b: Tensor, kind: Distance = "l2", c: float | None = None) -> Tensor:
    """Per-sample distance: squared L2 |a - b|^2, or pseudo-Huber sqrt(|a - b|^2 + c^2) - c
    (iCT eq. 8; default c = 0.00054 sqrt(d))."""
    one_of("distance", kind, ("l2", "pseudo_huber"))
    sq = (a - b).flatten(1).pow(2).sum(1)
    if kind == "l2":
        return sq
    c = 0.00054 * math.sqrt(a[0].numel()) if c is None else positive("c", c)
    return torch.sqrt(sq + c**2) - c


def improved_ct_steps(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT discretisation curriculum (2310.14189 eq. 5): N(k) = min(s0 2^floor(k / K'), s1),
    K' = floor(K / (log2 floor(s1 / s0) + 1)); returns the number of intervals N(k)."""
    check("s0, s1", (s0, s1), isinstance(s0, int) and isinstance(s1, int) and 1 <= s0 <= s1, "integers with 1 <= s0 <= s1")
    integer("total_steps", total_steps, 1)
    integer("step", step, 0)
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1)


def lognormal_index_probs(s: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT index distribution (2310.14189 eq. 9): p(n) proportional to
    erf((log s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((log s_n - P_mean) / (sqrt 2 P_std))."""
    positive("p_std", p_std)
    cdf = torch.erf((torch.log(s) - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return p / p.sum()


@dataclass(frozen=True)
class ConsistencyOptions:
    """The options of `consistency_loss`, validated on construction.

    mode "cd": x-hat_{t_n} by one `solver` step of the teacher score's probability flow (T 6.16);
    "ct": the coupled pair, no teacher. curriculum "constant" uses `n_steps` intervals; "improved"
    the iCT doubling schedule over `total_steps` training steps, from s0 = `n_steps` to `max_steps`.
    index "uniform" draws n uniformly (CM), "lognormal" as in iCT (`p_mean`, `p_std`); weighting
    "uniform" (CM) or "inverse_gap" 1 / (s_{n+1} - s_n) (iCT); `distance` with `huber_c` (`distance`);
    the grid is uniform in s^{1/rho} (`consistency_times`).
    """

    mode: Literal["cd", "ct"] = "cd"
    n_steps: int = 18
    solver: Solver = "heun"
    distance: Distance = "l2"
    huber_c: float | None = None
    curriculum: Literal["constant", "improved"] = "constant"
    total_steps: int | None = None
    max_steps: int = 1280
    index: Literal["uniform", "lognormal"] = "uniform"
    p_mean: float = -1.1
    p_std: float = 2.0
    weighting: Literal["uniform", "inverse_gap"] = "uniform"
    rho: float = 7.0

    def __post_init__(self):
        one_of("mode", self.mode, ("cd", "ct"))
        one_of("solver", self.solver, ("euler", "heun"))
        one_of("distance", self.distance, ("l2", "pseudo_huber"))
        one_of("curriculum", self.curriculum, ("constant", "improved"))
        one_of("index", self.index, ("uniform", "lognormal"))
        one_of("weighting", self.weighting, ("uniform", "inverse_gap"))
        integer("n_steps", self.n_steps, 1)
        integer("max_steps", self.max_steps, self.n_steps)
        if self.curriculum == "improved" or self.total_steps is not None:
            check("total_steps", self.total_steps, self.total_steps is not None, "given (>= 1) for curriculum 'improved'")
            integer("total_steps", self.total_steps, 1)
        if self.huber_c is not None:
            positive("huber_c", self.huber_c)
        number("p_mean", self.p_mean)
        positive("p_std", self.p_std)
        positive("rho", self.rho)

    def intervals(self, step: int) -> int:
        """N(k): the number of grid intervals at training step k."""
        if self.curriculum == "constant":
            return self.n_steps
        return improved_ct_steps(step, self.total_steps, self.n_steps, self.max_steps)


def consistency_loss(sde: LinearSDE, options: ConsistencyOptions, model: ScoreFn, target: ScoreFn, x0: Tensor,
                     step: int, *, teacher: ScoreFn | None = None, generator: torch.Generator | None = None,
                     noise: Tensor | None = None) -> Tensor:
    """Per-sample consistency loss lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_{theta^-}(x-hat_{t_n}, t_n)) (T 6.17).

    `model` is f_theta (a `ConsistencyModel`), `target` f_{theta^-}: an EMA copy of the model, or the model
    itself for iCT's stop-gradient target; it is evaluated without gradient. `step` k sets the
    curriculum's N(k); `teacher` is the score of mode "cd" (none for "ct"); `noise` (shape of x0)
    replaces the draw of z. One call draws n ~ the index law on N(k) intervals, then z.
    """
    check("teacher", teacher, (teacher is not None) == (options.mode == "cd"),
          "a score_fn for mode 'cd' and None for mode 'ct'")
    n_int = options.intervals(integer("step", step, 0))
    t_grid = consistency_times(sde, n_int, options.rho).to(x0)
    if options.index == "uniform":
        n = torch.randint(0, n_int, (x0.shape[0],), generator=generator, device=x0.device)
    else:
        probs = lognormal_index_probs(effective_sigma(sde, t_grid), options.p_mean, options.p_std)
        n = torch.multinomial(probs, x0.shape[0], replacement=True, generator=generator)
    t, t_next = t_grid[n], t_grid[n + 1]
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    with torch.no_grad():
        if options.mode == "cd":
            x_next, x_t = cd_pair(sde, teacher, x0, t, t_next, noise, options.solver)
        else:
            x_next, x_t = ct_pair(sde, x0, t, t_next, noise)
        f_target = target(x_t, t)
    loss = distance(model(x_next, t_next), f_target, options.distance, options.huber_c)
    if options.weighting == "inverse_gap":
        loss = loss / (effective_sigma(sde, t_next) - effective_sigma(sde, t))
    return loss
