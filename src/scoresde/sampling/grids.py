"""Time grids for the samplers (DESIGN section 4): decreasing times from T to t_end.

Every grid is built in float64 and returned in the requested dtype; the end points are
exactly T and t_end. Grids other than "uniform" and "poly" are spaced in the log-SNR
lambda(t) = log(alpha / sigma) and need `sde.inverse_log_snr`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.sde import SDE, LinearSDE

__all__ = ["GRIDS", "time_grid", "end_time_for_steps", "logsnr_grid"]

GRIDS = ("uniform", "logsnr", "edm", "poly")


def _lam(sde: LinearSDE, t: float) -> Tensor:
    return sde.log_snr(torch.tensor(t, dtype=torch.float64))


def time_grid(sde: SDE, n_steps: int, kind: str = "logsnr", t_end: float | None = None,
              rho: float = 7.0, power: float = 2.0, dtype: torch.dtype = torch.float64,
              device=None) -> Tensor:
    """n_steps + 1 decreasing times from sde.T to t_end (default sde.t_min).

    kind: "uniform" in t; "logsnr" uniform in lambda = log(alpha / sigma) (DPM-Solver);
    "edm": the rho-schedule of Karras et al. (2206.00364 eq. 5) applied to the
    noise-to-signal ratio sigma / alpha = e^{-lambda} (for VE-EDM this is sigma itself);
    "poly": t_i = (T^{1/p} + i/N (t_end^{1/p} - T^{1/p}))^p with p = `power`
    (p = 2 is DPM-Solver's "time quadratic").
    """
    if int(n_steps) != n_steps or n_steps < 1:
        raise InvalidValueError(f"n_steps must be an integer >= 1, got {n_steps}")
    if kind not in GRIDS:
        raise InvalidValueError(f"kind must be one of {', '.join(GRIDS)}, got {kind!r}")
    T = float(sde.T)
    t_end = float(sde.t_min) if t_end is None else float(t_end)
    if not 0 < t_end < T:
        raise InvalidValueError(f"t_end must lie in (0, T = {T}), got {t_end}")
    u = torch.linspace(0, 1, int(n_steps) + 1, dtype=torch.float64)
    if kind == "uniform":
        ts = T + u * (t_end - T)
    elif kind == "poly":
        if not power > 0:
            raise InvalidValueError(f"power must be > 0, got {power}")
        ts = (T ** (1 / power) + u * (t_end ** (1 / power) - T ** (1 / power))) ** power
    else:
        lam_T, lam_end = _lam(sde, T), _lam(sde, t_end)
        if kind == "logsnr":
            lam = lam_T + u * (lam_end - lam_T)
        else:
            if not rho > 0:
                raise InvalidValueError(f"rho must be > 0, got {rho}")
            s_max, s_min = torch.exp(-lam_T / rho), torch.exp(-lam_end / rho)
            lam = -rho * torch.log(s_max + u * (s_min - s_max))
        ts = sde.inverse_log_snr(lam)
    ts[0], ts[-1] = T, t_end
    if not (ts[1:] < ts[:-1]).all():
        raise InvalidValueError(f"grid {kind!r} is not strictly decreasing for {n_steps} steps; use fewer steps")
    return ts.to(dtype=dtype, device=device)


EXTRAPOLATED_END_RATIO = 0.045  # end_time_for_steps' floor, for the extrapolated denoise (see there)


def end_time_for_steps(sde: LinearSDE, n_steps: int, scale: float = 0.4,
                       min_ratio: float = EXTRAPOLATED_END_RATIO) -> float:
    """The end time whose noise-to-signal ratio sigma / alpha is max(scale / n_steps, min_ratio), never
    below sde.t_min.

    Few steps cannot resolve the last, fastest part of the flow, and stopping early with a denoising step
    costs less than crossing it coarsely; the extrapolated denoise of the unipc methods leaves an O(ratio^4)
    error, so there is no need to go below ratio ~ 0.045 (t = 0.01 for VP) at any step count. Both constants
    were chosen by benchmarks/samplers.py (best VP end times about 0.03 at NFE 5 and 0.01 from NFE 10 to 100;
    0.0033 lost at NFE 20 on the 16-D mixture, its log-density gap -0.2 against -0.02). A plain Tweedie
    denoise leaves O(ratio^2) and wants min_ratio = 0 (sa3).
    """
    if int(n_steps) != n_steps or n_steps < 1:
        raise InvalidValueError(f"n_steps must be an integer >= 1, got {n_steps}")
    if not (scale > 0 and min_ratio >= 0):
        raise InvalidValueError(f"scale must be > 0 and min_ratio >= 0, got scale={scale}, min_ratio={min_ratio}")
    lam = torch.tensor(-math.log(max(scale / n_steps, min_ratio)), dtype=torch.float64)
    t_min, T = float(sde.t_min), float(sde.T)
    if lam >= _lam(sde, t_min) or lam <= _lam(sde, T):
        return t_min
    return float(sde.inverse_log_snr(lam))


def logsnr_grid(sde: LinearSDE, t_start: float, t_end: float, fractions) -> Tensor:
    """Decreasing times from t_start to t_end (exactly) whose log-SNR steps are the given positive `fractions`
    (summing to 1) of lambda(t_end) - lambda(t_start): the knots `fit_grid` and `auto_schedule` move."""
    fractions = torch.as_tensor(fractions, dtype=torch.float64)
    lam_start, lam_end = _lam(sde, t_start), _lam(sde, t_end)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(fractions, 0)])
    ts = sde.inverse_log_snr(lam_start + (lam_end - lam_start) * cum / cum[-1])
    ts[0], ts[-1] = t_start, t_end
    return ts
