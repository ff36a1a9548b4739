"""Exact output laws of score-based samplers for Gaussian data (DESIGN 7.2, the left side of the bounds).

Data N(m, C) under a linear SDE f = -b(t) x has p_t = N(alpha m, alpha^2 C + sigma^2 I). A score with
an affine error, s(t, x) = grad log p_t(x) + A(t) x + a(t), makes every sampler linear:
in backward time u = T - t each step is Y' = F Y + c + N(0, Q), so the output law is Gaussian.
 - backward SDE (T 2.7 with s): moment ODEs dmu/du = M mu + c, dS/du = M S + S M^T + g^2 I,
   M = b I + g^2 (A - C_t^{-1}), c = g^2 (C_t^{-1} m_t + a);
 - probability-flow ODE (T 6.1): the same with g^2 -> g^2 / 2 and no noise term;
 solved in float64 by scipy's DOP853 at rtol 1e-10;
 - Euler-Maruyama (T 5.21) and the exponential integrator (linear part exact, score frozen at the
   left end of each step) with N uniform steps: exact recursions of mean and covariance.
An error field is a callable t -> (A(t) of shape (d, d), a(t) of shape (d,)) in forward time t.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .errors import InvalidValueError
from .sde import LinearSDE
from .validate import check, integer, moments

__all__ = [
    "ErrorField", "GaussianLaw", "random_gaussian", "coefficients", "forward_law", "constant_error", "scaled_error",
    "score_error_l2", "score_error_sup", "backward_sde_law", "probability_flow_law",
    "euler_maruyama_law", "exponential_integrator_law", "step_coefficients", "ei_coefficients",
]

ErrorField = Callable[[float], tuple[np.ndarray, np.ndarray]]
GaussianLaw = tuple[np.ndarray, np.ndarray]


def coefficients(sde: LinearSDE, t: np.ndarray | float) -> dict[str, np.ndarray]:
    """b, g^2, alpha, sigma of a linear SDE at forward times t, as float64 arrays."""
    if not isinstance(sde, LinearSDE):
        raise InvalidValueError(f"sde must be a LinearSDE (Gaussian transition kernel), got {type(sde).__name__}")
    tt = torch.as_tensor(np.asarray(t, dtype=np.float64))
    return {"b": sde.b(tt).numpy(), "g2": (sde.diffusion(tt) ** 2).numpy(),
            "alpha": sde.alpha(tt).numpy(), "sigma": sde.sigma(tt).numpy()}


def _check_data(mean: np.ndarray, cov: np.ndarray, name: str = "data") -> GaussianLaw:
    m, C = moments(name, mean, cov)
    low = float(np.linalg.eigvalsh(C).min())
    check(f"{name}: the covariance", f"smallest eigenvalue {low:g}", low > 0, "positive definite")
    return m, C


def random_gaussian(dim: int, seed: int = 0, eig_range: tuple[float, float] = (0.3, 2.0)) -> GaussianLaw:
    """A reproducible N(m, C): |m| = 1 in a random direction, C with eigenvalues spread log-uniformly over
    eig_range (both ends included) in a random basis."""
    integer("dim", dim, 1)
    lo, hi = eig_range
    if not 0 < lo <= hi:
        raise InvalidValueError(f"eig_range must satisfy 0 < low <= high, got {eig_range}")
    rng = np.random.default_rng(seed)
    m = rng.normal(size=dim)
    Q = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    lam = np.exp(np.linspace(math.log(lo), math.log(hi), dim)) if dim > 1 else np.array([hi])
    C = (Q * lam) @ Q.T
    return m / np.linalg.norm(m), 0.5 * (C + C.T)


def forward_law(sde: LinearSDE, mean: np.ndarray, cov: np.ndarray, t: float) -> GaussianLaw:
    """p_t = N(alpha m, alpha^2 C + sigma^2 I) for data N(m, C)."""
    m, C = _check_data(mean, cov)
    k = coefficients(sde, t)
    a, s = float(k["alpha"]), float(k["sigma"])
    return a * m, a**2 * C + s**2 * np.eye(m.size)


def constant_error(vector: np.ndarray) -> ErrorField:
    """The error field s - grad log p_t = vector at every (t, x): L2 and sup error |vector|."""
    v = np.asarray(vector, dtype=np.float64)
    zero = np.zeros((v.size, v.size))
    return lambda t: (zero, v)


def scaled_error(sde: LinearSDE, mean: np.ndarray, cov: np.ndarray, eps: float) -> ErrorField:
    """The linear error field (eps / sqrt(E_{p_t}|x|^2)) x: L2 error exactly eps at every t, sup error infinite."""
    m, C = _check_data(mean, cov)

    def field(t: float) -> tuple[np.ndarray, np.ndarray]:
        mt, Ct = forward_law(sde, m, C, t)
        return eps / math.sqrt(mt @ mt + np.trace(Ct)) * np.eye(m.size), np.zeros(m.size)

    return field


def score_error_l2(sde: LinearSDE, mean: np.ndarray, cov: np.ndarray, error: ErrorField, t: float) -> float:
    """E(t) = (E_{p_t}|A x + a|^2)^{1/2} = (|A m_t + a|^2 + tr(A C_t A^T))^{1/2}."""
    mt, Ct = forward_law(sde, mean, cov, t)
    A, a = error(t)
    r = A @ mt + a
    return math.sqrt(float(r @ r + np.trace(A @ Ct @ A.T)))


def score_error_sup(error: ErrorField, t: float) -> float:
    """sup_x |A x + a|: |a| when A = 0, else infinite."""
    A, a = error(t)
    return float(np.linalg.norm(a)) if not np.any(A) else math.inf


def _linear_step(sde: LinearSDE, m: np.ndarray, C: np.ndarray, error: ErrorField | None,
                 t: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """scale * s(t, x) = M x + c for the affine score s = -C_t^{-1} (x - m_t) + A x + a: returns (M, c)."""
    mt, Ct = forward_law(sde, m, C, t)
    P = np.linalg.inv(Ct)
    A, a = error(t) if error is not None else (0.0, 0.0)
    return scale * (A - P), scale * (P @ mt + a)


def _start(sde: LinearSDE, d: int, start: GaussianLaw | None) -> GaussianLaw:
    if start is None:
        return np.zeros(d), sde.prior_std**2 * np.eye(d)
    return _check_data(*start, name="start")


def _check_end(sde: LinearSDE, t_end: float) -> None:
    if not 0.0 <= t_end < sde.T:
        raise InvalidValueError(f"t_end must lie in [0, T = {sde.T}), got {t_end}")


def _moment_ode(sde: LinearSDE, mean: np.ndarray, cov: np.ndarray, error: ErrorField | None, t_end: float,
                start: GaussianLaw | None, weight: float, rtol: float, atol: float) -> GaussianLaw:
    m, C = _check_data(mean, cov)
    _check_end(sde, t_end)
    d = m.size
    mu0, S0 = _start(sde, d, start)

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        t = sde.T - u
        k = coefficients(sde, t)
        Ms, c = _linear_step(sde, m, C, error, t, weight * float(k["g2"]))
        M = float(k["b"]) * np.eye(d) + Ms
        mu, S = y[:d], y[d:].reshape(d, d)
        dS = M @ S + S @ M.T
        if weight == 1.0:
            dS = dS + float(k["g2"]) * np.eye(d)
        return np.concatenate([M @ mu + c, dS.ravel()])

    sol = solve_ivp(rhs, (0.0, sde.T - t_end), np.concatenate([mu0, S0.ravel()]), method="DOP853",
                    rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"moment ODE failed: {sol.message}")
    y = sol.y[:, -1]
    S = y[d:].reshape(d, d)
    return y[:d], 0.5 * (S + S.T)


def backward_sde_law(sde: LinearSDE, mean: np.ndarray, cov: np.ndarray, *, error: ErrorField | None = None,
                     t_end: float = 0.0, start: GaussianLaw | None = None, rtol: float = 1e-10,
                     atol: float = 1e-12) -> GaussianLaw:
    """Law (mean, cov) at forward time t_end of the backward SDE (T 2.7, 4.2) with score
    grad log p_t + error, started at T = sde.T from `start` (default: the prior N(0, prior_std^2 I))."""
    return _moment_ode(sde, mean, cov, error, t_end, start, 1.0, rtol, atol)


def probability_flow_law(sde: LinearSDE, mean: np.ndarray, cov: np.ndarray, *, error: ErrorField | None = None,
                         t_end: float = 0.0, start: GaussianLaw | None = None, rtol: float = 1e-10,
                         atol: float = 1e-12) -> GaussianLaw:
    """Law at t_end of the probability-flow ODE (T 6.1) with score grad log p_t + error, from `start` at T."""
    return _moment_ode(sde, mean, cov, error, t_end, start, 0.5, rtol, atol)


_GL_NODES, _GL_WEIGHTS = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(32))


def ei_coefficients(sde: LinearSDE, t: torch.Tensor, t_next: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phi, c, v) with x(t_next) = phi x(t) + c s + sqrt(v) z for the reverse SDE with the score frozen at s
    (the exponential integrator, T 5.20; the samplers' `stochastic.ei_step` and `step_coefficients`).

    phi = alpha(t')/alpha(t), c = alpha(t') int_{t'}^{t} g(u)^2 / alpha(u) du (Gauss-Legendre,
    32 nodes, float64) and v = alpha(t')^2 (r(t) - r(t')), r = sigma^2 / alpha^2, the exact
    variance of the linear part (g^2 / alpha^2 = dr/dt). Elementwise in t, t_next; on the CPU in float64.
    """
    t, tn = (s.detach().to("cpu", torch.float64) for s in (t, t_next))
    u = (0.5 * (t + tn))[..., None] + (0.5 * (t - tn))[..., None] * _GL_NODES
    integral = 0.5 * (t - tn) * (_GL_WEIGHTS * sde.diffusion(u) ** 2 / sde.alpha(u)).sum(-1)
    a, an = sde.alpha(t), sde.alpha(tn)
    r, rn = (sde.sigma(t) / a) ** 2, (sde.sigma(tn) / an) ** 2
    return an / a, an * integral, an**2 * (r - rn)


