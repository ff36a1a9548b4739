"""Discrete-time diffusion models: DDPM with its ELBO, and SMLD/NCSN noise levels (DESIGN section 12).

DDPM (Ho et al. 2006.11239): q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 1..N,
abar_t = prod_{s<=t} (1 - beta_s), q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). Arrays are
indexed by i = t - 1. The VP SDE is the N -> infinity limit with beta_t = beta(t / N) / N (T 3.8).
SMLD (Song & Ermon 1907.05600): geometric noise levels sigma_1 > ... > sigma_L and denoising
score matching at each level weighted by sigma^2; the VE SDE is its limit (T 3.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..core.errors import InvalidValueError
from ..core.sde import SDE, VP, expand_like
from ..core.validate import construct
from ..learning.losses import LOSSES
from .family import Family, register, unwrap

__all__ = ["DDPMSchedule", "DDPMModel", "discretized_gaussian_log_likelihood", "gaussian_kl", "ddpm_simple_loss",
           "ddpm_elbo", "ddpm_sample", "make_schedule", "DDPM"]

EpsFn = Callable[[Tensor, Tensor], Tensor]  # eps_fn(x_t, i) with integer step indices i of shape (batch,)


@dataclass(frozen=True, eq=False)
class DDPMSchedule:
    """A variance schedule beta_1..beta_N (float64) and the quantities derived from it."""

    betas: Tensor

    def __post_init__(self):
        b = torch.as_tensor(self.betas, dtype=torch.float64)
        if b.dim() != 1 or b.numel() < 1:
            raise InvalidValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(b.shape)}")
        if not ((b > 0) & (b < 1)).all():
            raise InvalidValueError("betas must lie in (0, 1)")
        object.__setattr__(self, "betas", b)

    @classmethod
    def linear(cls, n_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DDPMSchedule:
        """Ho et al.'s linear schedule (sec. 4)."""
        if n_steps < 1:
            raise InvalidValueError(f"n_steps must be >= 1, got {n_steps}")
        return cls(torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64))

    @classmethod
    def cosine(cls, n_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DDPMSchedule:
        """Nichol & Dhariwal 2102.09672 eq. 17: abar(t) = cos^2((t/N + s) / (1 + s) pi / 2) / abar(0)."""
        if n_steps < 1:
            raise InvalidValueError(f"n_steps must be >= 1, got {n_steps}")
        u = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return cls((1 - f[1:] / f[:-1]).clamp(max=max_beta))

    @classmethod
    def from_vp(cls, sde: VP, n_steps: int) -> DDPMSchedule:
        """beta_t = beta(t / N) / N, the discretisation whose limit is the VP SDE (T 3.8, 3.9)."""
        t = torch.arange(1, n_steps + 1, dtype=torch.float64) / n_steps * sde.T
        return cls(sde.beta(t) * sde.T / n_steps)

    @property
    def n_steps(self) -> int:
        return self.betas.numel()

    @property
    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(1 - self.betas, 0)

    def _abar_prev(self) -> Tensor:
        return torch.cat([self.betas.new_ones(1), self.alphas_cumprod[:-1]])

    def _gather(self, v: Tensor, i: Tensor, x: Tensor) -> Tensor:
        return expand_like(v.to(device=x.device, dtype=x.dtype)[i], x)

    def q_sample(self, x0: Tensor, i: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4)."""
        abar = self._gather(self.alphas_cumprod, i, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def posterior(self, x0: Tensor, xt: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7); variance 0 at t = 1."""
        abar, abar_prev = self.alphas_cumprod, self._abar_prev()
        c0 = abar_prev.sqrt() * self.betas / (1 - abar)
        ct = (1 - self.betas).sqrt() * (1 - abar_prev) / (1 - abar)
        var = (1 - abar_prev) / (1 - abar) * self.betas
        return self._gather(c0, i, xt) * x0 + self._gather(ct, i, xt) * xt, self._gather(var, i, xt)

    def eps_to_x0(self, xt: Tensor, eps: Tensor, i: Tensor) -> Tensor:
        abar = self._gather(self.alphas_cumprod, i, xt)
        return (xt - (1 - abar).sqrt() * eps) / abar.sqrt()

    def respace(self, n_steps: int) -> tuple[DDPMSchedule, Tensor]:
        """A chain on `n_steps` evenly spaced steps i_1 < ... < i_K = N - 1 of this one with the same
        abar at each kept step: beta'_k = 1 - abar_{i_k} / abar_{i_{k-1}} (Nichol & Dhariwal 2102.09672
        sec. 4). Returns the new schedule and the kept indices (an eps net trained on the full chain
        is evaluated at indices[k] for the new step k)."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or not 1 <= n_steps <= self.n_steps:
            raise InvalidValueError(f"n_steps must be an integer in [1, {self.n_steps}], got {n_steps!r}")
        idx = torch.linspace(self.n_steps - 1, 0, n_steps, dtype=torch.float64).round().long().flip(0)
        abar = self.alphas_cumprod[idx]
        return DDPMSchedule(1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])), idx

    def reverse_variance(self, kind: str) -> Tensor:
        """sigma_t^2 of p(x_{t-1} | x_t): "beta" (sigma^2 = beta_t) or "posterior" (beta-tilde_t)."""
        if kind == "beta":
            return self.betas
        if kind == "posterior":
            return torch.cat([self.betas[:1], ((1 - self._abar_prev()) / (1 - self.alphas_cumprod) * self.betas)[1:]])
        raise InvalidValueError(f"variance must be 'beta' or 'posterior', got {kind!r}")


def gaussian_kl(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> Tensor:
    """Elementwise KL(N(m1, v1) || N(m2, v2))."""
    return 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, std: Tensor, levels: int = 256) -> Tensor:
    """Elementwise log P(bin of x) for data on the grid {-1, -1 + 2/(L-1), ..., 1} (Ho et al. eq. 13).

    Bins have width 2/(L-1) around each level; the outermost bins extend to -inf and +inf,
    so the probabilities of all L levels sum to one.
    """
    half = 1.0 / (levels - 1)
    normal = torch.distributions.Normal(mean, std)
    lower = torch.where(x <= -1 + 1e-6, torch.zeros_like(x), normal.cdf(x - half))
    upper = torch.where(x >= 1 - 1e-6, torch.ones_like(x), normal.cdf(x + half))
    return torch.log((upper - lower).clamp_min(1e-12))


def ddpm_simple_loss(eps_fn: EpsFn, schedule: DDPMSchedule, x0: Tensor, *, i: Tensor | None = None,
                     noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample |eps - eps_theta(x_t, t)|^2 with t uniform on 1..N (Ho et al. eq. 14)."""
    if i is None:
        i = torch.randint(0, schedule.n_steps, (x0.shape[0],), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return (eps_fn(schedule.q_sample(x0, i, noise), i) - noise).flatten(1).pow(2).sum(1)


@torch.no_grad()
def ddpm_elbo(eps_fn: EpsFn, schedule: DDPMSchedule, x0: Tensor, *, variance: str = "posterior",
              levels: int = 256, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Per-sample terms of the negative ELBO in nats (Ho et al. eq. 5), x0 on a grid of `levels`
    values in [-1, 1] (256 for 8-bit images, 17 for scikit-learn's digits).

    -ELBO = L_N + sum_{t=2}^N L_{t-1} + L_0 with L_N = KL(q(x_N | x_0) || N(0, I)),
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) at one draw of x_t ~ q(x_t | x_0)
    (an unbiased estimate of its expectation), and L_0 = -log p(x_0 | x_1) with the discretised
    Gaussian decoder. Returns {"prior", "kl" (batch, N-1), "decoder", "total", "bits_per_dim"}.
    """
    n, N = x0.shape[0], schedule.n_steps
    abar_N = schedule.alphas_cumprod[-1].to(x0.dtype)
    prior = gaussian_kl(abar_N.sqrt() * x0, 1 - abar_N, torch.zeros_like(x0), torch.ones_like(x0)).flatten(1).sum(1)
    var_p = schedule.reverse_variance(variance)
    kl = x0.new_zeros(n, max(N - 1, 0))
    decoder = x0.new_zeros(n)
    for k in range(N):
        i = torch.full((n,), k, dtype=torch.long, device=x0.device)
        xt = schedule.q_sample(x0, i, torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device))
        mean_p, _ = schedule.posterior(schedule.eps_to_x0(xt, eps_fn(xt, i), i), xt, i)
        if k == 0:
            std = expand_like(var_p[:1].to(x0.dtype).sqrt().expand(n), x0)
            decoder = -discretized_gaussian_log_likelihood(x0, mean_p, std, levels).flatten(1).sum(1)
        else:
            mean_q, var_q = schedule.posterior(x0, xt, i)
            v = schedule._gather(var_p, i, x0)
            kl[:, k - 1] = gaussian_kl(mean_q, var_q, mean_p, v).flatten(1).sum(1)
    total = prior + kl.sum(1) + decoder
    return {"prior": prior, "kl": kl, "decoder": decoder, "total": total,
            "bits_per_dim": total / (x0[0].numel() * math.log(2))}


@torch.no_grad()
def ddpm_sample(eps_fn: EpsFn, schedule: DDPMSchedule, shape: tuple[int, ...], *, variance: str = "beta",
                generator: torch.Generator | None = None, x_T: Tensor | None = None,
                dtype: torch.dtype = torch.float32, clip: bool = False) -> Tensor:
    """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) from x_N ~ N(0, I) (Ho et al. Algorithm 2) with
    sigma_t^2 = beta_t (variance "beta", the default: Ho et al.'s choice for x0 ~ N(0, I)) or the posterior
    variance beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t < beta_t ("posterior", eq. 7; the default
    of the score family's `sampling.ddim.ddpm`); `DDPMSchedule.reverse_variance`."""
    var = schedule.reverse_variance(variance)
    x = torch.randn(shape, generator=generator, dtype=dtype) if x_T is None else x_T
    for k in reversed(range(schedule.n_steps)):
        i = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        x0 = schedule.eps_to_x0(x, eps_fn(x, i), i)
        mean, _ = schedule.posterior(x0.clamp(-1, 1) if clip else x0, x, i)
        x = mean if k == 0 else mean + schedule._gather(var, i, x).sqrt() * torch.randn(
            x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x


def make_schedule(n_steps: int = 1000, schedule: str = "linear") -> DDPMSchedule:
    """Ho et al.'s linear schedule (1e-4 .. 0.02) or the cosine one of Nichol & Dhariwal."""
    if schedule not in ("linear", "cosine"):
        raise InvalidValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
    return DDPMSchedule.linear(n_steps) if schedule == "linear" else DDPMSchedule.cosine(n_steps)


class DDPMModel(nn.Module):
    """eps_theta(x_t, i) of discrete DDPM, i in 0..N-1 the integer step (t = i + 1): `net(x, i / N)`."""

    def __init__(self, net: nn.Module, schedule: DDPMSchedule):
        super().__init__()
        self.net, self.schedule = net, schedule

    def forward(self, x: Tensor, i: Tensor, y: Tensor | None = None) -> Tensor:
        c = i.to(x.dtype) / self.schedule.n_steps
        return self.net(x, c) if y is None else self.net(x, c, y)

    def generate(self, shape: tuple[int, ...], *, method: str = "ddpm", nfe: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Ancestral sampling (Ho et al. Alg. 2, variance beta_t) on `nfe` respaced steps (default: all N);
        method 'ddpm'."""
        if method != "ddpm":
            raise InvalidValueError(f"a DDPM run samples with method 'ddpm' (ancestral), got {method!r}")
        sched, idx = self.schedule.respace(int(nfe or self.schedule.n_steps))
        device = next(self.parameters()).device  # the generator's too
        x_T = torch.randn(tuple(shape), generator=generator, device=device)
        return ddpm_sample(lambda x, i: self(x, idx.to(device)[i]), sched, tuple(shape), generator=generator, x_T=x_T)


def _ddpm(cfg, sde: SDE, sample_shape: tuple[int, ...], network: Callable[[], nn.Module]) -> nn.Module:
    return DDPMModel(network(), construct(make_schedule, cfg.model_args, "model_args for 'ddpm'"))


def ddpm_loss(model: Callable, sde: SDE, x0: Tensor, *, t: Tensor | None = None, noise: Tensor | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """The trainer's form of `discrete.ddpm_simple_loss` (its t, a continuous time, is unused: the
    loss draws integer steps)."""
    return ddpm_simple_loss(model, unwrap(model).schedule, x0, noise=noise, generator=generator)


LOSSES.register("ddpm")(ddpm_loss)


# method "ddpm" of this family is the discrete chain's ancestral sampler with sigma_t^2 = beta_t, not the
# continuous-time `sampling.ddim.ddpm` (default variance "posterior") of the score family
DDPM = register(Family("ddpm", _ddpm, losses=("ddpm",), methods=("ddpm",), generate=DDPMModel.generate))
