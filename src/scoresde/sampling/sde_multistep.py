"""SDE-DPM-Solver++ (Lu et al. 2211.01095, sec. 5): multistep solvers of the reverse SDE in data-prediction form
for any linear SDE (VP, sub-VP, VE, VE-EDM, OU, contractive).

With f = d log(alpha)/dt, g^2 = -2 sigma^2 d lambda/dt and the score s = (alpha x0_hat - x) / sigma^2, the
reverse SDE (T 2.7) written in lambda = log(alpha / sigma) is linear in x and solved over a step
h = lambda' - lambda by variation of constants:

    x' = (sigma'/sigma) e^{-h} x + 2 alpha' int_lambda^lambda' e^{2(u - lambda')} x0_hat(u) du + sigma' sqrt(1 - e^{-2h}) z,

the noise term being the exact variance int (alpha'/alpha)^2 e^{-4(lambda' - u)} g^2 dt = sigma'^2 (1 - e^{-2h}).
x0_hat frozen at its start gives the first-order step alpha' (1 - e^{-2h}) x0_hat (the paper's SDE-DPM-Solver-1,
DDIM with eta = 1). Replacing x0_hat by its Lagrange interpolant through the last k data predictions and
integrating exactly gives the k-step weights `sde_adams_weights`; substituting v = 2u they are the probability
flow's `exp_adams_weights` at doubled log-SNRs. k = 2 is diffusers' "sde-dpmsolver++" with solver_type "heun";
the paper's 2M form ("midpoint") weighs the difference of the last two predictions by alpha' (1 - e^{-2h}) / 2,
which agrees to O(h^2) per step.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.sde import LinearSDE, ScoreFn
from .common import Callback, check_grid, finish, require_linear, schedule
from .noise import Noise, step_noise
from .ode import _combine, exp_adams_weights

__all__ = ["sde_adams_weights", "sde_dpm_solver_multistep"]


def sde_adams_weights(a_next: float, lam_from: float, lam_to: float, nodes: list[float]) -> list[float]:
    """Weights w_j = 2 alpha' int_{lam_from}^{lam_to} e^{2(u - lam_to)} L_j(u) du of the data predictions at the
    distinct log-SNR nodes (L_j their Lagrange basis): with v = 2u, `exp_adams_weights` at 2 lam_from, 2 lam_to,
    2 nodes. One node: alpha' (1 - e^{-2h}); two nodes lam, lam - r h (r > 0), in terms of x0 and
    D = (x0 - x0_prev) / r: alpha' (1 - e^{-2h}) x0 + alpha' (1 - (1 - e^{-2h}) / (2h)) D."""
    return exp_adams_weights(a_next, 2 * lam_from, 2 * lam_to, [2 * v for v in nodes])


def sde_dpm_solver_multistep(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, order: int = 2,
                             lower_order_final: bool = True, noise: Noise = "gaussian",
                             generator: torch.Generator | None = None, denoise: bool = True,
                             callback: Callback | None = None) -> Tensor:
    """Multistep SDE-DPM-Solver++ of order 1, 2 or 3 (module docstring) on the decreasing grid ts.

    Step i uses min(order, i + 1) data predictions (warm start); with `lower_order_final` also at most the
    number of steps left, as `dpm_solver_multistep`. Every step adds its noise, the last one too (the output
    is a draw at ts[-1]); `noise` picks the z_i (`noise.step_noise`: "gaussian", "brownian" or a callable).
    One NFE per step: NFE = len(ts) - 1 + denoise.
    """
    sde = require_linear(sde, "SDE-DPM-Solver++")
    if order not in (1, 2, 3):
        raise InvalidValueError(f"order must be 1, 2 or 3, got {order}")
    ts = check_grid(ts.to(x_T.dtype))
    draw = step_noise(noise, x_T, ts, float(sde.T), generator)
    alpha, sigma, lam = schedule(sde, ts)
    x, n, x0s = x_T, len(ts) - 1, []
    if callback is not None:
        callback(0, ts[0], x)
    for i in range(n):
        score = score_fn(x, ts[i].expand(x.shape[0]))
        x0s = ([(x + sigma[i] ** 2 * score) / alpha[i]] + x0s)[:order]  # newest first
        k = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
        h = lam[i + 1] - lam[i]
        x = _combine(x, sigma[i + 1] / sigma[i] * math.exp(-h), x0s,
                     sde_adams_weights(alpha[i + 1], lam[i], lam[i + 1], lam[i - k + 1:i + 1][::-1]))
        x = x.add(draw(i), alpha=sigma[i + 1] * math.sqrt(-math.expm1(-2 * h)))
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)
