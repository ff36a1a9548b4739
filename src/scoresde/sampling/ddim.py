"""DDPM ancestral sampling (Ho et al. 2006.11239) and DDIM (Song et al. 2010.02502).

Written for any (alpha, sigma): with the VP SDE on the grid t_i = i / N they are the
discrete-time samplers of the papers (alpha_bar_i = alpha(t_i)^2). From t to t' < t, with
x0_hat and eps_hat = (x - alpha x0_hat) / sigma from the score,
x' = alpha' x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z,   c = eta sigma' sqrt(1 - e^{-2h}),
h = lambda' - lambda. eta = 1 draws from the posterior q(x_t' | x_t, x0_hat) (DDPM with
the posterior variance beta-tilde); eta = 0 is deterministic and equals the first-order
exponential integrator of the probability-flow ODE.

The two variances of Ho et al. (sec. 3.2) for the step t -> t': beta = sigma^2 - (alpha / alpha')^2 sigma'^2,
the variance of the forward step x_t | x_t' (beta_t of the discrete chain), and the posterior variance
beta-tilde = (sigma' / sigma)^2 beta < beta (Ho et al. eq. 7, "fixed_small" in diffusers; beta is "fixed_large").
`ddpm` takes either; the discrete DDPM family's `models.ddpm.ddpm_sample` defaults to "beta".
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.sde import LinearSDE, ScoreFn
from .common import Callback, check_grid, finish, noise_like, require_linear, schedule

__all__ = ["ddim", "ddpm", "VARIANCES"]


VARIANCES = ("posterior", "beta")


def ddim(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, denoise: bool = True,
         callback: Callback | None = None) -> Tensor:
    """DDIM with stochasticity eta in [0, 1] (2010.02502 eq. 12, 16). NFE = len(ts) - 1 + denoise."""
    if not 0 <= eta <= 1:
        raise InvalidValueError(f"eta must be in [0, 1], got {eta}")
    return _steps(sde, score_fn, x_T, ts, eta, False, generator, denoise, callback)


def ddpm(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, variance: str = "posterior",
         generator: torch.Generator | None = None, denoise: bool = True,
         callback: Callback | None = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. Algorithm 2) on the grid ts: x' = posterior mean
    mu-tilde(x_t, x0_hat) + sigma_step z with sigma_step^2 = beta-tilde ("posterior", the default: DDIM with
    eta = 1) or beta ("beta", as `models.ddpm.ddpm_sample`'s default); module docstring. NFE = len(ts) - 1 + denoise."""
    if variance not in VARIANCES:
        raise InvalidValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    return _steps(sde, score_fn, x_T, ts, 1.0, variance == "beta", generator, denoise, callback)


def _steps(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, eta: float, beta_variance: bool,
           generator: torch.Generator | None, denoise: bool, callback: Callback | None) -> Tensor:
    """DDIM's steps, noise c z with c = eta sigma' sqrt(1 - e^{-2h}); beta_variance scales it by sigma / sigma'
    (c^2 = beta-tilde at eta = 1 becomes beta)."""
    sde = require_linear(sde, "DDIM / DDPM")
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
            x = x + c * (s / s_next if beta_variance else 1.0) * noise_like(x, generator)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)

