"""Analytic Gaussian mixtures and toy data sets (DESIGN section 8).

Under a linear SDE the law of X_t started from a Gaussian mixture is again a mixture:
means alpha mu_k, covariances alpha^2 Sigma_k + sigma^2 I. With Sigma_k = U_k diag(l_k) U_k^T
stored once, every time shares the eigenvectors U_k and has eigenvalues alpha^2 l_k + sigma^2,
so exact log-densities and scores cost one projection at any t, batched over t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .errors import InvalidValueError
from .sde import LinearSDE, TimeLike, as_time

__all__ = [
    "GaussianMixture", "DiffusedMixture", "ring", "grid", "random_mixture",
    "two_moons", "swiss_roll", "checkerboard", "concentric_rings", "TOY_DATASETS",
]


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k) in R^d; weights (K,), means (K, d), covariances (K, d, d).

    Stored in float64 unless given another floating dtype; inputs of any floating dtype
    are evaluated in the mixture's dtype and returned in their own.
    """

    weights: Tensor
    means: Tensor
    covariances: Tensor
    _eig: tuple[Tensor, Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        dtype = self.means.dtype if torch.is_floating_point(torch.as_tensor(self.means)) else torch.float64
        dtype = torch.float64 if dtype in (torch.float16, torch.bfloat16, torch.float32) else dtype
        w, mu, cov = (torch.as_tensor(v, dtype=dtype) for v in (self.weights, self.means, self.covariances))
        if mu.dim() != 2:
            raise InvalidValueError(f"means must have shape (K, d), got {tuple(mu.shape)}")
        K, d = mu.shape
        if w.shape != (K,):
            raise InvalidValueError(f"weights must have shape ({K},), got {tuple(w.shape)}")
        if cov.shape != (K, d, d):
            raise InvalidValueError(f"covariances must have shape ({K}, {d}, {d}), got {tuple(cov.shape)}")
        if not (torch.isfinite(w).all() and torch.isfinite(mu).all() and torch.isfinite(cov).all()):
            raise InvalidValueError("weights, means and covariances must be finite")
        if (w <= 0).any():
            raise InvalidValueError("weights must be > 0")
        if not torch.allclose(cov, cov.transpose(-1, -2), atol=1e-10, rtol=1e-8):
            raise InvalidValueError("covariances must be symmetric")
        evals, evecs = torch.linalg.eigh(cov)
        if (evals <= 0).any():
            raise InvalidValueError("covariances must be positive definite")
        object.__setattr__(self, "weights", w / w.sum())
        object.__setattr__(self, "means", mu)
        object.__setattr__(self, "covariances", cov)
        object.__setattr__(self, "_eig", (evals, evecs))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Total covariance: sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covariances + self.means[:, :, None] * self.means[:, None, :])
        return second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.at(1.0, 0.0).sample(n, generator)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.at(1.0, 0.0).log_prob(x)

    def score(self, x: Tensor) -> Tensor:
        return self.at(1.0, 0.0).score(x)

    def at(self, alpha: TimeLike, sigma: TimeLike) -> DiffusedMixture:
        """The law of alpha X + sigma Z, Z ~ N(0, I); alpha, sigma scalars or (batch,)."""
        return DiffusedMixture(self, as_time(alpha).to(self.dtype), as_time(sigma).to(self.dtype))

    def at_time(self, sde: LinearSDE, t: TimeLike) -> DiffusedMixture:
        """Exact law p_t of X_t when X_0 follows this mixture; t scalar or (batch,)."""
        t = as_time(t).to(self.dtype)
        return self.at(sde.alpha(t), sde.sigma(t))

    def score_fn(self, sde: LinearSDE) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact score (x, t) -> grad log p_t(x), t of shape (batch,), for the samplers."""
        return lambda x, t: self.at_time(sde, t).score(x)


@dataclass(frozen=True, eq=False)
class DiffusedMixture:
    """A Gaussian mixture pushed through x -> alpha x + sigma z; alpha, sigma of shape () or (batch,)."""

    base: GaussianMixture
    alpha: Tensor
    sigma: Tensor

    def _components(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component log w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I), the projections U_k^T (x - alpha mu_k)
        and the eigenvalues of the covariances."""
        if x.dim() != 2 or x.shape[1] != self.base.dim:
            raise InvalidValueError(f"x must have shape (n, {self.base.dim}), got {tuple(x.shape)}")
        if self.alpha.dim() == 1 and self.alpha.shape[0] != x.shape[0]:
            raise InvalidValueError(f"per-sample times: got {self.alpha.shape[0]} times for {x.shape[0]} points")
        evals, evecs = self.base._eig
        a = self.alpha.reshape(-1, 1, 1)
        var = a**2 * evals + self.sigma.reshape(-1, 1, 1) ** 2  # (n or 1, K, d)
        z = torch.einsum("nkd,kde->nke", x[:, None, :] - a * self.base.means, evecs)
        log_c = (self.base.weights.log() - 0.5 * (z**2 / var).sum(-1) - 0.5 * var.log().sum(-1)
                 - 0.5 * self.base.dim * math.log(2 * math.pi))
        return log_c, z, var

    def log_prob(self, x: Tensor) -> Tensor:
        log_c, _, _ = self._components(x.to(self.base.dtype))
        return torch.logsumexp(log_c, dim=-1).to(x.dtype)

    def score(self, x: Tensor) -> Tensor:
        """grad log p = sum_k r_k(x) (-(C_k)^{-1} (x - alpha mu_k)), r_k the responsibilities."""
        log_c, z, var = self._components(x.to(self.base.dtype))
        r = torch.softmax(log_c, dim=-1)
        grad_k = -torch.einsum("kde,nke->nkd", self.base._eig[1], z / var)
        return (r[..., None] * grad_k).sum(1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.alpha.dim() == 1 and self.alpha.shape[0] != n:
            raise InvalidValueError(f"per-sample times: got {self.alpha.shape[0]} times for n = {n}")
        base = self.base
        k = torch.multinomial(base.weights, n, replacement=True, generator=generator)
        evals, evecs = base._eig
        z = torch.randn(n, base.dim, generator=generator, dtype=base.dtype)
        x0 = base.means[k] + torch.einsum("nde,ne->nd", evecs[k], evals[k].sqrt() * z)
        noise = torch.randn(n, base.dim, generator=generator, dtype=base.dtype)
        return self.alpha.reshape(-1, 1) * x0 + self.sigma.reshape(-1, 1) * noise


def _isotropic(means: Tensor, std: float) -> GaussianMixture:
    K, d = means.shape
    return GaussianMixture(torch.full((K,), 1.0 / K), means, std**2 * torch.eye(d, dtype=means.dtype).expand(K, d, d))


def ring(n_modes: int = 8, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """n_modes equal isotropic Gaussians evenly spaced on a circle."""
    angle = 2 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes
    return _isotropic(radius * torch.stack([angle.cos(), angle.sin()], 1), std)


def grid(n_side: int = 5, spacing: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """n_side^2 equal isotropic Gaussians on a centred square grid."""
    c = spacing * (torch.arange(n_side, dtype=torch.float64) - (n_side - 1) / 2)
    return _isotropic(torch.cartesian_prod(c, c), std)


def random_mixture(dim: int = 16, n_components: int = 8, seed: int = 0, spread: float = 1.5) -> GaussianMixture:
    """A reproducible mixture in R^dim with full covariances and unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(n_components, dim, generator=g, dtype=torch.float64)
    A = torch.randn(n_components, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    cov = 0.1 * (A @ A.transpose(1, 2)) + 0.02 * torch.eye(dim, dtype=torch.float64)
    weights = torch.rand(n_components, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixture(weights, means, cov)


def two_moons(n: int, noise: float = 0.05, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaved half circles, centred and scaled to unit-order coordinates."""
    upper = torch.rand(n, generator=generator) < 0.5
    s = math.pi * torch.rand(n, generator=generator)
    x = torch.where(upper, s.cos(), 1 - s.cos())
    y = torch.where(upper, s.sin(), 0.5 - s.sin())
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.5
    return pts + noise * torch.randn(n, 2, generator=generator)


def swiss_roll(n: int, noise: float = 0.05, generator: torch.Generator | None = None) -> Tensor:
    """The 2-D swiss roll (a spiral with radius growing with angle), scaled to about [-1.5, 1.5]^2."""
    u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    pts = torch.stack([u * u.cos(), u * u.sin()], 1) / 9.0
    return pts + noise * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the dark squares of a 4x4 board on [-2, 2]^2."""
    x = 4 * torch.rand(n, generator=generator) - 2
    col = torch.floor(x + 2)
    row = torch.randint(0, 2, (n,), generator=generator) * 2 + (col % 2)
    y = row - 2 + torch.rand(n, generator=generator)
    return torch.stack([x, y], 1)


def concentric_rings(n: int, n_rings: int = 3, noise: float = 0.04,
                     generator: torch.Generator | None = None) -> Tensor:
    """Points on n_rings circles of radii 1/n_rings .. 1 (times 2), mass proportional to radius."""
    radii = 2 * torch.arange(1, n_rings + 1, dtype=torch.float32) / n_rings
    r = radii[torch.multinomial(radii, n, replacement=True, generator=generator)]
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    pts = r[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
    return pts + noise * torch.randn(n, 2, generator=generator)


TOY_DATASETS: dict[str, Callable[..., Tensor]] = {
    "moons": two_moons,
    "swiss_roll": swiss_roll,
    "checkerboard": checkerboard,
    "rings": concentric_rings,
}
