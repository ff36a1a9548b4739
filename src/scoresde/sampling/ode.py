"""Probability-flow ODE solvers (T 6.1, 6.7, 6.8): Euler, Heun, adaptive dopri5, iPNDM's Adams-Bashforth
steps in noise-prediction form (`ipndm`), and multistep exponential integrators in data-prediction form
(DPM-Solver++, Lu et al. 2211.01095), with SA-Solver's stochastic variant (Xue et al. 2309.05019) as the same
steps plus noise.

The multistep solvers use only lambda = log(alpha / sigma) and the Tweedie estimate
x0_hat = (x + sigma^2 s) / alpha, so they hold for every linear SDE (VP, sub-VP, VE,
VE-EDM, OU, contractive): the probability flow written in lambda is exactly
x(lambda') = (sigma'/sigma) x(lambda) + sigma' int_lambda^lambda' e^u x0_hat(u) du.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..core.errors import InvalidValueError
from ..core.sde import (
    SDE,
    LinearSDE,
    ScoreFn,
    TimeLike,
    batch_time,
    expand_like,
    probability_flow_drift,
)
from ..core.validate import check, number, one_of
from .common import Callback, check_grid, finish, first_score, require_linear, schedule
from .noise import Noise, step_noise

__all__ = ["dopri5", "dpm_solver_multistep", "exp_adams_weights", "explicit_step", "heun", "ipndm", "ode_euler",
           "pf_step"]

# Adams-Bashforth coefficients of orders 1-4 for equal steps, newest slope first
_ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def explicit_step(drift: Callable[[Any, Tensor], Tensor], x: Tensor, t: Any, t_next: Any, h: float | Tensor,
                  second_order: bool) -> Tensor:
    """One Euler step x + h d(t, x) of dx/dt = d(t, x) (T 6.7), or Heun's, which averages the slopes at
    both ends (Karras et al. 2206.00364 Alg. 1). t, t_next are whatever `drift` takes (a grid index,
    per-sample times); h = t_next - t, a float or a tensor broadcasting over x."""
    d = drift(t, x)
    x_euler = x + h * d
    return x + h * 0.5 * (d + drift(t_next, x_euler)) if second_order else x_euler


def pf_step(sde: SDE, score_fn: ScoreFn, x: Tensor, t: TimeLike, t_next: TimeLike,
            solver: Literal["euler", "heun"] = "heun") -> Tensor:
    """One Euler or Heun step of the probability-flow ODE (T 6.1, 6.7) from t to t_next, per-sample
    times allowed (a consistency-distillation teacher, `models.consistency`)."""
    one_of("solver", solver, ("euler", "heun"))
    t, t_next = batch_time(t, x), batch_time(t_next, x)
    return explicit_step(probability_flow_drift(sde, score_fn), x, t, t_next, expand_like(t_next - t, x),
                         solver == "heun")


def ode_euler(sde: SDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, denoise: bool = True,
              callback: Callback | None = None) -> Tensor:
    """Euler on the probability-flow ODE (T 6.7). NFE = len(ts) - 1 + denoise."""
    return _explicit(sde, score_fn, x_T, ts, False, denoise, callback)


def heun(sde: SDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, denoise: bool = True,
         callback: Callback | None = None) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2206.00364 Alg. 1).
    NFE = 2 (len(ts) - 1) + denoise."""
    return _explicit(sde, score_fn, x_T, ts, True, denoise, callback)


def _explicit(sde, score_fn, x_T, ts, second_order, denoise, callback):
    ts = check_grid(ts.to(x_T.dtype))
    x, n = x_T, len(ts) - 1
    if isinstance(sde, LinearSDE):  # f = -b x: the coefficients of the whole grid computed once
        t64 = ts.detach().to("cpu", torch.float64)
        b, half_g2 = sde.b(t64).tolist(), (0.5 * sde.diffusion(t64) ** 2).tolist()

        def drift(i, x):
            return -b[i] * x - half_g2[i] * score_fn(x, ts[i].expand(x.shape[0]))
    else:
        flow = probability_flow_drift(sde, score_fn)

        def drift(i, x):
            return flow(ts[i], x)
    if callback is not None:
        callback(0, ts[0], x)
    for i in range(n):
        x = explicit_step(drift, x, i, i + 1, float(ts[i + 1] - ts[i]), second_order)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)


