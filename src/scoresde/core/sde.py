"""Forward SDEs dX = f(t, X) dt + g(t) dW (DESIGN section 2, Tang & Zhao section 3).

Every built-in SDE except overdamped Langevin is linear, f(t, x) = -b(t) x, so that
X_t | X_0 = x0 ~ N(alpha(t) x0, sigma(t)^2 I) with
alpha(t) = exp(-int_0^t b) and sigma(t)^2 = int_0^t exp(-2 int_u^t b) g(u)^2 du.
The rest of the library is written against this (alpha, sigma) pair.

Times `t` are Python floats, 0-d tensors or tensors of shape (batch,); `x` has any
shape (batch, ...). Coefficients come back as tensors of the shape of `t` and are
broadcast against `x` by `expand_like`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .registry import Registry
from .validate import check, integer, number, positive

ScoreFn = Callable[[Tensor, Tensor], Tensor]
TimeLike = float | Tensor

__all__ = [
    "SDE", "LinearSDE", "OU", "Langevin", "VE", "VEEDM", "VP", "SubVP",
    "ContractiveOU", "ContractiveVP", "reverse_drift", "probability_flow_drift",
    "simulate", "expand_like", "batch_dot", "as_time", "batch_time", "SDES",
]


def as_time(t: TimeLike, like: Tensor | None = None) -> Tensor:
    """`t` as a floating tensor, on the device and dtype of `like` when given."""
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient of shape () or (batch,) to broadcast over `x`."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def batch_dot(u: Tensor, v: Tensor) -> Tensor:
    """Per-sample inner product of two batches of the same shape: shape (batch,)."""
    return (u * v).flatten(1).sum(1)


def _check_horizon(T: float, t_min: float) -> None:
    number("t_min", t_min, 0, strict=False)
    number("T", T)
    check("T", T, T > t_min, f"> t_min = {t_min}")


class SDE:
    """Interface shared by every forward SDE; subclasses are frozen dataclasses."""

    T: float
    t_min: float

    def drift(self, t: TimeLike, x: Tensor) -> Tensor:
        raise NotImplementedError

    def diffusion(self, t: TimeLike) -> Tensor:
        raise NotImplementedError

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None, device=None) -> Tensor:
        raise NotImplementedError

    def prior_logp(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class LinearSDE(SDE):
    """A linear SDE f(t, x) = -b(t) x with a Gaussian transition kernel.

    Subclasses define `b`, `diffusion`, `alpha`, `sigma` and `prior_std`; everything
    else (marginals, conditional score, prior, log-SNR) is derived here once.
    """

    def b(self, t: TimeLike) -> Tensor:
        """Linear drift coefficient: f(t, x) = -b(t) x."""
        raise NotImplementedError

    def alpha(self, t: TimeLike) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: TimeLike) -> Tensor:
        raise NotImplementedError

    @property
    def prior_std(self) -> float:
        raise NotImplementedError

    def drift(self, t: TimeLike, x: Tensor) -> Tensor:
        return -expand_like(self.b(as_time(t, x)), x) * x

    def marginal(self, x0: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        """Mean and std of X_t | X_0 = x0, broadcast to the shape of x0."""
        t = as_time(t, x0)
        mean = expand_like(self.alpha(t), x0) * x0
        return mean, expand_like(self.sigma(t), x0).expand_as(mean)

    def sample_marginal(self, x0: Tensor, t: TimeLike, noise: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise."""
        t = as_time(t, x0)
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * noise

    def conditional_score(self, xt: Tensor, x0: Tensor, t: TimeLike) -> Tensor:
        """grad_x log p_t(x | x0) = -(x - alpha x0) / sigma^2 (T 4.10)."""
        t = as_time(t, xt)
        a, s = expand_like(self.alpha(t), xt), expand_like(self.sigma(t), xt)
        return -(xt - a * x0) / s**2

    def prior_sample(self, shape, generator=None, dtype=None, device=None) -> Tensor:
        """A draw from the prior pi = N(0, prior_std^2 I)."""
        return self.prior_std * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def prior_logp(self, x: Tensor) -> Tensor:
        """log pi(x) per sample, summed over all but the batch dimension."""
        d = x[0].numel()
        s = self.prior_std
        return -0.5 * x.flatten(1).pow(2).sum(1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def log_snr(self, t: TimeLike) -> Tensor:
        """lambda(t) = log(alpha(t) / sigma(t)), decreasing in t."""
        t = as_time(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def inverse_log_snr(self, lam: TimeLike) -> Tensor:
        """The time t with log_snr(t) = lam."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form inverse log-SNR")


def _beta_params(beta_min: float, beta_max: float) -> None:
    number("beta_min", beta_min, 0, strict=False)
    number("beta_max", beta_max)
    check("beta_max", beta_max, beta_max > beta_min, f"> beta_min = {beta_min}")


class _LinearBeta:
    """beta(t) = beta_min + t (beta_max - beta_min) (T 3.9), B(t) = int_0^t beta; the parameters and the horizon
    [t_min, T] are checked at construction."""

    beta_min: float
    beta_max: float
    T: float
    t_min: float

    def __post_init__(self):
        _beta_params(self.beta_min, self.beta_max)
        _check_horizon(self.T, self.t_min)

    def beta(self, t: TimeLike) -> Tensor:
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def B(self, t: TimeLike) -> Tensor:
        t = as_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def B_inverse(self, B: Tensor) -> Tensor:
        """Solve B(t) = B for t >= 0 (the positive root of a quadratic)."""
        db = self.beta_max - self.beta_min
        return 2 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * db * B))


@dataclass(frozen=True)
class OU(LinearSDE):
    """Ornstein-Uhlenbeck dX = -X dt + sqrt(2) dW (T 3.1); alpha = e^{-t}, sigma^2 = 1 - e^{-2t}."""

    T: float = 5.0
    t_min: float = 1e-3

    def __post_init__(self):
        _check_horizon(self.T, self.t_min)

    def b(self, t):
        return torch.ones_like(as_time(t))

    def diffusion(self, t):
        return torch.full_like(as_time(t), math.sqrt(2.0))

    def alpha(self, t):
        return torch.exp(-as_time(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-2 * as_time(t)))

    @property
    def prior_std(self):
        return 1.0

    def log_snr(self, t):
        return -0.5 * torch.log(torch.expm1(2 * as_time(t)))

    def inverse_log_snr(self, lam):
        return 0.5 * torch.log1p(torch.exp(-2 * as_time(lam)))


@dataclass(frozen=True)
class VE(LinearSDE):
    """Variance exploding SDE (T 3.5; Song et al. 2011.13456 eq. 30).

    g(t) = s_min r^t sqrt(2 log r), r = s_max / s_min; alpha = 1,
    sigma(t)^2 = s_min^2 (r^{2t} - 1); prior N(0, s_max^2 I).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    T: float = 1.0
    t_min: float = 1e-5

    def __post_init__(self):
        positive("sigma_min", self.sigma_min)
        number("sigma_max", self.sigma_max)
        check("sigma_max", self.sigma_max, self.sigma_max > self.sigma_min, f"> sigma_min = {self.sigma_min}")
        _check_horizon(self.T, self.t_min)

    @property
    def _log_r(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def b(self, t):
        return torch.zeros_like(as_time(t))

    def diffusion(self, t):
        return self.sigma_min * torch.exp(as_time(t) * self._log_r) * math.sqrt(2 * self._log_r)

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return self.sigma_min * torch.sqrt(torch.expm1(2 * self._log_r * as_time(t)))

    @property
    def prior_std(self):
        return self.sigma_max * math.exp(self._log_r * (self.T - 1.0))

    def inverse_log_snr(self, lam):
        return 0.5 * torch.log1p(torch.exp(-2 * as_time(lam)) / self.sigma_min**2) / self._log_r


@dataclass(frozen=True)
class VEEDM(LinearSDE):
    """VE with g = sqrt(2t) (Karras et al. 2206.00364; T section 6.2): alpha = 1, sigma = t."""

    T: float = 80.0
    t_min: float = 0.002

    def __post_init__(self):
        _check_horizon(self.T, self.t_min)

    def b(self, t):
        return torch.zeros_like(as_time(t))

    def diffusion(self, t):
        return torch.sqrt(2 * as_time(t))

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return as_time(t).clone()

    @property
    def prior_std(self):
        return self.T

    def inverse_log_snr(self, lam):
        return torch.exp(-as_time(lam))


@dataclass(frozen=True)
class _VPDrift(_LinearBeta, LinearSDE):
    """What VP and sub-VP share: the drift -beta(t) X / 2, so alpha = exp(-B/2); sigma(T) is near 1 in both, so
    the prior is N(0, I)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0
    t_min: float = 1e-3

    def b(self, t):
        return 0.5 * self.beta(t)

    def alpha(self, t):
        return torch.exp(-0.5 * self.B(t))

    @property
    def prior_std(self):
        return 1.0


@dataclass(frozen=True)
class VP(_VPDrift):
    """Variance preserving SDE dX = -beta X / 2 dt + sqrt(beta) dW (T 3.8, 3.10).

    alpha = exp(-B/2), sigma^2 = 1 - e^{-B}; prior N(0, I).
    """

    def diffusion(self, t):
        return torch.sqrt(self.beta(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self.B(t)))

    def log_snr(self, t):
        return -0.5 * torch.log(torch.expm1(self.B(t)))

    def inverse_log_snr(self, lam):
        return self.B_inverse(torch.log1p(torch.exp(-2 * as_time(lam))))


@dataclass(frozen=True)
class SubVP(_VPDrift):
    """Sub-VP SDE, g^2 = beta (1 - e^{-2B}) (T 3.12, 3.13).

    alpha = exp(-B/2), sigma^2 = (1 - e^{-B})^2; prior N(0, I).
    """

    def diffusion(self, t):
        return torch.sqrt(-self.beta(t) * torch.expm1(-2 * self.B(t)))

    def sigma(self, t):
        return -torch.expm1(-self.B(t))

    def inverse_log_snr(self, lam):
        # e^lam = u / (1 - u^2) with u = e^{-B/2}; u is the positive root of e^lam u^2 + u - e^lam.
        e = torch.exp(as_time(lam))
        u = 2 * e / (1 + torch.sqrt(1 + 4 * e**2))
        return self.B_inverse(-2 * torch.log(u))


@dataclass(frozen=True)
class ContractiveOU(LinearSDE):
    """Contractive OU dX = theta X dt + g dW (T 3.16; Tang & Zhao 2401.13115).

    alpha = e^{theta t}, sigma^2 = g^2 (e^{2 theta t} - 1) / (2 theta); the prior drops
    the alpha(T) x0 term: N(0, sigma(T)^2 I).
    """

    theta: float = 1.0
    g: float = 5.0
    T: float = 2.0
    t_min: float = 1e-3

    def __post_init__(self):
        positive("theta", self.theta)
        positive("g", self.g)
        _check_horizon(self.T, self.t_min)

    def b(self, t):
        return torch.full_like(as_time(t), -self.theta)

    def diffusion(self, t):
        return torch.full_like(as_time(t), self.g)

    def alpha(self, t):
        return torch.exp(self.theta * as_time(t))

    def sigma(self, t):
        return self.g * torch.sqrt(torch.expm1(2 * self.theta * as_time(t)) / (2 * self.theta))

    @property
    def prior_std(self):
        return self.g * math.sqrt(math.expm1(2 * self.theta * self.T) / (2 * self.theta))

    def inverse_log_snr(self, lam):
        # alpha^2 / sigma^2 = 2 theta y / (g^2 (y - 1)) with y = e^{2 theta t}; lam > log(sqrt(2 theta) / g).
        k = torch.exp(2 * as_time(lam)) * self.g**2 / (2 * self.theta)
        return -torch.log1p(-1 / k) / (2 * self.theta)


@dataclass(frozen=True)
class ContractiveVP(_LinearBeta, LinearSDE):
    """Contractive VP dX = beta X / 2 dt + sqrt(beta) dW (T 3.18; Tang & Zhao 2401.13115).

    alpha = exp(B/2), sigma^2 = e^{B} - 1; prior N(0, (e^{B(T)} - 1) I).
    """

    beta_min: float = 0.1
    beta_max: float = 8.0
    T: float = 1.0
    t_min: float = 1e-3

    def b(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return torch.sqrt(self.beta(t))

    def alpha(self, t):
        return torch.exp(0.5 * self.B(t))

    def sigma(self, t):
        return torch.sqrt(torch.expm1(self.B(t)))

    @property
    def prior_std(self):
        return math.sqrt(math.expm1(float(self.B(self.T))))

    def log_snr(self, t):
        return -0.5 * torch.log(-torch.expm1(-self.B(t)))

    def inverse_log_snr(self, lam):
        return self.B_inverse(-torch.log1p(-torch.exp(-2 * as_time(lam))))


@dataclass(frozen=True)
class Langevin(SDE):
    """Overdamped Langevin dX = -grad V(X) dt + sqrt(2) dW (T 3.3); stationary law prop. to e^{-V}.

    `potential(x) -> (batch,)` is any differentiable V; grad V comes from autograd. The
    marginals are not Gaussian, so `alpha`, `sigma` and `marginal` raise; simulate the
    forward process with `simulate` instead. `prior_logp` is the unnormalised -V.
    """

    potential: Callable[[Tensor], Tensor]
    T: float = 5.0
    t_min: float = 1e-3

    def __post_init__(self):
        check("potential", self.potential, callable(self.potential), "a callable x -> V(x) of shape (batch,)")
        _check_horizon(self.T, self.t_min)

    def grad_potential(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.potential(x).sum(), x)
        return grad

    def drift(self, t, x):
        return -self.grad_potential(x)

    def diffusion(self, t):
        return torch.full_like(as_time(t), math.sqrt(2.0))

    def prior_logp(self, x):
        return -self.potential(x)

    def _no_gaussian(self, *_args, **_kwargs):
        raise NotImplementedError(
            "Langevin with a general potential has no closed-form Gaussian marginal; "
            "use scoresde.sde.simulate for X_t, or a linear SDE (OU is Langevin with V = |x|^2 / 2)")

    alpha = sigma = marginal = sample_marginal = conditional_score = log_snr = _no_gaussian

    def prior_sample(self, shape, generator=None, dtype=None, device=None):
        raise NotImplementedError(
            "Langevin's prior e^{-V} has no generic sampler; pass x_T to the sampler "
            "(for instance from simulate(sde, x0, sde.T, ...))")


def batch_time(t: TimeLike, x: Tensor) -> Tensor:
    """`t` as a tensor of shape (batch,) in the dtype and device of `x`."""
    return as_time(t, x).expand(x.shape[0])


def _score_drift(sde: SDE, score_fn: ScoreFn, weight: float) -> Callable[[Tensor, Tensor], Tensor]:
    def drift(t: TimeLike, x: Tensor) -> Tensor:
        t = batch_time(t, x)
        return sde.drift(t, x) - weight * expand_like(sde.diffusion(t) ** 2, x) * score_fn(x, t)

    return drift


def reverse_drift(sde: SDE, score_fn: ScoreFn) -> Callable[[Tensor, Tensor], Tensor]:
    """Drift of the time reversal (T 2.7) written in forward time t:
    dx = [f(t, x) - g(t)^2 s(x, t)] dt + g(t) dW-bar, integrated from T down to t_min."""
    return _score_drift(sde, score_fn, 1.0)


def probability_flow_drift(sde: SDE, score_fn: ScoreFn) -> Callable[[Tensor, Tensor], Tensor]:
    """Probability-flow ODE dx/dt = f(t, x) - g(t)^2 s(x, t) / 2 (T 6.1)."""
    return _score_drift(sde, score_fn, 0.5)


def simulate(sde: SDE, x0: Tensor, t_end: TimeLike, n_steps: int = 100, t_start: TimeLike = 0.0,
             generator: torch.Generator | None = None) -> Tensor:
    """Euler-Maruyama simulation of the forward SDE from t_start to t_end (per-sample t_end allowed)."""
    integer("n_steps", n_steps, 1)
    t0, t1 = batch_time(t_start, x0), batch_time(t_end, x0)
    h = (t1 - t0) / n_steps
    x = x0
    for i in range(n_steps):
        t = t0 + i * h
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + sde.drift(t, x) * expand_like(h, x) + expand_like(sde.diffusion(t) * h.sqrt(), x) * z
    return x


SDES: "Registry[type[SDE]]" = Registry("SDE")
for _name, _cls in [("ou", OU), ("langevin", Langevin), ("ve", VE), ("ve_edm", VEEDM), ("vp", VP),
                    ("subvp", SubVP), ("contractive_ou", ContractiveOU), ("contractive_vp", ContractiveVP)]:
    SDES.register(_name)(_cls)
