"""DDPM ancestral sampling (Ho et al. 2006.11239) and DDIM (Song et al. 2010.02502).

Written for any (alpha, sigma): with the VP SDE on the grid t_i = i / N they are the
discrete-time samplers of the papers (alpha_bar_i = alpha(t_i)^2). From t to t' < t, with
x0_hat and eps_hat = (x - alpha x0_hat) / sigma from the score,
x' = alpha' x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z,   c = eta sigma' sqrt(1 - e^{-2h}),
h = lambda' - lambda. eta = 1 draws from the posterior q(x_t' | x_t, x0_hat) (DDPM with
the posterior variance beta-tilde); eta = 0 is deterministic and equals the first-order
exponential integrator of the probability-flow ODE.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.sde import LinearSDE, ScoreFn
from .common import Callback, check_grid, finish, noise_like, require_linear, schedule

__all__ = ["ddim", "ddpm"]


def ddim(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, denoise: bool = True,
         callback: Callback | None = None) -> Tensor:
    """DDIM with stochasticity eta in [0, 1] (2010.02502 eq. 12, 16). NFE = len(ts) - 1 + denoise."""
    sde = require_linear(sde, "DDIM")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ts = check_grid(ts.to(x_T.dtype))
    alpha, sigma, lam = schedule(sde, ts)
    x, n = x_T, len(ts) - 1
    if callback is not None:
        callback(0, ts[0], x)
    for i in range(n):
        a, s, a_next, s_next = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        c = eta * s_next * math.sqrt(-math.expm1(-2 * (lam[i + 1] - lam[i])))
        k = math.sqrt(s_next**2 - c**2)
        # x' = a' x0 + k eps + c z with x0 = (x + s^2 score) / a, eps = (x - a x0) / s: linear in (x, score)
        x0_weight = a_next - k * a / s
        score = score_fn(x, ts[i].expand(x.shape[0]))
        x = (k / s + x0_weight / a) * x + (x0_weight * s**2 / a) * score
        if eta > 0:
            x = x + c * noise_like(x, generator)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)


def ddpm(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *,
         generator: torch.Generator | None = None, denoise: bool = True,
         callback: Callback | None = None) -> Tensor:
    """DDPM ancestral sampling: DDIM with eta = 1 (each step samples the posterior q(x_t' | x_t, x0_hat))."""
    return ddim(sde, score_fn, x_T, ts, eta=1.0, generator=generator, denoise=denoise, callback=callback)
