"""Inpainting by twisted sequential Monte Carlo (the Twisted Diffusion Sampler: Wu, Trippe, Naesseth, Blei and
Cunningham 2023, arXiv 2306.17775, Algorithm 1), which tends to the model's exact conditional as particles grow.

The known pixels are an observation y = M x_0 + sigma_y e (M: the mask, e standard normal; sigma_y small stands
in for an exact observation). K particles per image run the reverse SDE discretised by Euler-Maruyama (T 5.21)
or the exponential integrator (T 5.20), x' = lin x + c s(x, t) + sqrt(v) z, with the score s steered by the
gradient of a twisting function, an approximation of p_t(y | x_t) built on Tweedie's estimate
x0_hat = (x + sigma^2 s) / alpha:

    log p~_t(y | x) = -w |M (y - x0_hat(x, t))|^2 / (2 (sigma_y^2 + sigma^2 / alpha^2))

(w: a weight). The variance grows with the noise-to-signal ratio sigma / alpha as the error of x0_hat does: a
learned eps-model's error e gives x0_hat an error (sigma / alpha) e, 150 e at the VP prior. With Pi-GDM's
bounded sigma^2 / (alpha^2 + sigma^2) (Song et al. 2023) the guidance on the MNIST VP model diverged at the
first steps (x0_hat ~ 6e3, samples NaN by step 60); with sigma^2 / alpha^2 the twisting is flat where x0_hat
is noise and sharpens as it firms up.
The proposal q adds c grad log p~_t to the mean of the model's step p; each particle carries the importance
weight of the path, w_T = p~_T(y | x_T) and per step

    w <- w p(x' | x) p~_t'(y | x') / (q(x' | x) p~_t(y | x)),     log p/q = -(2 sqrt(v) z . u + |u|^2) / (2 v),

u = c grad log p~_t (both steps are Gaussian with covariance v I), and at the end w <- w L(y | x0_hat) / p~,
L = N(y; M x0_hat, sigma_y^2), x0_hat the final denoise. The product telescopes to p(path) L / q(path): whatever
the twisting, the weighted particles target p(x_0) L(y | x_0) of the discretised model, exactly as K -> infinity
(the twisting sets only how many particles that takes). The particles of an image are resampled (systematic)
when their effective sample size falls under ess_min K; one particle per image is returned, drawn by weight.

Cost: nfe score evaluations per particle, each with one vector-Jacobian product (the gradient of log p~).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import InvalidValueError, NonFiniteError
from ..core.gaussian import step_coefficients
from ..core.sde import LinearSDE, ScoreFn, batch_dot, batch_time
from ..core.validate import integer, number
from .common import mask_like
from .grids import time_grid
from .methods import METHODS

__all__ = ["twisted_inpaint", "TWISTED_SAMPLERS"]

TWISTED_SAMPLERS = {"em": False, "ei": True}  # the reverse-SDE steps of the particles: exponential integrator?


def twisted_inpaint(sde: LinearSDE, score_fn: ScoreFn, known: Tensor, mask: Tensor, *, particles: int = 8,
                    sampler: str = "em", nfe: int = 100, weight: float = 1.0, sigma_y: float = 0.05,
                    ess_min: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Fill the pixels of `known` outside `mask` (1 = known; the shape of known or of one sample) by twisted SMC
    (module docstring) with `particles` particles per image, `sampler` "em" or "ei" on its default grid and
    nfe - 1 steps (nfe score evaluations and as many vector-Jacobian products per particle), twisting weight
    `weight`, observation noise `sigma_y`, resampling below ess_min * particles. Known pixels are kept."""
    if not isinstance(sde, LinearSDE):
        raise InvalidValueError(f"sde must be a linear SDE for twisted inpainting, got {type(sde).__name__}")
    if sampler not in TWISTED_SAMPLERS:
        raise InvalidValueError(f"sampler must be one of {', '.join(TWISTED_SAMPLERS)} for twisted inpainting "
                                f"(its proposal is a Gaussian step), got {sampler!r}")
    integer("particles", particles)
    integer("nfe", nfe, 2)
    number("weight", weight, 0.0)
    number("sigma_y", sigma_y, 0.0)
    if not 0 <= ess_min <= 1:
        raise InvalidValueError(f"ess_min must be in [0, 1], got {ess_min}")
    m0 = mask_like(known, mask)
    n, k = known.shape[0], int(particles)
    m = m0.repeat_interleave(k, 0) if m0.shape == known.shape else m0
    y = known.repeat_interleave(k, 0)
    spec = METHODS[sampler]
    ts = time_grid(sde, nfe - 1, kind=spec.grid, t_end=spec.default_t_end(sde, nfe - 1))
    lin, c, v = step_coefficients(sde, ts.numpy(), exponential=TWISTED_SAMPLERS[sampler])
    alpha, sigma = sde.alpha(ts).tolist(), sde.sigma(ts).tolist()

    def twist(x: Tensor, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """score, x0_hat, log p~ and its gradient at grid time i."""
        a, s = alpha[i], sigma[i]
        var = sigma_y**2 + (s / a) ** 2
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            score = score_fn(xg, batch_time(ts[i].to(x.dtype), x))
            x0 = (xg + s**2 * score) / a
            log_twist = -weight * batch_dot(m * (y - x0), m * (y - x0)) / (2 * var)
            (grad,) = torch.autograd.grad(log_twist.sum(), xg)
        return score.detach(), x0.detach(), log_twist.detach(), grad

    x = sde.prior_sample((n * k,) + tuple(known.shape[1:]), generator, known.dtype, known.device)
    state = twist(x, 0)
    log_w = state[2].clone()  # w_T = p~_T(y | x_T)
    for i in range(len(ts) - 1):
        score, _, log_twist, grad = state
        u = c[i] * grad
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = lin[i] * x + c[i] * score + u + math.sqrt(v[i]) * z
        state = twist(x, i + 1)
        log_w = log_w - (2 * math.sqrt(v[i]) * batch_dot(z, u) + batch_dot(u, u)) / (2 * v[i]) + state[2] - log_twist
        if i < len(ts) - 2:
            x, state, log_w = _resample(x, state, log_w, n, k, ess_min, generator)
    x0, log_twist = state[1], state[2]
    log_w = log_w - batch_dot(m * (y - x0), m * (y - x0)) / (2 * sigma_y**2) - log_twist  # L(y | x0_hat) / p~
    if not bool(torch.isfinite(log_w).all()):
        raise NonFiniteError(f"twisted inpainting at nfe={nfe}: the particles' weights are not finite (the score "
                             "returned NaN/inf, or the guided steps are unstable: raise nfe or lower weight)")
    pick = torch.multinomial(torch.softmax(log_w.view(n, k).double(), 1), 1, generator=generator)[:, 0]
    x0 = x0.view(n, k, *x0.shape[1:])[torch.arange(n, device=pick.device), pick]
    return m0 * known + (1 - m0) * x0


def _resample(x: Tensor, state: tuple[Tensor, ...], log_w: Tensor, n: int, k: int, ess_min: float,
              generator: torch.Generator | None) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """Systematic resampling of the images whose particles' effective sample size is under ess_min * k."""
    w = torch.softmax(log_w.view(n, k).double(), 1)
    need = 1 / w.pow(2).sum(1) < ess_min * k
    if not need.any():
        return x, state, log_w
    u = (torch.rand(n, 1, generator=generator, dtype=torch.float64, device=w.device)
         + torch.arange(k, dtype=torch.float64, device=w.device)) / k
    cdf = w.cumsum(1)
    idx = torch.searchsorted(cdf, u).clamp_(max=k - 1)
    idx = torch.where(need[:, None], idx, torch.arange(k, device=w.device))
    flat = (torch.arange(n, device=w.device)[:, None] * k + idx).reshape(-1)
    log_w = torch.where(need[:, None], torch.zeros_like(w, dtype=log_w.dtype), log_w.view(n, k)).reshape(-1)
    return x[flat], tuple(s[flat] for s in state), log_w
