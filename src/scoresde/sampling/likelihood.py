"""Exact log-likelihoods and bits/dim through the probability-flow ODE (DESIGN section 6).

Along the probability-flow ODE dx/dt = f~(t, x) = f(t, x) - g(t)^2 s(x, t) / 2 (T 6.1) the
instantaneous change of variables (Chen et al. 1806.07366; Song et al. 2011.13456 sec. 4.3, app. D.2) gives

    log p_{t_min}(x) = log pi(x_T) + int_{t_min}^T div_x f~(t, x_t) dt,    x_{t_min} = x,

so one forward solve of the augmented state (x_t, int div f~) yields a per-sample
log-density. The divergence is exact (one backward pass per dimension) or Hutchinson's
estimate eps^T (df~/dx) eps with probes eps held fixed over the solve (Grathwohl et al.
1810.01367), unbiased for E[eps eps^T] = I.

Time variable. time_variable="t" integrates in t; "log_snr" in s = -lambda,
lambda(t) = log(alpha/sigma). For a linear SDE dsigma^2/dt = -2 b sigma^2 + g^2, hence
d lambda / dt = -g^2 / (2 sigma^2) and dt/ds = 2 sigma^2 / g^2 > 0. In s the flow reads
dx/ds = (d log alpha / ds) x - (x - alpha E[x0 | x]) (for VE: the EDM ODE in log sigma).
Only the integration variable changes, not the state, so the divergence integral is
int div f~ (dt/ds) ds. On Gaussian mixtures, whose scores are smooth at t = 0, "t" needs
1.3-1.6x fewer evaluations for the same error (benchmarks/likelihood.py), so it is the default.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..core.errors import InvalidValueError
from ..core.sde import (
    LinearSDE,
    ScoreFn,
    batch_time,
    expand_like,
    probability_flow_drift,
)
from ..core.validate import batch_tensor, check, integer, one_of, positive

__all__ = ["log_likelihood", "bits_per_dim", "dequantize", "pixel_values", "is_8bit", "evaluate_likelihood",
           "DIVERGENCES", "TIME_VARIABLES", "SOLVERS", "RTOL", "ATOL"]

DIVERGENCES = ("exact", "hutchinson-gaussian", "hutchinson-rademacher")
TIME_VARIABLES = ("log_snr", "t")
SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# default tolerances: the loosest whose worst error at points 3-4 component standard deviations into the tails
# of exact-score Gaussian mixtures stays below 0.01 nats (dopri5, VP and VE: 3e-3 nats; held-out targets 1.5e-3;
# 1e-5 left 0.05-0.1 nats there) at about 1.5x the NFE of 1e-5 (benchmarks/likelihood_tolerance.py)
RTOL = ATOL = 1e-6


def _probes(x: Tensor, divergence: str, n_probes: int, generator: torch.Generator | None) -> Tensor:
    """n_probes fixed probe vectors per sample, shape (n_probes, *x.shape), with E[eps eps^T] = I."""
    eps = torch.randn((n_probes,) + x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return eps.sign() if divergence == "hutchinson-rademacher" else eps


def _divergence(v: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """div_x v per sample: exact (one vector-Jacobian product per coordinate) or Hutchinson."""
    if probes is None:
        flat_v = v.flatten(1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(flat_v.shape[1]):
            (grad,) = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=True)
            div = div + grad.flatten(1)[:, i]
        return div
    est = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for eps in probes:
        (vjp,) = torch.autograd.grad(v, x, grad_outputs=eps, retain_graph=True)
        est = est + (vjp * eps).flatten(1).sum(1)
    return est / probes.shape[0]


def _clock(sde: LinearSDE, time_variable: str, t_min: float, x: Tensor
           ) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """Integration span [s0, s1], the map s -> t and the speed dt/ds for the chosen variable."""
    t_span = torch.tensor([t_min, sde.T], dtype=x.dtype, device=x.device)
    if time_variable == "t":
        return t_span, lambda s: s, torch.ones_like
    try:
        sde.inverse_log_snr(sde.log_snr(t_span))
    except NotImplementedError as err:
        raise InvalidValueError(f"time_variable='log_snr' needs {type(sde).__name__}.inverse_log_snr; "
                         "use time_variable='t'") from err

    def t_of(s: Tensor) -> Tensor:
        return sde.inverse_log_snr(-s)

    def speed(t: Tensor) -> Tensor:  # dt/ds = -dt/dlambda = 2 sigma^2 / g^2
        return 2 * sde.sigma(t) ** 2 / sde.diffusion(t) ** 2

    return -sde.log_snr(t_span), t_of, speed


def _check_args(sde: LinearSDE, x: Tensor, divergence: str, n_probes: int, solver: str, rtol: float,
                atol: float, t_min: float | None, time_variable: str) -> float:
    """Validate the arguments of `log_likelihood`; return the resolved t_min."""
    check("sde", type(sde).__name__, isinstance(sde, LinearSDE), "a LinearSDE (normalised Gaussian prior)")
    batch_tensor("x", x)
    one_of("divergence", divergence, DIVERGENCES)
    integer("n_probes", n_probes, 1)
    one_of("solver", solver, SOLVERS)
    one_of("time_variable", time_variable, TIME_VARIABLES)
    positive("rtol", rtol)
    positive("atol", atol)
    t_min = sde.t_min if t_min is None else t_min
    check("t_min", t_min, isinstance(t_min, (int, float)) and 0 < t_min < sde.T, f"in (0, T = {sde.T})")
    return float(t_min)


def log_likelihood(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, *, divergence: str = "exact",
                   n_probes: int = 1, solver: str = "dopri5", rtol: float = RTOL, atol: float = ATOL,
                   t_min: float | None = None, time_variable: str = "t",
                   generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
    """Per-sample log p_{t_min}(x) in nats of the model defined by the probability-flow ODE.

    Solves d/ds (x, l) = (f~ dt/ds, div f~ dt/ds) from t_min to T with torchdiffeq (module
    docstring) and returns log pi(x_T) + l(T), where pi = sde.prior. With the exact score
    this is log p_{t_min}(x) up to the prior mismatch log pi - log p_T at x_T and the solver
    error. `t_min` defaults to sde.t_min (the data model is p_{t_min}, not p_0; see
    `bits_per_dim` for the decoder that closes this gap). No gradient flows out.

    divergence: "exact" (d backward passes per step; low d) or "hutchinson-gaussian" /
    "hutchinson-rademacher" with n_probes probes drawn once from `generator`.
    info: nfe (score evaluations), prior_logp, delta_logp (the divergence integral),
    x_T (the ODE encoding of x) and t_min.
    """
    t_min = _check_args(sde, x, divergence, n_probes, solver, rtol, atol, t_min, time_variable)
    probes = None if divergence == "exact" else _probes(x, divergence, n_probes, generator)
    span, t_of, speed = _clock(sde, time_variable, t_min, x)
    flow = probability_flow_drift(sde, score_fn)
    nfe = 0

    def augmented(s: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        t = batch_time(t_of(s), state[0])
        with torch.enable_grad():
            xs = state[0].detach().requires_grad_(True)
            v = flow(t, xs) * expand_like(speed(t), xs)
            div = _divergence(v, xs, probes)
        return v.detach(), div.detach()

    zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        xs, delta = odeint(augmented, (x, zero), span, rtol=rtol, atol=atol, method=solver)
    x_T, delta_logp = xs[-1], delta[-1]
    prior = sde.prior_logp(x_T)
    return prior + delta_logp, {"nfe": nfe, "prior_logp": prior, "delta_logp": delta_logp,
                                "x_T": x_T, "t_min": t_min}


def _half_range(levels: int) -> float:
    """(L - 1) / 2: level k sits at k / ((L - 1) / 2) - 1 in [-1, 1] (127.5 for 8-bit images)."""
    integer("levels", levels, 2)
    return (levels - 1) / 2


def pixel_values(images: Tensor, levels: int = 256) -> Tensor:
    """The level indices k in {0, ..., L - 1} (float64) of integer images or of floats scaled as
    k / ((L - 1) / 2) - 1 (L = `levels`; 8-bit: k / 127.5 - 1)."""
    half = _half_range(levels)
    if not isinstance(images, Tensor) or images.dim() < 2 or images.shape[0] == 0:
        raise InvalidValueError("images must be a non-empty tensor of shape (batch, ...)")
    if images.dtype == torch.bool:
        raise InvalidValueError(f"images must be integer (0..{levels - 1}) or float in [-1, 1], got bool")
    k = (images.double() + 1) * half if images.is_floating_point() else images.double()
    if not torch.isfinite(k).all() or (k - k.round()).abs().max() > 1e-3:
        raise InvalidValueError(f"float images must lie on the {levels} grey levels, scaled as k / {half:g} - 1, "
                         f"k in {{0..{levels - 1}}}")
    k = k.round()
    if k.min() < 0 or k.max() > levels - 1:
        raise InvalidValueError(f"images must take values in {{0, ..., {levels - 1}}} (or that range scaled to [-1, 1])")
    return k


def is_8bit(images: Tensor) -> bool:
    """Whether `images` are 8-bit values (see `pixel_values`), so that bits/dim applies."""
    try:
        pixel_values(images)
    except ValueError:
        return False
    return True


def dequantize(images: Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64, levels: int = 256) -> Tensor:
    """Uniformly dequantised images in the library's [-1, 1] scaling.

    `images` are integers k in {0, ..., L - 1} (any integer dtype) or floats already scaled as
    k / h - 1, h = (L - 1) / 2 (`pixel_values`; 8-bit: h = 127.5). Returns x = (k + u - 1/2) / h - 1,
    u ~ U[0, 1)^D: each pixel's cell of width 1 / h is centred on its level, so x in [-1 - 1/(2h), 1 + 1/(2h)).
    """
    k = pixel_values(images, levels)
    u = torch.rand(k.shape, generator=generator, dtype=torch.float64, device=k.device)
    return ((k + u - 0.5) / _half_range(levels) - 1).to(dtype)


def bits_per_dim(sde: LinearSDE, score_fn: ScoreFn, images: Tensor, *, levels: int = 256, decoder: str = "gaussian",
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                 **kwargs) -> tuple[Tensor, dict]:
    """Per-image bits/dim of images with L = `levels` grey levels (256: 8-bit): an upper bound, in
    expectation, on -log2 P(k) / D.

    Dequantisation (Theis et al. 1511.01844; Ho et al. 2006.11239 discuss it). For any density
    p_x on x-space and the cell C_k of pixel values k, P(k) = int_{C_k} p_x, and by Jensen

        log P(k) >= E_u[log p_x(x_k(u))] + D log(1/h) ,  x_k(u) = (k + u - 1/2)/h - 1,  h = (L - 1)/2,

    (`dequantize`; the cell has volume h^-D). In bits/dim:

        bpd = -E_u[log p_x(x)] / (D ln 2) + log2(h),    8-bit: log2(127.5) = 6.99435...

    The offset log2(h) is the log-volume of the scaling from pixel units to [-1, 1]. (Song
    et al.'s code maps x = (k + u)/128 - 1 instead, hence their offset 7 = log2(128); the two
    cell grids differ by < 1/255 in x and the bounds by a few 1e-3 bits at most.)

    t_min truncation (decoder). The ODE gives p_{t_min}, the law of alpha x0 + sigma z at
    t_min, not a model of x0. decoder="none" reports log p_{t_min}(x) at the dequantised x
    (Song et al. 2011.13456 evaluate p_eps(x)); decoder="gaussian" completes the model with
    the decoder p(x | x_eps) = N(x; x_eps / alpha, (sigma / alpha)^2 I) and encoder
    q(x_eps | x) = N(alpha x, sigma^2 I) (as in Kingma et al. 2107.00630, Song et al. 2101.09258):

        log p(x) >= E_q[log p_{t_min}(x_eps) + log p(x | x_eps) - log q(x_eps | x)]
                  = E_z[log p_{t_min}(alpha x + sigma z)] + D log alpha,

    since log p(x | x_eps) - log q(x_eps | x) = D log alpha exactly. One z per image is drawn,
    so the bound holds in expectation and the number is a bound on the data likelihood of
    a proper model p(x) = int p_{t_min}(x_eps) p(x | x_eps) dx_eps.

    kwargs go to `log_likelihood`. info: its info plus logp_x (the per-image log p_x bound in
    nats at the dequantised points).
    """
    one_of("decoder", decoder, ("gaussian", "none"))
    x = dequantize(images, generator, dtype, levels)
    d = x[0].numel()
    t_min = kwargs.pop("t_min", None)
    t_min = sde.t_min if t_min is None else t_min
    correction = torch.zeros((), dtype=dtype)
    if decoder == "gaussian":
        t = torch.as_tensor(float(t_min), dtype=dtype)
        x = sde.sample_marginal(x, t, torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device))
        correction = d * torch.log(sde.alpha(t))
    logp, info = log_likelihood(sde, score_fn, x, t_min=t_min, generator=generator, **kwargs)
    logp_x = logp + correction
    info["logp_x"] = logp_x
    return -logp_x / (d * math.log(2)) + math.log2(_half_range(levels)), info


def evaluate_likelihood(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, *, divergence: str = "auto",
                        batch_size: int = 256, generator: torch.Generator | None = None, **kwargs) -> dict:
    """Mean NLL of a data set with 95% normal confidence half-widths (1.96 sd / sqrt(n)).

    8-bit images (`is_8bit`) go through `bits_per_dim` (dequantised, Gaussian decoder) and get
    bits/dim; other data through `log_likelihood` at the points as given. divergence="auto" is
    exact up to 32 dimensions and Rademacher-Hutchinson above. The ODE runs in x's dtype, in
    batches of `batch_size`; kwargs go to `log_likelihood`.
    """
    integer("batch_size", batch_size, 1)
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 2:
        raise InvalidValueError("x must be a tensor of shape (n, ...) with n >= 2")
    d = x[0].numel()
    if divergence == "auto":
        divergence = "exact" if d <= 32 else "hutchinson-rademacher"
    images = is_8bit(x)
    dtype = x.dtype if x.is_floating_point() else torch.float64
    nll, bpd, nfe = [], [], 0
    for chunk in x.split(batch_size):
        if images:
            b, info = bits_per_dim(sde, score_fn, chunk, generator=generator, dtype=dtype, divergence=divergence,
                                   **kwargs)
            bpd.append(b)
            nll.append(b * d * math.log(2))  # -log2 P(k) bound in nats
        else:
            logp, info = log_likelihood(sde, score_fn, chunk, divergence=divergence, generator=generator, **kwargs)
            nll.append(-logp)
        nfe += info["nfe"]
    out = {"n": x.shape[0], "dim": d, "divergence": divergence, "t_min": info["t_min"], "eight_bit": images,
           "nfe_per_batch": nfe / len(nll)}
    for name, values in (("nll", nll), ("bpd", bpd)):
        if values:
            v = torch.cat(values).double()
            out[name] = float(v.mean())
            out[name + "_ci"] = 1.96 * float(v.std()) / math.sqrt(v.numel())
    out["nll_per_dim"] = out["nll"] / d
    return out
