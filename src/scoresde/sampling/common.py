"""Helpers shared by the samplers: coefficients, data prediction, the final denoise, noise."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.sde import SDE, LinearSDE, ScoreFn, batch_time, expand_like

Callback = Callable[[int, Tensor, Tensor], None]

__all__ = ["Callback", "alpha_sigma", "data_prediction", "finish", "first_score", "noise_like", "require_linear",
           "check_grid", "schedule", "mask_like"]


def require_linear(sde: SDE, what: str) -> LinearSDE:
    if not isinstance(sde, LinearSDE):
        raise InvalidValueError(f"sde must be a linear SDE (Gaussian kernel) for {what}, got {type(sde).__name__}")
    return sde


def check_grid(ts: Tensor) -> Tensor:
    """A 1-D strictly decreasing grid of at least two times."""
    if ts.dim() != 1 or ts.numel() < 2:
        raise InvalidValueError(f"ts must be a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}")
    if not (ts[1:] < ts[:-1]).all():
        raise InvalidValueError("ts must be strictly decreasing (from T down to t_end)")
    return ts


def schedule(sde: LinearSDE, ts: Tensor) -> tuple[list[float], list[float], list[float]]:
    """alpha, sigma and lambda = log(alpha / sigma) at every grid time, computed once in float64 as
    Python floats, so a solver step costs only its tensor updates of x."""
    t = ts.detach().to("cpu", torch.float64)
    return sde.alpha(t).tolist(), sde.sigma(t).tolist(), sde.log_snr(t).tolist()


def alpha_sigma(sde: LinearSDE, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """alpha(t), sigma(t) broadcast against x (t a scalar)."""
    tb = batch_time(t, x)
    return expand_like(sde.alpha(tb), x), expand_like(sde.sigma(tb), x)


def first_score(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, t: Tensor, analytic: bool) -> Tensor:
    """The score at the first grid point: s(x, t), or with `analytic` the prior's -x / prior_std^2 at no evaluation,
    the analytical first step (AFS; Zhou et al. 2312.00094) that takes p_T = pi, the approximation x_T ~ pi
    already makes. For VP its error in the noise prediction is about alpha_T E[X_0] / sigma_T (0.0064 E[X_0] for
    beta 0.1 .. 20), which the flow then contracts as the data's spread allows; a sampler with it spends its
    nfe on one more step."""
    return -x / sde.prior_std**2 if analytic else score_fn(x, t.expand(x.shape[0]))


def data_prediction(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, t: Tensor) -> Tensor:
    """Tweedie's formula x0_hat = (x + sigma^2 s(x, t)) / alpha = E[X_0 | X_t = x]; one NFE."""
    a, s = alpha_sigma(sde, t, x)
    return (x + s**2 * score_fn(x, batch_time(t, x))) / a


def finish(sde: SDE, score_fn: ScoreFn, x: Tensor, t_end: Tensor, denoise: bool,
           callback: Callback | None, step: int, previous: tuple[Tensor, float] | None = None) -> Tensor:
    """The optional final denoising step at t_end (one NFE), reported to the callback at t = 0.

    With `previous` = (x0_hat at the grid point before t_end, its r^2 = (sigma / alpha)^2) the result is
    extrapolated to r = 0 linearly in r^2: along the probability flow x0_hat = x0 + c r^2 + O(r^4), so the
    O(r^2) shrinkage of the plain Tweedie step cancels at no extra NFE."""
    if not denoise:
        return x
    sde = require_linear(sde, "the final denoising step")
    x = data_prediction(sde, score_fn, x, t_end)
    if previous is not None:
        x0_prev, r2_prev = previous
        r2 = float(torch.exp(-2 * sde.log_snr(t_end.detach().to("cpu", torch.float64))))
        x = x + (x - x0_prev) * (r2 / (r2_prev - r2))
    if callback is not None:
        callback(step, torch.zeros_like(t_end), x)
    return x


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def mask_like(known: Tensor, mask: Tensor) -> Tensor:
    """mask in known's dtype, refused unless it has the shape of known or of its trailing dimensions (one sample)."""
    if mask.shape != known.shape[-mask.dim():] and mask.shape != known.shape:
        raise InvalidValueError(f"mask must have the shape of known {tuple(known.shape)} or of one sample, got "
                                f"{tuple(mask.shape)}")
    return mask.to(known.dtype)
