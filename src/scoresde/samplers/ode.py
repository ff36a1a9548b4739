"""Probability-flow ODE solvers (T 6.1, 6.7, 6.8): Euler, Heun, adaptive dopri5, and
multistep exponential integrators in data-prediction form (DPM-Solver++, Lu et al. 2211.01095).

The multistep solvers use only lambda = log(alpha / sigma) and the Tweedie estimate
x0_hat = (x + sigma^2 s) / alpha, so they hold for every linear SDE (VP, sub-VP, VE,
VE-EDM, OU, contractive): the probability flow written in lambda is exactly
x(lambda') = (sigma'/sigma) x(lambda) + sigma' int_lambda^lambda' e^u x0_hat(u) du.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..sde import SDE, LinearSDE, ScoreFn, probability_flow_drift
from .common import Callback, alpha_sigma, check_grid, data_prediction, finish, require_linear

__all__ = ["ode_euler", "heun", "dopri5", "dpm_solver_multistep", "dpm_step"]


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
    drift = probability_flow_drift(sde, score_fn)
    x, n = x_T, len(ts) - 1
    if callback is not None:
        callback(0, ts[0], x)
    for i in range(n):
        t, t_next = ts[i], ts[i + 1]
        d = drift(t, x)
        x_euler = x + (t_next - t) * d
        # Heun: average the slopes at both ends of the step
        x = x + (t_next - t) * 0.5 * (d + drift(t_next, x_euler)) if second_order else x_euler
        if callback is not None:
            callback(i + 1, t_next, x)
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


def dpm_step(sde: LinearSDE, x: Tensor, t: Tensor, t_next: Tensor, lams: list[Tensor],
             x0s: list[Tensor]) -> Tensor:
    """One exponential-integrator step t -> t_next of order len(x0s) (1 to 3).

    lams, x0s: the log-SNRs and data predictions at the current and previous grid times,
    newest last. x0_hat(lambda) is replaced by its Newton interpolant through those points
    and integrated exactly: with h = lambda' - lambda and phi = e^{-h} - 1,
    x' = (sigma'/sigma) x - alpha' phi D0 + alpha' (phi/h + 1) D1 - alpha' ((phi + h)/h^2 - 1/2) D2,
    D1 = h x0_hat', D2 = h^2 x0_hat'' at lambda. Order 1 is DDIM (eta = 0).
    """
    a, s = alpha_sigma(sde, t, x)
    a_next, s_next = alpha_sigma(sde, t_next, x)
    lam, lam_next = lams[-1], sde.log_snr(t_next)
    h = lam_next - lam
    phi = torch.expm1(-h)
    x_next = (s_next / s) * x - a_next * phi * x0s[-1]
    if len(x0s) >= 2:
        h0 = lam - lams[-2]
        d1 = (x0s[-1] - x0s[-2]) / h0  # first divided difference
        deriv = d1
        if len(x0s) == 3:
            h1 = lams[-2] - lams[-3]
            dd = (d1 - (x0s[-2] - x0s[-3]) / h1) / (h0 + h1)  # second divided difference
            deriv = d1 + h0 * dd
            x_next = x_next - a_next * ((phi + h) / h**2 - 0.5) * (2 * h**2 * dd)
        x_next = x_next + a_next * (phi / h + 1) * h * deriv
    return x_next


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
    x, n = x_T, len(ts) - 1
    lams, x0s = [], []
    if callback is not None:
        callback(0, ts[0], x)
    for i in range(n):
        lams = (lams + [sde.log_snr(ts[i])])[-order:]
        x0s = (x0s + [data_prediction(sde, score_fn, x, ts[i])])[-order:]
        k = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
        x = dpm_step(sde, x, ts[i], ts[i + 1], lams[-k:], x0s[-k:])
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)
