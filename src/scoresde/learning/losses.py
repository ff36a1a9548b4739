"""Score-matching objectives, per sample and unreduced (DESIGN section 3; Tang & Zhao section 4).

Scale convention: every loss here is on the scale of the explicit loss (T 4.5)

    L_ESM(x_t, t) = lambda(t) |s(x_t, t) - grad log p_t(x_t)|^2        (no factor 1/2),

and each of the other three equals it in expectation up to a constant that does not depend
on the score function s (T 4.1-4.3). Hence the implicit and sliced losses carry the factor 2
on the divergence that the (1/2)|.|^2 form of T 4.4 / 4.8 puts on |s|^2 instead:

    implicit  (T 4.4, 4.6)  lambda [ |s|^2 + 2 div_x s ]                      (Hyvarinen 2005)
    sliced    (T 4.8)       lambda mean_m [ (v_m^T s)^2 + 2 v_m^T (grad_x s) v_m ]   (Song et al. 1905.07088)
              variance-reduced: |s|^2 in place of (v_m^T s)^2 (exact when E v v^T = I)
    denoising (T 4.9-4.12)  lambda |s(x_t, t) + (x_t - alpha x0) / sigma^2|^2 = lambda |s + z / sigma|^2
                            (Vincent 2011); lambda = sigma^2 gives the eps loss |sigma s + z|^2.

so the differences L(s_1) - L(s_2) agree exactly in expectation across all four.

Time: t ~ U(t_min, T) unless `t` (shape (batch,)) is given. With `importance=True` t is
drawn instead from q(t) proportional to lambda(t) / sigma(t)^2 (the typical size of the
integrand, since |grad log p_t| ~ 1/sigma; for lambda = g^2 this is Song et al. 2101.09258's
choice), using a piecewise-constant density on a geometric grid of [t_min, T]; each sample
is multiplied by the exact ratio (1 / (T - t_min)) / q(t), so the expectation is unchanged.

Weightings lambda(t): "sigma2" (sigma(t)^2, default), "g2" (g(t)^2, likelihood weighting,
Song et al. 2101.09258), "uniform" (1), "min_snr" (sigma^2 min(SNR, 5) / SNR, SNR = alpha^2 / sigma^2:
Min-SNR-5 of Hang et al. 2303.09556, eq. 7 on the eps loss), "edm" (EDM's objective, Karras et al.
2206.00364 eq. 2 with Table 1's lambda and ln(sigma / alpha) ~ N(-1.2, 1.2^2), sigma_data 0.5, written
as a weight on uniform t; pair it with importance=True and parametrization "edm": on an eps network it fails),
or a callable t -> lambda(t) of shape (batch,).

SDEs: x_t = alpha x0 + sigma z for linear SDEs. For `Langevin` (no Gaussian marginal) the
explicit, implicit and sliced losses simulate x_t from x0 with Euler-Maruyama
(`scoresde.sde.simulate`, `n_steps` steps up to each sample's own t); there the weighting
must be "g2", "uniform" or a callable, and `noise` cannot be given. Denoising needs the
Gaussian kernel and refuses Langevin.

The implicit loss computes the divergence exactly with one backward pass per coordinate
(cost O(d) backward passes; fine for low d); sliced costs one vector-Jacobian product per
projection. Both assume `score_fn` treats samples independently (no batch statistics).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.registry import Registry
from ..core.sde import SDE, Langevin, LinearSDE, ScoreFn, as_time, batch_dot, expand_like, simulate
from ..core.validate import batch_tensor, integer

Weighting = str | Callable[[Tensor], Tensor]

__all__ = [
    "WEIGHTINGS", "PROJECTIONS", "loss_weight", "sample_time", "explicit_score_matching",
    "implicit_score_matching", "sliced_score_matching", "denoising_score_matching", "LOSSES",
]

WEIGHTINGS = ("sigma2", "g2", "uniform", "min_snr", "edm")
MIN_SNR_GAMMA = 5.0  # Hang et al. 2303.09556: the gamma of their experiments
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA = -1.2, 1.2, 0.5  # Karras et al. 2206.00364, Table 1
PROJECTIONS = ("gaussian", "rademacher")
_GRID_CELLS = 1024


def _sqnorm(v: Tensor) -> Tensor:
    return v.flatten(1).pow(2).sum(1)


def batch_dot(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).flatten(1).sum(1)


def _sigma(sde: SDE, t: Tensor, what: str) -> Tensor:
    if not isinstance(sde, LinearSDE):
        raise InvalidValueError(f"{what} needs sigma(t), which {type(sde).__name__} lacks (no Gaussian marginal); "
                         f"use weighting 'g2', 'uniform' or a callable")
    return sde.sigma(t)


def loss_weight(sde: SDE, t: Tensor, weighting: Weighting = "sigma2") -> Tensor:
    """lambda(t) of shape (batch,): sigma(t)^2, g(t)^2, 1 or weighting(t)."""
    if callable(weighting):
        lam = as_time(weighting(t), t)
        if lam.shape not in ((), t.shape):
            raise InvalidValueError(f"weighting(t) must return a scalar or shape {tuple(t.shape)}, got {tuple(lam.shape)}")
        lam = lam.expand(t.shape)
        if not torch.isfinite(lam).all() or (lam < 0).any():
            raise InvalidValueError("weighting(t) must return finite values >= 0")
        return lam
    if weighting == "sigma2":
        return _sigma(sde, t, "weighting 'sigma2'") ** 2
    if weighting == "g2":
        return sde.diffusion(t) ** 2
    if weighting == "uniform":
        return torch.ones_like(t)
    if weighting == "min_snr":
        ratio = (_sigma(sde, t, "weighting 'min_snr'") / sde.alpha(t)) ** 2  # 1 / SNR
        return sde.sigma(t) ** 2 * torch.clamp(MIN_SNR_GAMMA * ratio, max=1.0)
    if weighting == "edm":
        return _edm_weight(sde, t)
    raise InvalidValueError(f"weighting must be one of {', '.join(WEIGHTINGS)} or a callable t -> lambda(t), "
                     f"got {weighting!r}")


def _edm_density(sde: SDE, t: Tensor) -> Tensor:
    """(T - t_min) p(t), p the density of t when ln(sigma / alpha) ~ N(P_mean, P_std^2) (EDM's noise levels)."""
    with torch.enable_grad():
        tt = t.detach().requires_grad_(True)
        log_s = -sde.log_snr(tt)
        (dlog_s,) = torch.autograd.grad(log_s.sum(), tt)
    u = (log_s.detach() - EDM_P_MEAN) / EDM_P_STD
    return (float(sde.T) - float(sde.t_min)) * torch.exp(-0.5 * u**2) / (EDM_P_STD * math.sqrt(2 * math.pi)) * dlog_s.abs()


def _edm_weight(sde: SDE, t: Tensor) -> Tensor:
    """EDM's E_{ln s ~ N(P_mean, P_std^2)} lambda(s) |x0_hat - x0|^2 at noise level s = sigma / alpha as a weight
    on t ~ U(t_min, T): |x0_hat - x0|^2 = (sigma^4 / alpha^2) |s_theta + z / sigma|^2 and lambda(s) =
    (s^2 + sd^2) / (s sd)^2 give lambda(t) = (T - t_min) p(t) sigma^2 (1 + s^2 / sd^2)."""
    sigma = _sigma(sde, t, "weighting 'edm'")
    return _edm_density(sde, t) * sigma**2 * (1 + (sigma / sde.alpha(t)) ** 2 / EDM_SIGMA_DATA**2)


def sample_time(sde: SDE, n: int, *, weighting: Weighting = "sigma2", importance: bool = False,
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                device=None) -> tuple[Tensor, Tensor]:
    """Times t of shape (n,) on [t_min, T] and per-sample factors r with E_q[r f(t)] = E_U[f(t)].

    Uniform: r = 1. Importance: q(t) proportional to lambda(t) / sigma(t)^2 (for "edm": EDM's lognormal
    noise levels, its own proposal), piecewise constant on a geometric grid (linear when t_min = 0),
    r = 1 / ((T - t_min) q(t)) exactly.
    """
    lo, hi = float(sde.t_min), float(sde.T)
    if not importance:
        t = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        return t.to(dtype), torch.ones(n, dtype=dtype, device=device)
    if lo > 0:
        edges = torch.logspace(math.log10(lo), math.log10(hi), _GRID_CELLS + 1, dtype=torch.float64, device=device)
    else:
        edges = torch.linspace(lo, hi, _GRID_CELLS + 1, dtype=torch.float64, device=device)
    widths = edges.diff()
    mids = 0.5 * (edges[1:] + edges[:-1])
    density = _edm_density(sde, mids) if weighting == "edm" else \
        loss_weight(sde, mids, weighting) / _sigma(sde, mids, "importance sampling") ** 2
    mass = density * widths
    if not (torch.isfinite(mass).all() and mass.sum() > 0):
        raise InvalidValueError("importance sampling needs lambda(t) / sigma(t)^2 finite and not all zero on [t_min, T]")
    cell = torch.multinomial(mass, n, replacement=True, generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    t = edges[cell] + u * widths[cell]
    r = mass.sum() / ((hi - lo) * density[cell])
    return t.to(dtype), r.to(dtype)


def _times(sde: SDE, x0: Tensor, t: Tensor | None, generator, weighting: Weighting,
           importance: bool) -> tuple[Tensor, Tensor]:
    """Per-sample times and the per-sample factor lambda(t) * r (r from importance sampling)."""
    n = x0.shape[0]
    if t is None:
        batch_tensor("x0", x0)  # NaN/inf data name x0, not a NaN loss
        t, r = sample_time(sde, n, weighting=weighting, importance=importance, generator=generator,
                           dtype=x0.dtype, device=x0.device)
    else:
        if importance:
            raise InvalidValueError("importance=True samples t itself; pass either t or importance=True, not both")
        t = as_time(t, x0)
        if t.shape != (n,):
            raise InvalidValueError(f"t must have shape ({n},) (one time per sample), got {tuple(t.shape)}")
        t_ok, x_ok = torch.stack((((t > 0) & (t <= sde.T)).all(), x0.isfinite().all())).tolist()  # one sync
        if not t_ok:  # NaN fails both comparisons
            raise InvalidValueError(f"t must lie in (0, T = {sde.T}]")
        if not x_ok:
            raise InvalidValueError("x0 must be finite, got non-finite values")
        r = torch.ones_like(t)
    return t, loss_weight(sde, t, weighting) * r


def _perturb(sde: SDE, x0: Tensor, t: Tensor, noise: Tensor | None, generator,
             n_steps: int) -> tuple[Tensor, Tensor | None]:
    """x_t given x0: alpha x0 + sigma z for linear SDEs, Euler-Maruyama for Langevin."""
    if isinstance(sde, Langevin):
        if noise is not None:
            raise InvalidValueError("noise cannot be given for Langevin: x_t is simulated, pass generator instead")
        return simulate(sde, x0, t, n_steps=n_steps, generator=generator), None
    if not isinstance(sde, LinearSDE):
        raise InvalidValueError(f"sde must be a LinearSDE or Langevin, got {type(sde).__name__}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif noise.shape != x0.shape:
        raise InvalidValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    return sde.sample_marginal(x0, t, noise), noise


def _score(score_fn: ScoreFn, x: Tensor, t: Tensor, name: str = "score_fn") -> Tensor:
    s = score_fn(x, t)
    if not isinstance(s, Tensor) or s.shape != x.shape:
        raise InvalidValueError(f"{name}(x, t) must return a tensor of the shape of x {tuple(x.shape)}, got "
                         + (f"{tuple(s.shape)}" if isinstance(s, Tensor) else type(s).__name__))
    return s


def _setup(sde: SDE, x0: Tensor, t: Tensor | None, noise: Tensor | None, generator, weighting: Weighting,
           importance: bool, n_steps: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    batch_tensor("x0", x0, finite=False)  # finiteness: in `_times`, with t's check in one sync
    t, lam = _times(sde, x0, t, generator, weighting, importance)
    xt, noise = _perturb(sde, x0, t, noise, generator, n_steps)
    return xt, t, lam, noise


def _vjp(s: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """(grad_x s)^T v per sample (zero where s does not depend on x); the graph is kept for training."""
    if not s.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(s, x, grad_outputs=v, create_graph=True, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _with_input_grad(loss: Callable[[Tensor], Tensor], xt: Tensor) -> Tensor:
    """Evaluate `loss(x)` with autograd on x even under no_grad; detach the result there."""
    grad_on = torch.is_grad_enabled()
    with torch.enable_grad():
        out = loss(xt.detach().requires_grad_(True))
    return out if grad_on else out.detach()


def explicit_score_matching(score_fn: ScoreFn, sde: SDE, x0: Tensor, *, true_score: ScoreFn,
                            t: Tensor | None = None, noise: Tensor | None = None,
                            generator: torch.Generator | None = None, weighting: Weighting = "sigma2",
                            importance: bool = False, n_steps: int = 100) -> Tensor:
    """lambda(t) |s(x_t, t) - grad log p_t(x_t)|^2 per sample (T 4.5); `true_score(x, t)` is the exact score.

    Under Langevin x_t is simulated (`n_steps` Euler-Maruyama steps).
    """
    xt, t, lam, _ = _setup(sde, x0, t, noise, generator, weighting, importance, n_steps)
    diff = _score(score_fn, xt, t) - _score(true_score, xt, t, "true_score")
    return lam * _sqnorm(diff)


def implicit_score_matching(score_fn: ScoreFn, sde: SDE, x0: Tensor, *, t: Tensor | None = None,
                            noise: Tensor | None = None, generator: torch.Generator | None = None,
                            weighting: Weighting = "sigma2", importance: bool = False,
                            n_steps: int = 100) -> Tensor:
    """lambda(t) [ |s|^2 + 2 div_x s ] at x_t per sample (T 4.4, 4.6), divergence exact by autograd.

    One backward pass per coordinate of x (O(d) cost). Under Langevin x_t is simulated.
    """
    xt, t, lam, _ = _setup(sde, x0, t, noise, generator, weighting, importance, n_steps)

    def loss(x: Tensor) -> Tensor:
        s = _score(score_fn, x, t)
        div = torch.zeros(x.shape[0], dtype=s.dtype, device=x.device)
        for i in range(x[0].numel()):
            e_i = torch.zeros_like(x).flatten(1)
            e_i[:, i] = 1
            div = div + _vjp(s, x, e_i.view_as(x)).flatten(1)[:, i]
        return lam * (_sqnorm(s) + 2 * div)

    return _with_input_grad(loss, xt)


def _projection(kind: str, like: Tensor, generator) -> Tensor:
    v = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return v if kind == "gaussian" else torch.sign(v)


def sliced_score_matching(score_fn: ScoreFn, sde: SDE, x0: Tensor, *, t: Tensor | None = None,
                          noise: Tensor | None = None, generator: torch.Generator | None = None,
                          weighting: Weighting = "sigma2", importance: bool = False, n_projections: int = 1,
                          projection: str = "gaussian", variance_reduced: bool = False,
                          n_steps: int = 100) -> Tensor:
    """lambda(t) (1/M) sum_m [ (v_m^T s)^2 + 2 v_m^T (grad_x s) v_m ] per sample (T 4.8; Song et al. 1905.07088).

    v_m ~ N(0, I) ("gaussian") or uniform on {-1, 1}^d ("rademacher"), drawn from `generator`;
    `variance_reduced` replaces (v^T s)^2 by its mean |s|^2. One vector-Jacobian product per
    projection. Under Langevin x_t is simulated.
    """
    if projection not in PROJECTIONS:
        raise InvalidValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
    integer("n_projections", n_projections, 1)
    xt, t, lam, _ = _setup(sde, x0, t, noise, generator, weighting, importance, n_steps)

    def loss(x: Tensor) -> Tensor:
        s = _score(score_fn, x, t)
        total = torch.zeros(x.shape[0], dtype=s.dtype, device=x.device)
        for _ in range(n_projections):
            v = _projection(projection, x, generator)
            quad = _sqnorm(s) if variance_reduced else batch_dot(v, s) ** 2
            total = total + quad + 2 * batch_dot(_vjp(s, x, v), v)
        return lam * total / n_projections

    return _with_input_grad(loss, xt)


def denoising_score_matching(score_fn: ScoreFn, sde: SDE, x0: Tensor, *, t: Tensor | None = None,
                             noise: Tensor | None = None, generator: torch.Generator | None = None,
                             weighting: Weighting = "sigma2", importance: bool = False) -> Tensor:
    """lambda(t) |s(x_t, t) + z / sigma(t)|^2 per sample, x_t = alpha x0 + sigma z (T 4.9-4.12; Vincent 2011).

    -z / sigma = -(x_t - alpha x0) / sigma^2 is the conditional score (T 4.10). Linear SDEs only.
    """
    if not isinstance(sde, LinearSDE):
        raise InvalidValueError(f"denoising score matching needs a Gaussian transition kernel (a LinearSDE); "
                         f"{type(sde).__name__} has none: use implicit or sliced score matching")
    xt, t, lam, noise = _setup(sde, x0, t, noise, generator, weighting, importance, 0)
    target = -noise / expand_like(sde.sigma(t), xt)
    return lam * _sqnorm(_score(score_fn, xt, t) - target)


LOSSES: "Registry[Callable[..., Tensor]]" = Registry("loss")
for _name, _fn in [("explicit", explicit_score_matching), ("implicit", implicit_score_matching),
                   ("sliced", sliced_score_matching), ("denoising", denoising_score_matching)]:
    LOSSES.register(_name)(_fn)
