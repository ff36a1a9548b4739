"""Probability-flow ODE solvers (T 6.1, 6.7, 6.8): Euler, Heun, adaptive dopri5, and
multistep exponential integrators in data-prediction form (DPM-Solver++, Lu et al. 2211.01095).

The multistep solvers use only lambda = log(alpha / sigma) and the Tweedie estimate
x0_hat = (x + sigma^2 s) / alpha, so they hold for every linear SDE (VP, sub-VP, VE,
VE-EDM, OU, contractive): the probability flow written in lambda is exactly
x(lambda') = (sigma'/sigma) x(lambda) + sigma' int_lambda^lambda' e^u x0_hat(u) du.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..sde import SDE, LinearSDE, ScoreFn, probability_flow_drift
from .common import Callback, check_grid, finish, require_linear, schedule

__all__ = ["ode_euler", "heun", "dopri5", "dpm_solver_multistep", "dpm_weights"]


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
        dt = float(ts[i + 1] - ts[i])
        d = drift(i, x)
        x_euler = x + dt * d
        # Heun: average the slopes at both ends of the step
        x = x + dt * 0.5 * (d + drift(i + 1, x_euler)) if second_order else x_euler
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)


def dopri5(sde: SDE, score_fn: ScoreFn, x_T: Tensor, *, t_end: float | None = None,
           rtol: float = 1e-5, atol: float = 1e-5, denoise: bool = True,
           callback: Callback | None = None) -> Tensor:
    """Adaptive Dormand-Prince 5(4) (torchdiffeq) on the probability-flow ODE from T to t_end
    (default sde.t_min); the NFE depends on rtol and atol."""
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
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


def dpm_weights(a_next: float, h: float, past: list[float]) -> list[float]:
    """Weights w of x' = (sigma'/sigma) x + sum_j w_j x0_j for one exponential-integrator step of order
    len(past) + 1 (1 to 3), x0_j the data predictions at the current and previous grid points (newest first),
    past = the log-SNR gaps [h0, h1] back to the previous points.

    x0_hat(lambda) is replaced by its Newton interpolant through those points and integrated exactly:
    with phi = e^{-h} - 1, x' = (sigma'/sigma) x - alpha' phi D0 + alpha' (phi/h + 1) D1
    - alpha' ((phi + h)/h^2 - 1/2) D2, D1 = h x0_hat', D2 = h^2 x0_hat'' at lambda (DPM-Solver++, Lu et al.
    2211.01095, derived for any (alpha, sigma)). Order 1 is DDIM (eta = 0).
    """
    phi = math.expm1(-h)
    w = [-a_next * phi, 0.0, 0.0]
    if past:
        h0 = past[0]
        d1 = [1 / h0, -1 / h0, 0.0]  # first divided difference
        deriv = d1
        if len(past) == 2:
            h1 = past[1]
            dd = [(d1[j] - e) / (h0 + h1) for j, e in enumerate([0.0, 1 / h1, -1 / h1])]  # second divided difference
            deriv = [d1[j] + h0 * dd[j] for j in range(3)]
            c2 = -a_next * ((phi + h) / h**2 - 0.5) * 2 * h**2
            w = [w[j] + c2 * dd[j] for j in range(3)]
        c1 = a_next * (phi / h + 1) * h
        w = [w[j] + c1 * deriv[j] for j in range(3)]
    return w[:len(past) + 1]


def dpm_solver_multistep(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, order: int = 2,
                         lower_order_final: bool = True, denoise: bool = True,
                         callback: Callback | None = None) -> Tensor:
    """Multistep DPM-Solver++ (order 1, 2 or 3) in data-prediction form for any linear SDE.

    Warm start with lower orders (step i uses order min(order, i + 1)); with
    `lower_order_final` the last steps drop order too (min(order, steps left)), which
    stabilises very coarse grids. One NFE per step: NFE = len(ts) - 1 + denoise.
    """
    sde = require_linear(sde, "the DPM-Solver++ multistep solver")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    ts = check_grid(ts.to(x_T.dtype))
    alpha, sigma, lam = schedule(sde, ts)
    x, n, x0s = x_T, len(ts) - 1, []
    if callback is not None:
        callback(0, ts[0], x)
    for i in range(n):
        score = score_fn(x, ts[i].expand(x.shape[0]))
        x0s = ([(x + sigma[i] ** 2 * score) / alpha[i]] + x0s)[:order]  # Tweedie, newest first
        k = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
        w = dpm_weights(alpha[i + 1], lam[i + 1] - lam[i], [lam[i - j] - lam[i - j - 1] for j in range(k - 1)])
        x = x * (sigma[i + 1] / sigma[i])
        for wj, x0 in zip(w, x0s):
            x = x.add(x0, alpha=wj)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)