def dopri5(sde: SDE, score_fn: ScoreFn, x_T: Tensor, *, t_end: float | None = None,
           rtol: float = 1e-5, atol: float = 1e-5, denoise: bool = True,
           callback: Callback | None = None) -> Tensor:
    """Adaptive Dormand-Prince 5(4) (torchdiffeq) on the probability-flow ODE from T to t_end
    (default sde.t_min); the NFE depends on rtol and atol."""
    if not (rtol > 0 and atol > 0):
        raise InvalidValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    t_end = sde.t_min if t_end is None else t_end
    ts = check_grid(torch.tensor([sde.T, t_end], dtype=x_T.dtype, device=x_T.device))
    if callback is not None:
        callback(0, ts[0], x_T)
    # step_t lands a step on t_end and first_step skips the initial-step probe, so the
    # solver never evaluates the score outside [t_end, T] (torchdiffeq otherwise overshoots)
    options = dict(step_t=ts, first_step=1e-2 * float(ts[0] - ts[1]))
    x = odeint(probability_flow_drift(sde, score_fn), x_T, ts, rtol=rtol, atol=atol, method="dopri5",
               options=options)[-1]
    if callback is not None:
        callback(1, ts[1], x)
    return finish(sde, score_fn, x, ts[1], denoise, callback, 2)


def ipndm(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, order: int = 3, analytic_first: bool = False,
          denoise: bool = True, callback: Callback | None = None) -> Tensor:
    """iPNDM (Zhang & Chen 2204.13902, app. "improved PNDM"): the probability flow written for y = x / alpha
    in rho = sigma / alpha is dy/drho = eps(y), eps = -sigma s(x, t) (DDIM's ODE, Song et al. 2010.02502
    eq. 14), stepped by Adams-Bashforth on the past eps with the equal-step coefficients whatever the grid,
    order min(order, steps so far) (1 to 4). Where the data are a point m, eps = (y - m) / rho is constant
    along the flow, so every step is exact; a direction of data variance v << rho^2 is nearly so. Ends with
    the plain Tweedie denoise (`finish`). With `analytic_first` the first eps is the prior's (`first_score`).
    NFE = len(ts) - 1 + denoise - analytic_first."""
    sde = require_linear(sde, "iPNDM")
    if order not in (1, 2, 3, 4):
        raise InvalidValueError(f"order must be 1, 2, 3 or 4, got {order}")
    one_of("analytic_first", analytic_first, (True, False))
    ts = check_grid(ts.to(x_T.dtype))
    alpha, sigma, _ = schedule(sde, ts)
    y, eps = x_T / alpha[0], []
    if callback is not None:
        callback(0, ts[0], x_T)
    for i in range(len(ts) - 1):
        eps = [-sigma[i] * first_score(sde, score_fn, y * alpha[i], ts[i], analytic_first and i == 0)] + eps[:order - 1]
        step = sigma[i + 1] / alpha[i + 1] - sigma[i] / alpha[i]
        for c, e in zip(_ADAMS_BASHFORTH[len(eps) - 1], eps):
            y = y.add(e, alpha=step * c)
        if callback is not None:
            callback(i + 1, ts[i + 1], y * alpha[i + 1])
    return finish(sde, score_fn, y * alpha[-1], ts[-1], denoise, callback, len(ts))


