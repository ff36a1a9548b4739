"""Time grids fitted to one model: the knots that minimise a deterministic sampler's global error.

A few-step solver's error depends on where its steps fall far more than on its order, and the best
place depends on the data (where x0_hat changes fastest). Following the idea of schedule optimisation
(Watson et al. 2106.03802; Sabour et al. 2404.14507, "Align Your Steps"; Chen et al. 2405.11326, GITS),
`fit_grid` moves the interior knots to minimise the mean squared distance between the sampler's output
and a converged run of the same sampler from the same prior draws. It uses only the score model: no
data, no metric. The knots live in lambda = log(alpha / sigma), so it works for every linear SDE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.sde import LinearSDE, ScoreFn
from .grids import logsnr_grid, time_grid
from .methods import METHODS, default_denoise, sample_on_grid, steps_for

__all__ = ["GridFit", "fit_grid"]


@dataclass(frozen=True)
class GridFit:
    """ts: the grid returned (float64, from sde.T to t_end), to pass as `sample(..., ts=ts)`: the fitted one, or
    the starting one where the fitted one was not better on the check draws (fitted False);
    error / start_error: mean squared output error against the reference on the fit draws, for the fitted grid
    and for the starting one; check_error / check_start_error: the same on the check draws (no choice saw them);
    evaluations: score calls spent on probe batches."""

    ts: Tensor
    error: float
    start_error: float
    check_error: float
    check_start_error: float
    fitted: bool
    evaluations: int


def fit_grid(sde: LinearSDE, score_fn: ScoreFn, x_probe: Tensor, *, method: str, nfe: int,
             t_end: float | None = None, reference_steps: int = 200, min_fraction: float = 0.01,
             max_iter: int | None = None, x_check: Tensor | None = None, **options) -> GridFit:
    """Fit the grid of `sample(sde, score_fn, method=method, nfe=nfe, **options)` to this model.

    x_probe: prior draws (a few hundred suffice; keep them apart from the draws you sample from). The fit sees
    x_probe and is checked on x_check (default: x_probe is split in halves, the second half is x_check): the
    fitted grid is returned only where its error there is below the starting grid's, else the starting grid.
    The reference is the same method with `reference_steps` on a log-SNR grid to the same t_end (default:
    the method's own default end time). The objective is log mean ||x(ts) - x_ref||^2 over the probe
    draws, minimised by Nelder-Mead over the log step lengths in lambda, starting from the method's
    default grid; each step keeps at least `min_fraction` of the lambda range. Costs about
    reference_steps + (max_iter + 4) * nfe score evaluations of a probe batch (max_iter: 150 n_steps).

    The fit minimises path error, not a distribution distance: choose t_end by measurement as for any
    grid (on the 16-D mixture of benchmarks/samplers.py, unipc3 with lower_order_final=False at NFE 5, a grid
    fitted to noise-to-signal 0.1 at the end lost to the unfitted one; fitted to 0.34 it won 3x).
    """
    if not isinstance(sde, LinearSDE):
        raise InvalidValueError(f"sde must be a linear SDE for fit_grid, got {type(sde).__name__}")
    spec = METHODS[method] if method in METHODS else None
    if spec is None or spec.adaptive or spec.stochastic(options):
        fixed = [m for m in METHODS if not (METHODS[m].adaptive or METHODS[m].stochastic({}))]
        why = "unknown" if spec is None else "adaptive" if spec.adaptive else "it draws noise with these options"
        raise InvalidValueError(f"method must be a deterministic fixed-grid sampler ({', '.join(fixed)}; ddim at eta = 0), "
                         f"got {method!r} ({why})")
    if not (isinstance(x_probe, Tensor) and x_probe.dim() >= 2 and len(x_probe) >= (1 if x_check is not None else 2)):
        raise InvalidValueError("x_probe must be a batch of prior draws, shape (n, ...), n >= 2 without x_check, got "
                                f"{getattr(x_probe, 'shape', x_probe)}")
    if x_check is None:
        x_probe, x_check = x_probe[:len(x_probe) // 2], x_probe[len(x_probe) // 2:]
    if not (isinstance(x_check, Tensor) and x_check.shape[1:] == x_probe.shape[1:] and len(x_check) >= 1):
        raise InvalidValueError(f"x_check must be a batch of prior draws shaped as x_probe {tuple(x_probe.shape[1:])}, "
                                f"got {getattr(x_check, 'shape', x_check)}")
    if "ts" in options or "grid" in options:
        raise InvalidValueError("fit_grid chooses the grid itself: do not pass ts or grid")
    denoise = bool(options.get("denoise", default_denoise(sde, method, nfe)))
    n_steps = steps_for(method, nfe, denoise, options)
    if int(reference_steps) != reference_steps or reference_steps <= n_steps:
        raise InvalidValueError(f"reference_steps must be an integer > the {n_steps} steps of nfe={nfe}, got {reference_steps}")
    if n_steps < 2:
        raise InvalidValueError(f"nfe={nfe} gives {n_steps} step(s) for {method!r}: nothing to fit")
    if not 0 < min_fraction * n_steps < 1:
        raise InvalidValueError(f"min_fraction must lie in (0, 1 / n_steps = {1 / n_steps:g}), got {min_fraction}")
    if t_end is None:
        t_end = spec.default_t_end(sde, n_steps)
    start = time_grid(sde, n_steps, kind=spec.grid, t_end=t_end, power=spec.power)  # validates t_end

    def run(ts: Tensor, budget: int, x: Tensor) -> Tensor:
        return sample_on_grid(sde, score_fn, None, method=method, nfe=budget, x_T=x, ts=ts, check_finite=False,
                              **options)

    lam = sde.log_snr(start)
    span = float(lam[-1] - lam[0])

    def grid(theta: np.ndarray) -> Tensor:
        w = np.exp(theta - theta.max())
        return logsnr_grid(sde, float(start[0]), float(start[-1]), min_fraction + (1 - n_steps * min_fraction) * w / w.sum())

    ref_nfe = int(reference_steps) * spec.evals_per_step(options) + int(denoise)
    ref_grid = time_grid(sde, int(reference_steps), "logsnr", t_end=t_end)
    reference = {id(x): run(ref_grid, ref_nfe, x) for x in (x_probe, x_check)}
    calls = 0

    def error(ts: Tensor, x: Tensor = x_probe) -> float:
        nonlocal calls
        calls += 1
        return float(((run(ts, nfe, x) - reference[id(x)]) ** 2).flatten(1).sum(1).mean())

    start_error = error(start)
    if not math.isfinite(start_error):
        raise InvalidValueError("the sampler's output on x_probe is not finite at the starting grid: check score_fn")
    theta0 = np.log(np.maximum(np.diff(lam.numpy()) / span - min_fraction, 1e-6))  # the start grid, clipped
    simplex = np.vstack([theta0] + [theta0 + 0.3 * e for e in np.eye(n_steps)])

    def objective(theta: np.ndarray) -> float:
        err = error(grid(theta))
        return math.log(max(err, 1e-300)) if math.isfinite(err) else math.inf

    fit = minimize(objective, theta0, method="Nelder-Mead",
                   options=dict(initial_simplex=simplex, maxiter=max_iter or 150 * n_steps, xatol=1e-3, fatol=1e-4))
    fitted_ts = grid(fit.x)
    check, check_start = error(fitted_ts, x_check), error(start, x_check)
    won = check < check_start
    return GridFit(fitted_ts if won else start, math.exp(fit.fun), start_error, check, check_start, won,
                   2 * ref_nfe + calls * int(nfe))
