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

from ..core.sde import LinearSDE, ScoreFn, batch_time, expand_like, probability_flow_drift

__all__ = ["log_likelihood", "bits_per_dim", "dequantize", "pixel_values", "is_8bit", "evaluate_likelihood", "DIVERGENCES", "TIME_VARIABLES", "SOLVERS"]

DIVERGENCES = ("exact", "hutchinson-gaussian", "hutchinson-rademacher")
TIME_VARIABLES = ("log_snr", "t")
SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


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
        raise ValueError(f"time_variable='log_snr' needs {type(sde).__name__}.inverse_log_snr; "
                         "use time_variable='t'") from err

    def t_of(s: Tensor) -> Tensor:
        return sde.inverse_log_snr(-s)

    def speed(t: Tensor) -> Tensor:  # dt/ds = -dt/dlambda = 2 sigma^2 / g^2
        return 2 * sde.sigma(t) ** 2 / sde.diffusion(t) ** 2

    return -sde.log_snr(t_span), t_of, speed


def _check_args(sde: LinearSDE, x: Tensor, divergence: str, n_probes: int, solver: str, rtol: float,
                atol: float, t_min: float | None, time_variable: str) -> float:
    """Validate the arguments of `log_likelihood`; return the resolved t_min."""
    if not isinstance(sde, LinearSDE):
        raise ValueError(f"sde must be a LinearSDE (normalised Gaussian prior), got {type(sde).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("x must be a floating tensor of shape (batch, ...) with at least 2 dims")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be an int >= 1, got {n_probes!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of the adaptive solvers {SOLVERS}, got {solver!r}")
    if time_variable not in TIME_VARIABLES:
        raise ValueError(f"time_variable must be one of {TIME_VARIABLES}, got {time_variable!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {tol!r}")
    t_min = sde.t_min if t_min is None else t_min
    if not (isinstance(t_min, (int, float)) and 0 < t_min < sde.T):
        raise ValueError(f"t_min must be in (0, T = {sde.T}), got {t_min!r}")
    return float(t_min)


