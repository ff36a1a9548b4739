"""Adaptive-step reverse-SDE solver of Jolicoeur-Martineau et al. 2105.14080 ("Gotta Go Fast", Algorithm 1).

Each iteration proposes a step h down from t with one Brownian increment sqrt(h) z shared by an
Euler-Maruyama step and an improved-Euler (stochastic Heun) step of the reverse SDE
dx = [f - g^2 s] dt + g dW-bar (T 2.7), written for t decreasing:

    x'  = x - h [f(x, t) - g(t)^2 s(x, t)] + g(t) sqrt(h) z                          (EM)
    x~  = x - h [f(x', t - h) - g(t - h)^2 s(x', t - h)] + g(t - h) sqrt(h) z
    x'' = (x' + x~) / 2                                                              (improved Euler)

The local error estimate is E = |(x' - x'') / delta|_2 / sqrt(n) over a sample's n entries, with the mixed
tolerance delta = max(atol, rtol max(|x'|, |x'_prev|)) entrywise (x'_prev: the EM proposal of the last
accepted step). The step is accepted when E <= 1 (x <- x'', t <- t - h; the higher-order result, their
"extrapolation"), and either way h <- min(t - t_end, safety h E^{-exponent}). Defaults are the paper's:
rtol 0.05, atol 0.0078 (data in [-1, 1]), safety 0.9, exponent r = 0.9, first step 0.01 of the time span
(h_init = 0.01 on their [0, 1]).

Step sizes are per sample, as in the authors' code: every sample of the batch has its own t, h and x'_prev,
the score is evaluated on the whole batch at per-sample times (two evaluations per iteration, finished
samples take steps of length 0), so the NFE is twice the iterations of the slowest sample (+1 denoise).
A rejected step draws a fresh z for its shorter retry, as the paper does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.sde import SDE, ScoreFn, expand_like
from ..core.validate import check, number, one_of
from .common import Callback, finish
from .noise import Noise, step_noise

__all__ = ["adaptive_sde"]


def adaptive_sde(sde: SDE, score_fn: ScoreFn, x_T: Tensor, *, t_end: float | None = None, rtol: float = 0.05,
                 atol: float = 0.0078, h_init: float = 0.01, safety: float = 0.9, exponent: float = 0.9,
                 noise: Noise = "gaussian", generator: torch.Generator | None = None, denoise: bool = True,
                 callback: Callback | None = None) -> Tensor:
    """Adaptive EM / improved-Euler pair on the reverse SDE from sde.T to t_end (default sde.t_min); module
    docstring. h_init: the first step as a fraction of T - t_end. noise: "gaussian" or a callable i -> z_i
    (the i-th iteration's standard normal; `sampling.noise`). The NFE depends on the tolerances; `sample`
    caps it at nfe (RuntimeError naming nfe when the tolerance needs more). callback(i, t, x) gets the
    per-sample times t of shape (batch,) after each iteration."""
    rtol, atol = number("rtol", rtol, 0), number("atol", atol, 0)
    number("h_init", h_init, 0)
    check("h_init", h_init, h_init <= 1, "in (0, 1], a fraction of T - t_end")
    number("safety", safety, 0)
    number("exponent", exponent, 0)
    if not callable(noise):
        one_of("noise", noise, ("gaussian",))  # no fixed grid: the per-sample steps share no Brownian tree
    t_end = sde.t_min if t_end is None else number("t_end", t_end, 0, strict=False)
    check("t_end", t_end, t_end < sde.T, f"below T = {sde.T}")
    span = torch.tensor([sde.T, t_end], dtype=x_T.dtype, device=x_T.device)
    draw = step_noise(noise, x_T, span, sde.T, generator)
    x, x_prev = x_T, x_T
    t, end = span[0].expand(x.shape[0]), span[1].expand(x.shape[0])
    h = torch.minimum(h_init * (t - end), t - end)
    if callback is not None:
        callback(0, t, x)
    step = 0
    while bool((t > end).any()):
        t_next = torch.where(h >= t - end, end, t - h)  # land exactly on t_end
        h = t - t_next
        z = expand_like(h.sqrt(), x) * draw(step)
        g, g_next = expand_like(sde.diffusion(t), x), expand_like(sde.diffusion(t_next), x)
        k1 = expand_like(h, x) * (g**2 * score_fn(x, t) - sde.drift(t, x))
        x_em = x + k1 + g * z
        k2 = expand_like(h, x) * (g_next**2 * score_fn(x_em, t_next) - sde.drift(t_next, x_em))
        x_heun = x + 0.5 * (k1 + k2) + 0.5 * (g + g_next) * z
        delta = torch.maximum(x_em.abs(), x_prev.abs()).mul(rtol).clamp_min(atol)
        err = ((x_em - x_heun) / delta).flatten(1).pow(2).mean(1).sqrt()
        if not bool(torch.isfinite(err).all()):
            raise RuntimeError(f"adaptive_sde: the error estimate is not finite at step {step} (is the score finite?)")
        accept = err <= 1
        x = torch.where(expand_like(accept, x), x_heun, x)
        x_prev = torch.where(expand_like(accept, x), x_em, x_prev)
        t = torch.where(accept, t_next, t)
        h = torch.minimum(t - end, safety * h * err.clamp_min(1e-12) ** -exponent)
        step += 1
        if callback is not None:
            callback(step, t, x)
    return finish(sde, score_fn, x, span[1], denoise, callback, step + 1)
