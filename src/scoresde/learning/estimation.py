"""Statistics of score matching (DESIGN section 11; T 7.1).

The implicit (Hyvarinen) objective of a family p_theta, per sample,
    l(theta; x) = |grad_x log p_theta(x)|^2 / 2 + Laplacian_x log p_theta(x),
needs no normaliser. Its empirical minimiser theta_n is consistent and asymptotically normal,
sqrt(n)(theta_n - theta*) -> N(0, H^{-1} S H^{-1}) with H = E grad^2_theta l and
S = Cov(grad_theta l) (T 7.1). For an exponential family log p = theta^T T(x) - A(theta),
l = theta^T M(x) theta / 2 + theta^T b(x) with M = J_T J_T^T and b = Laplacian T, so
theta_n = -(mean M)^{-1} mean b. Maximum likelihood has asymptotic covariance I(theta)^{-1}
= Cov_theta(T)^{-1}; the ratio of the two is the efficiency of Koehler, Heckett and Risteski
(ICLR 2023). One-dimensional families get their normaliser by Gauss-Legendre quadrature on a
user interval, so every expectation under p_theta is exact to quadrature accuracy.

Derivatives in x use torch.func, so user functions must be pure torch code, row-wise in x.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.validate import integer

__all__ = [
    "ExponentialFamily", "score_matching_estimate", "implicit_objective", "sandwich_covariance",
    "fisher_information", "mle_estimate", "relative_efficiency",
]

LogDensity = Callable[[Tensor, Tensor], Tensor]
_RTOL_SINGULAR = 1e-10
_TAIL_TOL = 1e-12


def _jac_lap(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """x-Jacobian (n, k, d) and x-Laplacian (n, k) of a per-sample map fn: (d,) -> (k,)."""
    def one(xi: Tensor) -> tuple[Tensor, Tensor]:
        def jac(y: Tensor) -> tuple[Tensor, Tensor]:
            j = torch.func.jacrev(fn)(y)
            return j, j
        hess, j = torch.func.jacfwd(jac, has_aux=True)(xi)
        return j, hess.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.func.vmap(one)(x)


def _check_sample(x: Tensor, n_params: int, dim: int | None = None) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() < 2:
        raise InvalidValueError(f"x must have shape (..., n, d), got {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise InvalidValueError(f"x must have last dimension d={dim}, got {x.shape[-1]}")
    if x.shape[-2] < n_params:
        raise InvalidValueError(f"need at least as many samples as parameters: n={x.shape[-2]} < k={n_params}")
    if not torch.isfinite(x).all():
        raise InvalidValueError("x must be finite (found nan or inf)")
    return x


def _check_theta(theta: Tensor, n_params: int) -> Tensor:
    theta = torch.as_tensor(theta, dtype=torch.float64)
    if theta.shape != (n_params,):
        raise InvalidValueError(f"theta must have shape ({n_params},), got {tuple(theta.shape)}")
    if not torch.isfinite(theta).all():
        raise InvalidValueError("theta must be finite")
    return theta


def _scaled_inverse(h: Tensor) -> Tensor:
    """Inverse of a (batch of) symmetric PSD H, computed on D^{-1/2} H D^{-1/2} (D = diag H) so that badly
    scaled parameters do not matter; raises if H is singular, i.e. the family is not identifiable."""
    h = 0.5 * (h + h.transpose(-1, -2))
    d = h.diagonal(dim1=-2, dim2=-1)
    if (d <= 1e-30 * d.max(-1, keepdim=True).values.clamp_min(1e-300)).any():
        raise InvalidValueError("H = E grad^2_theta l is singular (a parameter does not enter the score): "
                         "the family is not identifiable from these data")
    s = d.rsqrt()
    hn = h * s.unsqueeze(-1) * s.unsqueeze(-2)
    ev = torch.linalg.eigvalsh(hn)
    if (ev[..., 0] <= _RTOL_SINGULAR * ev[..., -1]).any():
        raise InvalidValueError(
            "H = E grad^2_theta l is singular: the family is not identifiable from these data "
            f"(smallest/largest eigenvalue of the scaled H {(ev[..., 0] / ev[..., -1]).min().item():.3g})")
    return torch.linalg.inv(hn) * s.unsqueeze(-1) * s.unsqueeze(-2)


class ExponentialFamily:
    """p_theta(x) proportional to exp(theta^T T(x)) on R^d, T = sufficient_stat: (n, d) -> (n, k).

    T must act row by row. interval=(a, b) (1-D only) turns on quadrature, composite 16-point
    Gauss-Legendre on n_panels equal panels (normaliser, expectations), and an inverse-CDF sampler
    on n_grid points; p_theta must be negligible at a and b (checked to a relative density of 1e-12).
    """

    def __init__(self, sufficient_stat: Callable[[Tensor], Tensor], dim: int = 1,
                 interval: tuple[float, float] | None = None, n_panels: int = 256, n_grid: int = 2**16):
        integer("dim", dim, 1)
        self.sufficient_stat, self.dim = sufficient_stat, dim
        probe = sufficient_stat(torch.zeros(2, dim, dtype=torch.float64))
        if probe.dim() != 2 or probe.shape[0] != 2:
            raise InvalidValueError(f"sufficient_stat must map (n, d) to (n, k), got shape {tuple(probe.shape)}")
        self.n_params = probe.shape[1]
        self.interval = None
        if interval is not None:
            if dim != 1:
                raise InvalidValueError(f"interval (quadrature) is only for dim=1, got dim={dim}")
            a, b = (float(v) for v in interval)
            if not (np.isfinite(a) and np.isfinite(b) and a < b):
                raise InvalidValueError(f"interval must be finite with a < b, got {interval}")
            integer("n_panels", n_panels, 1)
            integer("n_grid", n_grid, 10)
            self.interval = (a, b)
            nodes, weights = np.polynomial.legendre.leggauss(16)
            edges = np.linspace(a, b, n_panels + 1)
            half = 0.5 * np.diff(edges)[:, None]
            q = torch.as_tensor((half * nodes + 0.5 * (edges[1:] + edges[:-1])[:, None]).ravel()).unsqueeze(-1)
            self._q_logw = torch.as_tensor(np.log(half * weights).ravel())
            self._q_stat = self.stat(q)
            self._q_m, self._q_b = self.quadratic_terms(q)
            self._grid = torch.linspace(a, b, n_grid, dtype=torch.float64).unsqueeze(-1)
            self._grid_stat = self.stat(self._grid)

    def stat(self, x: Tensor) -> Tensor:
        """T(x), shape (..., n, k), float64."""
        x = torch.as_tensor(x, dtype=torch.float64)
        return self.sufficient_stat(x.reshape(-1, self.dim)).reshape(*x.shape[:-1], self.n_params)

    def _stat_one(self, xi: Tensor) -> Tensor:
        return self.sufficient_stat(xi.unsqueeze(0))[0]

    def jacobian_laplacian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x-Jacobian J_T (..., n, k, d) and x-Laplacian of T (..., n, k), by autograd."""
        x = torch.as_tensor(x, dtype=torch.float64)
        j, lap = _jac_lap(self._stat_one, x.reshape(-1, self.dim))
        return j.reshape(*x.shape[:-1], self.n_params, self.dim), lap.reshape(*x.shape[:-1], self.n_params)

    def quadratic_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """M = J_T J_T^T (..., n, k, k) and b = Laplacian T (..., n, k): l = theta^T M theta / 2 + theta^T b."""
        j, lap = self.jacobian_laplacian(x)
        return j @ j.transpose(-1, -2), lap

    def unnormalized_log_prob(self, x: Tensor, theta: Tensor) -> Tensor:
        """theta^T T(x), shape (..., n)."""
        return self.stat(x) @ _check_theta(theta, self.n_params)

    def score(self, x: Tensor, theta: Tensor) -> Tensor:
        """grad_x log p_theta(x) = J_T(x)^T theta, shape (..., n, d)."""
        j, _ = self.jacobian_laplacian(x)
        return (j * _check_theta(theta, self.n_params).unsqueeze(-1)).sum(-2)

    # ---- one-dimensional quadrature -------------------------------------------------------
    def _require_quadrature(self) -> None:
        if self.interval is None:
            raise InvalidValueError("this needs a 1-D family built with interval=(a, b) for quadrature")

    def _quad_weights(self, theta: Tensor, check_tails: bool = True) -> Tensor:
        """Normalised quadrature weights w_i p_theta(x_i) (sum to 1)."""
        self._require_quadrature()
        lp = self._q_stat @ theta
        if check_tails:
            edge = (self._grid_stat[[0, -1]] @ theta).max()
            if not torch.isfinite(lp).all() or edge - lp.max() > np.log(_TAIL_TOL):
                raise InvalidValueError(f"p_theta is not negligible at the ends of interval={self.interval} "
                                 "(or theta is not normalisable): widen the interval or change theta")
        return torch.softmax(lp + self._q_logw, dim=0)

    def log_normalizer(self, theta: Tensor) -> Tensor:
        """A(theta) = log int exp(theta^T T(x)) dx by Gauss-Legendre quadrature."""
        self._require_quadrature()
        theta = _check_theta(theta, self.n_params)
        self._quad_weights(theta)
        return torch.logsumexp(self._q_stat @ theta + self._q_logw, dim=0)

    def log_prob(self, x: Tensor, theta: Tensor) -> Tensor:
        """Normalised log p_theta(x), shape (..., n)."""
        return self.unnormalized_log_prob(x, theta) - self.log_normalizer(theta)

    def expectation(self, values_at_nodes: Callable[[Tensor, Tensor, Tensor], Tensor], theta: Tensor) -> Tensor:
        """E_theta f by quadrature, f given as a function of (T, M, b) at the nodes (leading axis)."""
        w = self._quad_weights(_check_theta(theta, self.n_params))
        vals = values_at_nodes(self._q_stat, self._q_m, self._q_b)
        return torch.tensordot(w, vals, dims=([0], [0]))

    def sample(self, n: int, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """n draws (n, 1) by inverse CDF: the trapezoid CDF on n_grid points, inverted linearly."""
        self._require_quadrature()
        integer("n", n, 1)
        theta = _check_theta(theta, self.n_params)
        self._quad_weights(theta)
        lp = self._grid_stat @ theta
        p = torch.exp(lp - lp.max())
        cdf = torch.cat([p.new_zeros(1), torch.cumsum(0.5 * (p[1:] + p[:-1]), 0)])
        cdf = cdf / cdf[-1]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        idx = torch.searchsorted(cdf, u).clamp(1, len(cdf) - 1)
        lo, hi, g = cdf[idx - 1], cdf[idx], self._grid[:, 0]
        frac = ((u - lo) / (hi - lo).clamp_min(1e-300)).clamp(0, 1)
        return (g[idx - 1] + frac * (g[idx] - g[idx - 1])).unsqueeze(-1)


def implicit_objective(log_p: LogDensity, x: Tensor, theta: Tensor) -> Tensor:
    """Per-sample l(theta; x_i) = |grad_x log p|^2 / 2 + Laplacian_x log p, shape (n,)."""
    j, lap = _jac_lap(lambda xi: log_p(xi.unsqueeze(0), theta).reshape(1), x)
    return 0.5 * j.pow(2).sum((-1, -2)) + lap[:, 0]


def _sm_exponential(family: ExponentialFamily, x: Tensor) -> Tensor:
    m, b = family.quadratic_terms(x)
    m_bar, b_bar = m.mean(-3), b.mean(-2)
    return -(_scaled_inverse(m_bar) @ b_bar.unsqueeze(-1)).squeeze(-1)


def _sm_numerical(log_p: LogDensity, x: Tensor, theta0: Tensor, gtol: float, max_rounds: int) -> Tensor:
    def objective(th: Tensor) -> Tensor:
        return implicit_objective(log_p, x, th).mean()

    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, history_size=50, tolerance_grad=gtol,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        grad, value = torch.func.grad_and_value(objective)(theta.detach())
        theta.grad = grad
        return value

    for _ in range(max_rounds):
        opt.step(closure)
        grad = torch.func.grad(objective)(theta.detach())
        if grad.abs().max() <= gtol:
            break
    else:
        raise RuntimeError(f"L-BFGS did not converge: |grad|_max = {grad.abs().max().item():.3g} > gtol={gtol}")
    theta = theta.detach()
    _scaled_inverse(torch.func.hessian(objective)(theta))
    return theta


def score_matching_estimate(family: ExponentialFamily | LogDensity, x: Tensor, theta0: Tensor | None = None,
                            gtol: float = 1e-8, max_rounds: int = 20) -> Tensor:
    """Minimiser theta_n of the empirical implicit objective (DESIGN 11, T 7.1).

    ExponentialFamily: closed form -(mean M)^{-1} mean b, vectorised over leading batch axes of
    x (..., n, d) -> (..., k). A callable log_p(x, theta) -> (n,) (unnormalised): L-BFGS from theta0
    on x (n, d), run until the largest gradient entry is <= gtol.
    """
    if isinstance(family, ExponentialFamily):
        return _sm_exponential(family, _check_sample(x, family.n_params, family.dim))
    if theta0 is None and callable(family):
        raise InvalidValueError("theta0 (initial parameter, shape (k,)) is required for a general log_p")
    theta0, x = _general_args(family, theta0, x, "theta0")
    return _sm_numerical(family, x, theta0, gtol, max_rounds)


def _general_args(family, theta, x, name: str) -> tuple[Tensor, Tensor]:
    """Validate (theta, x) for a general family given as a callable log_p(x, theta)."""
    if not callable(family):
        raise InvalidValueError("family must be an ExponentialFamily or a callable log_p(x, theta)")
    theta = torch.as_tensor(theta, dtype=torch.float64)
    if theta.dim() != 1:
        raise InvalidValueError(f"{name} must have shape (k,), got {tuple(theta.shape)}")
    x = _check_sample(x, len(theta))
    if x.dim() != 2:
        raise InvalidValueError(f"x must have shape (n, d) for a general log_p, got {tuple(x.shape)}")
    return _check_theta(theta, len(theta)), x


def _sandwich(h: Tensor, s: Tensor) -> Tensor:
    h_inv = _scaled_inverse(h)
    cov = h_inv @ s @ h_inv
    return 0.5 * (cov + cov.transpose(-1, -2))


def sandwich_covariance(family: ExponentialFamily | LogDensity, theta: Tensor, x: Tensor | None = None) -> Tensor:
    """Asymptotic covariance H^{-1} S H^{-1} of sqrt(n)(theta_n - theta*) (T 7.1), shape (k, k).

    With a sample x (n, d): H and S are the sample mean of grad^2_theta l and the sample covariance of
    grad_theta l at theta (any family). With x=None: exact expectations under p_theta by quadrature
    (1-D ExponentialFamily with an interval).
    """
    if isinstance(family, ExponentialFamily):
        theta = _check_theta(theta, family.n_params)
        if x is None:
            h = family.expectation(lambda t, m, b: m, theta)
            g_mean = family.expectation(lambda t, m, b: m @ theta + b, theta)
            gg = family.expectation(lambda t, m, b: (m @ theta + b).unsqueeze(-1) * (m @ theta + b).unsqueeze(-2), theta)
            return _sandwich(h, gg - torch.outer(g_mean, g_mean))
        m, b = family.quadratic_terms(_check_sample(x, family.n_params, family.dim))
        if m.dim() != 3:
            raise InvalidValueError(f"x must have shape (n, d), got {tuple(x.shape)}")
        return _sandwich(m.mean(0), torch.cov((m @ theta + b).T).reshape(len(theta), len(theta)))
    if x is None and callable(family):
        raise InvalidValueError("x is required for a general log_p (quadrature needs an ExponentialFamily)")
    theta, x = _general_args(family, theta, x, "theta")
    grads = torch.func.jacrev(lambda th: implicit_objective(family, x, th))(theta)  # (n, k)
    h = torch.func.hessian(lambda th: implicit_objective(family, x, th).mean())(theta)
    return _sandwich(h, torch.cov(grads.T).reshape(len(theta), len(theta)))


def fisher_information(family: ExponentialFamily, theta: Tensor) -> Tensor:
    """I(theta) = Cov_theta(T(X)) for the natural parameter, by quadrature (1-D), shape (k, k)."""
    theta = _check_theta(theta, family.n_params)
    mean = family.expectation(lambda t, m, b: t, theta)
    second = family.expectation(lambda t, m, b: t.unsqueeze(-1) * t.unsqueeze(-2), theta)
    return second - torch.outer(mean, mean)


def mle_estimate(family: ExponentialFamily, x: Tensor, tol: float = 1e-11, max_iter: int = 100) -> Tensor:
    """Maximum-likelihood theta for a 1-D family: damped Newton on theta^T mean T(x) - A(theta),
    normaliser by quadrature, started at the score-matching estimate. x (n, 1) -> (k,)."""
    family._require_quadrature()
    x = _check_sample(x, family.n_params, family.dim)
    if x.dim() != 2:
        raise InvalidValueError(f"x must have shape (n, 1), got {tuple(x.shape)}")
    t_bar = family.stat(x).mean(0)

    def objective(th: Tensor) -> Tensor:
        lp = family._q_stat @ th
        return th @ t_bar - torch.logsumexp(lp + family._q_logw, 0)

    theta = _sm_exponential(family, x)
    for _ in range(max_iter):
        w = family._quad_weights(theta, check_tails=False)
        mean = w @ family._q_stat
        centred = family._q_stat - mean
        info = (centred * w.unsqueeze(-1)).T @ centred
        step = _scaled_inverse(info) @ (t_bar - mean)
        f0, lam = objective(theta), 1.0
        while not objective(theta + lam * step) >= f0 and lam > 1e-12:
            lam *= 0.5
        theta = theta + lam * step
        if (lam * step).abs().max() <= tol * (1 + theta.abs().max()):
            break
    else:
        raise RuntimeError(f"Newton for the MLE did not converge in {max_iter} iterations")
    family._quad_weights(theta)  # raises if the MLE is not negligible at the interval's ends
    return theta


def relative_efficiency(family: ExponentialFamily, theta: Tensor) -> Tensor:
    """Per coordinate diag(I(theta)^{-1}) / diag(H^{-1} S H^{-1}): asymptotic variance of the MLE over
    that of score matching (<= 1; Koehler, Heckett and Risteski, ICLR 2023). 1-D, by quadrature."""
    fisher = fisher_information(family, theta)
    return _scaled_inverse(fisher).diagonal() / sandwich_covariance(family, theta).diagonal()