def log_likelihood(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, *, divergence: str = "exact",
                   n_probes: int = 1, solver: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
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


def pixel_values(images: Tensor) -> Tensor:
    """The 8-bit values k in {0, ..., 255} (float64) of integer images or of floats scaled as k / 127.5 - 1."""
    if not isinstance(images, Tensor) or images.dim() < 2 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty tensor of shape (batch, ...)")
    if images.dtype == torch.bool:
        raise ValueError("images must be integer (0..255) or float in [-1, 1], got bool")
    k = (images.double() + 1) * 127.5 if images.is_floating_point() else images.double()
    if not torch.isfinite(k).all() or (k - k.round()).abs().max() > 1e-3:
        raise ValueError("float images must be 8-bit values scaled as k / 127.5 - 1, k in {0..255}")
    k = k.round()
    if k.min() < 0 or k.max() > 255:
        raise ValueError("images must take values in {0, ..., 255} (or that range scaled to [-1, 1])")
    return k


def is_8bit(images: Tensor) -> bool:
    """Whether `images` are 8-bit values (see `pixel_values`), so that bits/dim applies."""
    try:
        pixel_values(images)
    except ValueError:
        return False
    return True


def dequantize(images: Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> Tensor:
    """Uniformly dequantised 8-bit images in the library's [-1, 1] scaling.

    `images` are integers k in {0, ..., 255} (any integer dtype) or floats already scaled as
    k / 127.5 - 1. Returns x = (k + u - 1/2) / 127.5 - 1, u ~ U[0, 1)^D: each pixel's cell of
    width 1/127.5 is centred on the training value k / 127.5 - 1, so x in [-1 - 1/255, 1 + 1/255).
    """
    k = pixel_values(images)
    u = torch.rand(k.shape, generator=generator, dtype=torch.float64, device=k.device)
    return ((k + u - 0.5) / 127.5 - 1).to(dtype)


def bits_per_dim(sde: LinearSDE, score_fn: ScoreFn, images: Tensor, *, decoder: str = "gaussian",
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                 **kwargs) -> tuple[Tensor, dict]:
    """Per-image bits/dim of 8-bit images: an upper bound, in expectation, on -log2 P(k) / D.

    Dequantisation (Theis et al. 1511.01844; Ho et al. 2006.11239 discuss it). For any density
    p_x on x-space and the cell C_k of pixel values k, P(k) = int_{C_k} p_x, and by Jensen

        log P(k) >= E_u[log p_x(x_k(u))] + D log(1/127.5) ,  x_k(u) = (k + u - 1/2)/127.5 - 1,

    (`dequantize`; the cell has volume 127.5^-D). In bits/dim:

        bpd = -E_u[log p_x(x)] / (D ln 2) + log2(127.5),    log2(127.5) = 6.99435...

    The offset log2(127.5) is the log-volume of the scaling from pixel units to [-1, 1]. (Song
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
    if decoder not in ("gaussian", "none"):
        raise ValueError(f"decoder must be 'gaussian' or 'none', got {decoder!r}")
    x = dequantize(images, generator, dtype)
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
    return -logp_x / (d * math.log(2)) + math.log2(127.5), info


def evaluate_likelihood(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, *, divergence: str = "auto",
                        batch_size: int = 256, generator: torch.Generator | None = None, **kwargs) -> dict:
    """Mean NLL of a data set with 95% normal confidence half-widths (1.96 sd / sqrt(n)).

    8-bit images (`is_8bit`) go through `bits_per_dim` (dequantised, Gaussian decoder) and get
    bits/dim; other data through `log_likelihood` at the points as given. divergence="auto" is
    exact up to 32 dimensions and Rademacher-Hutchinson above. The ODE runs in x's dtype, in
    batches of `batch_size`; kwargs go to `log_likelihood`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 2:
        raise ValueError("x must be a tensor of shape (n, ...) with n >= 2")
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


def bits_per_dim_offset(levels: int) -> float:
    """log2 of the grey-level spacing's inverse, 2 / (levels - 1) in [-1, 1]: a density on [-1, 1]^D
    dequantised in cells of that width gives bits/dim = -log p / (D ln 2) + log2((levels - 1) / 2)."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    return math.log2((levels - 1) / 2)


def pf_bits_per_dim(sde: LinearSDE, score_fn: ScoreFn, images: Tensor, levels: int, *,
                    generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                    **kwargs) -> tuple[Tensor, dict]:
    """Per-image bits/dim of images on the grid {-1, -1 + 2/(L-1), ..., 1} of L = `levels` grey levels
    under the probability-flow model: `likelihood.bits_per_dim` generalised from 8-bit images
    (L = 256 gives its numbers): uniform dequantisation in cells of width 2/(L-1) centred on the
    levels, the Gaussian decoder at t_min, bpd = -E log p_x(x) / (D ln 2) + `bits_per_dim_offset(L)`.
    kwargs go to `likelihood.log_likelihood`."""
    offset = bits_per_dim_offset(levels)
    k = (images.double() + 1) * (levels - 1) / 2
    if (k - k.round()).abs().max() > 1e-4 or k.min() < -1e-4 or k.max() > levels - 1 + 1e-4:
        raise ValueError(f"images must lie on the {levels} grey levels -1 + 2 k / {levels - 1} in [-1, 1]")
    u = torch.rand(images.shape, generator=generator, dtype=torch.float64, device=images.device)
    x = (k.round() + u - 0.5).div(levels - 1).mul(2).sub(1).to(dtype)
    t_min = kwargs.pop("t_min", None)
    t_min = sde.t_min if t_min is None else t_min
    t = torch.as_tensor(float(t_min), dtype=dtype)
    x = sde.sample_marginal(x, t, torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device))
    logp, info = log_likelihood(sde, score_fn, x, t_min=t_min, generator=generator, **kwargs)
    d = x[0].numel()
    logp_x = logp + d * torch.log(sde.alpha(t))
    return -logp_x / (d * math.log(2)) + offset, info
