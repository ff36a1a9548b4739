"""Reverse-SDE samplers (T 5.20, 5.21): Euler-Maruyama and the exponential integrator.

Both integrate the time reversal dx = [f(t, x) - g(t)^2 s(x, t)] dt + g(t) dW-bar
(T 2.7, written in forward time) down a decreasing grid ts = (T, ..., t_end), one score
evaluation per step, then optionally denoise with Tweedie's formula at t_end (one more).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ..core.gaussian import ei_coefficients
from ..core.sde import SDE, LinearSDE, ScoreFn, batch_time, expand_like
from .common import Callback, check_grid, finish, noise_like, require_linear
from .noise import Noise, step_noise

__all__ = ["euler_maruyama", "exponential_integrator", "em_step", "em_update", "ei_step", "em_coefficients",
           "ei_grid_coefficients"]


def em_coefficients(sde: LinearSDE, ts: Tensor) -> list[tuple[float, float, float]]:
    """(h, b, g) of every step of the grid for a linear SDE (f = -b x): h = t_i - t_{i+1}, b and g at t_i;
    Python floats computed once on the CPU, so a step on a GPU launches no coefficient kernels."""
    t = ts.detach().to("cpu", torch.float64)
    return list(zip((t[:-1] - t[1:]).tolist(), sde.b(t[:-1]).tolist(), sde.diffusion(t[:-1]).tolist()))


def em_update(sde: SDE, x: Tensor, score: Tensor, t: Tensor, t_next: Tensor, z: Tensor | None = None,
              coefficients: tuple[float, float, float] | None = None) -> Tensor:
    """One Euler-Maruyama step of the reverse SDE (T 5.21) from t down to t_next, given the score at (x, t)
    and the standard normal z (None: no noise, the predictor mean). For a linear SDE
    x <- x + h (b x + g^2 s) + g sqrt(h) z with `coefficients` (h, b, g) (default: from t, t_next)."""
    if isinstance(sde, LinearSDE):
        h, b, g = coefficients or em_coefficients(sde, torch.stack([t, t_next]))[0]
        x = x + h * (b * x + g**2 * score)
        return x if z is None else x + (g * h**0.5) * z
    h, tb = t - t_next, batch_time(t, x)
    x = x - h * (sde.drift(tb, x) - expand_like(sde.diffusion(tb) ** 2, x) * score)
    return x if z is None else x + expand_like(sde.diffusion(tb), x) * h.sqrt() * z


def em_step(sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor, t_next: Tensor,
            generator: torch.Generator | None = None, noise: bool = True,
            coefficients: tuple[float, float, float] | None = None,
            draw: Callable[[], Tensor] | None = None) -> Tensor:
    """`em_update` with the score evaluated at (x, t), then z = draw() (default: from `generator`) if noise;
    one NFE."""
    score = score_fn(x, batch_time(t, x))
    z = (draw() if draw is not None else noise_like(x, generator)) if noise else None
    return em_update(sde, x, score, t, t_next, z, coefficients)


def euler_maruyama(sde: SDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *,
                   generator: torch.Generator | None = None, noise: Noise = "gaussian", denoise: bool = True,
                   callback: Callback | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE (T 5.21): x <- x - h [f - g^2 s] + g sqrt(h) z, h = t_i - t_{i+1}.

    NFE = len(ts) - 1 + denoise. Without the final denoise the last step adds no noise
    (it returns the predictor mean, as Song et al. 2011.13456 do). `noise` picks the z
    (`noise.step_noise`: "gaussian", "brownian" or a callable).
    """
    ts = check_grid(ts.to(x_T.dtype))
    x, n = x_T, len(ts) - 1
    draw = step_noise(noise, x_T, ts, float(sde.T), generator)
    if callback is not None:
        callback(0, ts[0], x)
    coefs = em_coefficients(sde, ts) if isinstance(sde, LinearSDE) else [None] * n
    for i in range(n):
        x = em_step(sde, score_fn, x, ts[i], ts[i + 1], noise=denoise or i < n - 1, coefficients=coefs[i],
                    draw=partial(draw, i))
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)


def ei_grid_coefficients(sde: LinearSDE, ts: Tensor) -> list[tuple[float, float, float]]:
    """(phi, c, sqrt(v)) of every step of the grid as Python floats (`gaussian.ei_coefficients`), computed once."""
    phi, c, v = ei_coefficients(sde, ts[:-1], ts[1:])
    return list(zip(phi.tolist(), c.tolist(), v.sqrt().tolist()))


def ei_step(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, t: Tensor, t_next: Tensor,
            generator: torch.Generator | None = None,
            coefficients: tuple[float, float, float] | None = None,
            draw: Callable[[], Tensor] | None = None) -> Tensor:
    """One exponential-integrator step (T 5.20) from t down to t_next; one NFE. `coefficients`:
    (phi, c, sqrt(v)) of `ei_grid_coefficients` (default: computed from t, t_next); z = draw() after the
    score (default: from `generator`)."""
    phi, c, sd = coefficients or ei_grid_coefficients(sde, torch.stack([t, t_next]))[0]
    x = phi * x + c * score_fn(x, batch_time(t, x))
    return x + sd * (draw() if draw is not None else noise_like(x, generator))


def exponential_integrator(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *,
                           generator: torch.Generator | None = None, noise: Noise = "gaussian",
                           denoise: bool = True, callback: Callback | None = None) -> Tensor:
    """Exponential integrator (T 5.20; Tang & Zhao 2401.13115): the linear drift -b x and the
    noise are integrated exactly over each step, the score frozen at its start.

    For VP this is x' = e^{dB/2} x + 2 (e^{dB/2} - 1) s + sqrt(e^{dB} - 1) z. NFE = len(ts) - 1 + denoise.
    `noise` picks the z (`noise.step_noise`).
    """
    sde = require_linear(sde, "the exponential integrator")
    ts = check_grid(ts.to(x_T.dtype))
    x, n = x_T, len(ts) - 1
    draw = step_noise(noise, x_T, ts, float(sde.T), generator)
    if callback is not None:
        callback(0, ts[0], x)
    coefs = ei_grid_coefficients(sde, ts)
    for i in range(n):
        x = ei_step(sde, score_fn, x, ts[i], ts[i + 1], coefficients=coefs[i], draw=partial(draw, i))
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)