def _exp_moments(h: float, count: int) -> list[float]:
    """m_k = int_{-1}^0 e^{h u} u^k du for k < count: a series for h < 1 (no cancellation; 25 terms
    reach 1e-25), else the integration-by-parts recurrence m_k = -(-1)^k e^{-h} / h - (k / h) m_{k-1}
    (stable when h >= 1)."""
    if h < 1:
        out = []
        for k in range(count):
            total, term = 0.0, 1.0
            for j in range(25):
                total += term / (j + k + 1)
                term *= -h / (j + 1)
            out.append((-1) ** k * total)
        return out
    out = [-math.expm1(-h) / h]
    for k in range(1, count):
        out.append(-((-1) ** k) * math.exp(-h) / h - k / h * out[-1])
    return out


def exp_adams_weights(a_next: float, lam_from: float, lam_to: float, nodes: list[float],
                      rate: float = 1.0) -> list[float]:
    """Weights w of x(lam_to) = (sigma'/sigma) x(lam_from) + sum_j w_j x0_j for the probability flow in
    data-prediction form, x0_j = x0_hat at the distinct log-SNR nodes[j].

    The exact flow is x' = (sigma'/sigma) x + sigma' int e^u x0_hat(u) du over [lam_from, lam_to]
    (T 6.8 in lambda); x0_hat is replaced by its Lagrange interpolant through the nodes and integrated
    exactly, w_j = alpha' int e^{u - lam_to} L_j(u) du. Nodes at and before lam_from give the explicit
    multistep DPM-Solver++ (Lu et al. 2211.01095; one node is DDIM); a node at lam_to as well gives the
    implicit (Adams-Moulton) step, one order higher, that the UniC corrector (Zhao et al. 2302.04867)
    applies with the evaluation made at the predicted point. Plain floats: a step costs microseconds.

    rate = 1 + tau^2 gives the weights of SA-Solver's predictor and corrector (Xue et al. 2309.05019,
    tau constant on the step), w_j = rate alpha' int e^{rate (u - lam_to)} L_j(u) du; rate = 1 is the flow's.
    """
    h = lam_to - lam_from
    u = [(v - lam_to) / h for v in nodes]  # in [-1, 0] for the step, below -1 for older nodes
    moments = _exp_moments(rate * h, len(u))
    weights = []
    for j, uj in enumerate(u):
        poly = [1.0]  # coefficients of L_j in powers of u, built one factor (u - u_m) / (u_j - u_m) at a time
        for m, um in enumerate(u):
            if m != j:
                poly = [(a - um * b) / (uj - um) for a, b in zip([0.0] + poly, poly + [0.0])]
        weights.append(a_next * rate * h * sum(c * mk for c, mk in zip(poly, moments)))
    return weights