def step_coefficients(sde: LinearSDE, ts: np.ndarray, *, exponential: bool,
                      probability_flow: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step (lin, score_w, noise_var) of a backward scheme over the decreasing forward times ts:
    Y' = lin Y + score_w s(t, Y) + sqrt(noise_var) Z, with s frozen at the step's start t.
    Euler-Maruyama (T 5.21): lin = 1 + h b(t), score_w = w h g(t)^2, noise_var = h g(t)^2 (w = 1, or 1/2
    and no noise for the probability flow). Exponential integrator: (lin, score_w / w, noise_var) =
    `ei_coefficients` over each step [t', t]."""
    ts = np.asarray(ts, dtype=np.float64)
    if ts.ndim != 1 or ts.size < 2 or not np.all(np.diff(ts) < 0):
        raise InvalidValueError("ts must be a strictly decreasing 1-D array of at least two times")
    weight = 0.5 if probability_flow else 1.0
    if exponential:
        lin, score_w, noise = (v.numpy() for v in ei_coefficients(sde, torch.from_numpy(ts[:-1]), torch.from_numpy(ts[1:])))
    else:
        k = coefficients(sde, ts)
        h = ts[:-1] - ts[1:]
        lin = 1.0 + h * k["b"][:-1]
        score_w = h * k["g2"][:-1]
        noise = h * k["g2"][:-1]
    return lin, weight * score_w, np.zeros_like(noise) if probability_flow else noise


def _recursion(sde: LinearSDE, mean: np.ndarray, cov: np.ndarray, n_steps: int, error: ErrorField | None,
               t_end: float, start: GaussianLaw | None, probability_flow: bool, exponential: bool) -> GaussianLaw:
    m, C = _check_data(mean, cov)
    _check_end(sde, t_end)
    integer("n_steps", n_steps, 1)
    d = m.size
    mu, S = _start(sde, d, start)
    ts = np.linspace(sde.T, t_end, n_steps + 1)
    lin, score_w, noise = step_coefficients(sde, ts, exponential=exponential, probability_flow=probability_flow)
    eye = np.eye(d)
    for i in range(n_steps):
        Ms, c = _linear_step(sde, m, C, error, float(ts[i]), float(score_w[i]))
        F = lin[i] * eye + Ms
        mu = F @ mu + c
        S = F @ S @ F.T + noise[i] * eye
    return mu, 0.5 * (S + S.T)


def euler_maruyama_law(sde: LinearSDE, mean: np.ndarray, cov: np.ndarray, n_steps: int, *,
                       error: ErrorField | None = None, t_end: float = 0.0, start: GaussianLaw | None = None,
                       probability_flow: bool = False) -> GaussianLaw:
    """Exact law after n_steps uniform Euler-Maruyama steps (T 5.21) of the backward SDE from T to t_end:
    Y' = Y + h (b Y + g^2 s) + g sqrt(h) Z with coefficients at the step's start; with
    probability_flow=True, Euler steps of the probability-flow ODE (g^2 -> g^2 / 2, no noise)."""
    return _recursion(sde, mean, cov, n_steps, error, t_end, start, probability_flow, exponential=False)


def exponential_integrator_law(sde: LinearSDE, mean: np.ndarray, cov: np.ndarray, n_steps: int, *,
                               error: ErrorField | None = None, t_end: float = 0.0,
                               start: GaussianLaw | None = None, probability_flow: bool = False) -> GaussianLaw:
    """Exact law after n_steps uniform exponential-integrator steps: the linear drift b Y and the noise
    integrated exactly, the score frozen at the step's start (as in DEIS / Chen et al. 2209.11215)."""
    return _recursion(sde, mean, cov, n_steps, error, t_end, start, probability_flow, exponential=True)
