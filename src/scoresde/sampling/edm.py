"""EDM's stochastic sampler (Karras et al. 2206.00364, Algorithm 2) for any linear SDE.

EDM works on the noise level s = sigma / alpha = e^{-lambda}: y = x / alpha follows the VE process
y_t = y_0 + s(t) eps (the change of variables of `consistency`). Step i from t_i to t_{i+1} of N:
 1. churn (Alg. 2 lines 4-6): gamma = min(S_churn / N, sqrt(2) - 1) when S_tmin <= s_i <= S_tmax, else 0;
    raise the level to s_hat = (1 + gamma) s_i, i.e. lambda_hat = lambda_i - log(1 + gamma), by the exact
    forward transition y_hat = y + sqrt(s_hat^2 - s_i^2) S_noise z, in x: x_hat = (alpha_hat / alpha_i) x
    + alpha_hat sqrt(s_hat^2 - s_i^2) S_noise z. s_hat is capped at s(T), so the churn never leaves [t_min, T];
 2. Heun's step of the probability flow from t_hat to t_{i+1} (Alg. 2 lines 7-10; the step of `ode.heun`,
    exactly EDM's dy/ds = (y - x0_hat) / s for VE-EDM), two evaluations.
With gamma = 0 the step is `heun`'s, operation for operation, so S_churn = 0 reproduces `heun` bit for bit.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.sde import LinearSDE, ScoreFn
from ..core.validate import check, number, positive
from .common import Callback, check_grid, finish, require_linear
from .noise import Noise, step_noise
from .ode import explicit_step

__all__ = ["DEFAULT_S_CHURN", "edm_sde"]

# stochastic by default, as the method's name promises (S_churn = 0 is `heun`). Up to 25 steps any S_churn >= 10
# saturates gamma at sqrt(2) - 1, so 10, 20, 40 and 80 tied on ring and mix16 under VP and VE at NFE 11-51;
# the churn beat S_churn = 0 in 6 of those 12 cases (|log-density gap|)
DEFAULT_S_CHURN = 40.0


def edm_sde(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor, ts: Tensor, *, S_churn: float = DEFAULT_S_CHURN,
            S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0, noise: Noise = "gaussian",
            generator: torch.Generator | None = None, denoise: bool = True,
            callback: Callback | None = None) -> Tensor:
    """EDM Algorithm 2 (module docstring) on the decreasing grid ts; S_tmin, S_tmax bound the noise-to-signal
    ratio sigma / alpha of the churned steps, S_noise scales the churn noise (`noise.step_noise` picks z).
    NFE = 2 (len(ts) - 1) + denoise."""
    sde = require_linear(sde, "the EDM stochastic sampler")
    number("S_churn", S_churn, 0, strict=False)
    number("S_tmin", S_tmin, 0, strict=False)
    check("S_tmax", S_tmax, isinstance(S_tmax, (int, float)) and S_tmax >= S_tmin, f"a number >= S_tmin = {S_tmin}")
    positive("S_noise", S_noise)
    ts = check_grid(ts.to(x_T.dtype))
    n, T = len(ts) - 1, float(sde.T)
    gamma = min(S_churn / n, math.sqrt(2) - 1)
    draw = step_noise(noise, x_T, ts, T, generator) if gamma > 0 else None
    t64 = ts.detach().to("cpu", torch.float64)
    b, half_g2, lam = sde.b(t64).tolist(), (0.5 * sde.diffusion(t64) ** 2).tolist(), sde.log_snr(t64).tolist()
    lam_T = float(sde.log_snr(torch.tensor(T, dtype=torch.float64)))

    def drift(point, x):  # the probability flow -b x - g^2 s / 2 at point = (t, b(t), g(t)^2 / 2), as `heun`
        t, b_t, half_g2_t = point
        return -b_t * x - half_g2_t * score_fn(x, t.expand(x.shape[0]))

    x = x_T
    if callback is not None:
        callback(0, ts[0], x)
    for i in range(n):
        start = (ts[i], b[i], half_g2[i])
        if gamma > 0 and S_tmin <= math.exp(-lam[i]) <= S_tmax and lam[i] > lam_T:
            lam_hat = max(lam[i] - math.log1p(gamma), lam_T)
            t_hat = torch.tensor(T if lam_hat == lam_T else float(sde.inverse_log_snr(torch.tensor(lam_hat, dtype=torch.float64))),
                                 dtype=torch.float64)
            a_i, a_hat = (float(sde.alpha(t)) for t in (t64[i], t_hat))
            churn = S_noise * a_hat * math.sqrt(math.exp(-2 * lam_hat) - math.exp(-2 * lam[i]))
            x = (a_hat / a_i) * x + churn * draw(i)
            start = (t_hat.to(ts), float(sde.b(t_hat)), 0.5 * float(sde.diffusion(t_hat)) ** 2)
        x = explicit_step(drift, x, start, (ts[i + 1], b[i + 1], half_g2[i + 1]), float(ts[i + 1] - start[0]), True)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return finish(sde, score_fn, x, ts[-1], denoise, callback, n + 1)