def dpm_solver_multistep(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, order: int = 2,
                         lower_order_final: bool = True, corrector: bool = False, denoise: bool = True,
                         extrapolate: bool = False, tau: float = 0.0, tau_band: tuple[float, float] | None = None,
                         noise: Noise = "gaussian", analytic_first: bool = False,
                         generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """Multistep DPM-Solver++ (order 1, 2 or 3) in data-prediction form for any linear SDE; with tau > 0
    SA-Solver's stochastic Adams method (Xue et al. 2309.05019).

    Warm start with lower orders (step i uses order min(order, i + 1)); with
    `lower_order_final` the last steps drop order too (min(order, steps left)), which
    stabilises very coarse grids. With `corrector` (UniC, Zhao et al. 2302.04867) each new
    evaluation also re-does the step that led to it with that point as one more node (one order
    higher) before the next step starts, at no extra NFE. With `extrapolate` the final denoise is
    extrapolated to sigma = 0 through the last two data predictions (`finish`). With `analytic_first` the first
    step's score is the prior's (`first_score`). One NFE per step: NFE = len(ts) - 1 + denoise - analytic_first.

    tau >= 0 picks the reverse SDE dx = [f x - (1 + tau^2) g^2 s / 2] dt + tau g dW-bar (the same marginals
    for every tau; 0 is the probability flow, 1 the reverse SDE of T 2.7). Its exact solution in lambda,
    h = lambda' - lambda, tau frozen at the step's start, is
        x' = (sigma'/sigma) e^{-tau^2 h} x + (1 + tau^2) alpha' int e^{(1 + tau^2)(u - lambda')} x0_hat(u) du
             + sigma' sqrt(1 - e^{-2 tau^2 h}) z,
    and the interpolated x0_hat gives the SA-Predictor (`exp_adams_weights` with rate 1 + tau^2); the
    corrector re-does the step with the same z (SA-Corrector); z from `noise` (`sampling.noise`: "gaussian",
    "brownian" or a callable i -> z_i). `tau_band` = (low, high): tau acts only on
    steps that start where sigma / alpha is in [low, high] (SA-Solver's interval rule), 0 elsewhere. At
    tau = 0 no noise is drawn and every output is bit-identical to the deterministic solver.
    """
    sde = require_linear(sde, "the DPM-Solver++ multistep solver")
    if order not in (1, 2, 3):
        raise InvalidValueError(f"order must be 1, 2 or 3, got {order}")
    number("tau", tau, 0, strict=False)
    one_of("analytic_first", analytic_first, (True, False))
    if tau_band is not None:
        low, high = tau_band
        check("tau_band", tau_band, 0 <= number("tau_band low", low) <= number("tau_band high", high),
              "(low, high) with 0 <= low <= high")
    ts = check_grid(ts.to(x_T.dtype))
    alpha, sigma, lam = schedule(sde, ts)
    n = len(ts) - 1
    taus = [tau if tau_band is None or tau_band[0] <= math.exp(-lam[i]) <= tau_band[1] else 0.0 for i in range(n)]
    draw = step_noise(noise, x_T, ts, sde.T, generator) if any(taus) else None
    x, x0s, x_prev, z, k = x_T, [], None, None, 0
    if callback is not None:
        callback(0, ts[0], x)
    for i in range(n):
        score = first_score(sde, score_fn, x, ts[i], analytic_first and i == 0)
        # Tweedie, newest first; the corrector needs one more
        x0s = ([(x + sigma[i] ** 2 * score) / alpha[i]] + x0s)[:order + bool(corrector)]
        if corrector and i > 0:  # the step i-1 -> i again, its k nodes and the new one, its noise z
            x = _adams_step(x_prev, i - 1, i, lam[i - k:i + 1][::-1], x0s, alpha, sigma, lam, taus[i - 1], z)
        k = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
        x_prev = x
        z = draw(i) if taus[i] else None
        x = _adams_step(x, i, i + 1, lam[i - k + 1:i + 1][::-1], x0s, alpha, sigma, lam, taus[i], z)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    previous = (x0s[0], math.exp(-2 * lam[n - 1])) if extrapolate else None
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1, previous)


def _adams_step(x: Tensor, i: int, j: int, nodes: list[float], x0s: list[Tensor], alpha: list[float],
                sigma: list[float], lam: list[float], tau: float, z: Tensor | None) -> Tensor:
    """The (stochastic) exponential-Adams step from grid point i to j through the data predictions x0s at
    the log-SNR nodes (`dpm_solver_multistep`); tau = 0 (z None) is the flow's step."""
    damp = tau * tau * (lam[j] - lam[i])  # tau^2 h
    x = _combine(x, sigma[j] / sigma[i] * math.exp(-damp), x0s,
                 exp_adams_weights(alpha[j], lam[i], lam[j], nodes, 1 + tau * tau))
    return x if z is None else x.add(z, alpha=sigma[j] * math.sqrt(-math.expm1(-2 * damp)))


def _combine(x: Tensor, ratio: float, x0s: list[Tensor], weights: list[float]) -> Tensor:
    """ratio x + sum_j weights_j x0s_j (zip stops at the shorter list)."""
    x = x * ratio
    for w, x0 in zip(weights, x0s):
        x = x.add(x0, alpha=w)
    return x
