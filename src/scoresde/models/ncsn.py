"""SMLD / NCSN (Song & Ermon 1907.05600): geometric noise levels and the multi-level denoising loss,
and its form for a score model of a VE SDE trained through the one Trainer (loss "ncsn"). NCSN is not a
family of its own: "ncsn" is a loss of the "score" family (`models.score`), sampled with `sampler: ald`."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.sde import SDE, LinearSDE, ScoreFn, expand_like
from ..learning.losses import LOSSES

__all__ = ["geometric_sigmas", "ncsn_loss", "ncsn_sigmas", "ncsn_train_loss"]


def ncsn_sigmas(sde: LinearSDE, n_levels: int) -> Tensor:
    """n_levels geometric noise levels from sigma/alpha at T down to t_min (VE: sigma_max .. sigma(t_min))."""
    ends = torch.tensor([sde.T, sde.t_min], dtype=torch.float64)
    s = sde.sigma(ends) / sde.alpha(ends)
    return geometric_sigmas(float(s[0]), float(s[1]), n_levels)


def ncsn_train_loss(score_fn: ScoreFn, sde: SDE, x0: Tensor, *, t: Tensor | None = None, noise: Tensor | None = None,
                    generator: torch.Generator | None = None, n_levels: int = 50) -> Tensor:
    """SMLD/NCSN (1907.05600 eqs. 5-6) for a score model of a VE SDE (alpha = 1): levels `ncsn_sigmas`,
    the level sigma fed as the time t with sigma(t) = sigma (`inverse_log_snr`)."""
    if not isinstance(sde, LinearSDE) or not torch.allclose(sde.alpha(torch.tensor([sde.T], dtype=torch.float64)),
                                                            torch.ones(1, dtype=torch.float64)):
        raise InvalidValueError(f"loss 'ncsn' needs a variance-exploding SDE (alpha = 1), got {type(sde).__name__}")
    sigmas = ncsn_sigmas(sde, n_levels)
    time = lambda s: sde.inverse_log_snr(-torch.log(s)).to(s.dtype)  # log_snr = log(alpha / sigma)
    return ncsn_loss(lambda x, s: score_fn(x, time(s)), sigmas, x0, noise=noise, generator=generator)


def geometric_sigmas(sigma_max: float = 50.0, sigma_min: float = 0.01, n_levels: int = 232) -> Tensor:
    """NCSN noise levels sigma_1 > ... > sigma_L, a geometric sequence (Song & Ermon 1907.05600 sec. 4.2)."""
    if not 0 < sigma_min < sigma_max:
        raise InvalidValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if n_levels < 2:
        raise InvalidValueError(f"n_levels must be >= 2, got {n_levels}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n_levels, dtype=torch.float64))


def ncsn_loss(score_fn: Callable[[Tensor, Tensor], Tensor], sigmas: Tensor, x0: Tensor, *,
              level: Tensor | None = None, noise: Tensor | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """Per-sample multi-level denoising loss (1907.05600 eqs. 5-6), lambda(sigma) = sigma^2:
    (1/2) sigma^2 |s(x0 + sigma z, sigma) + z / sigma|^2 = (1/2) |sigma s + z|^2, level uniform.
    `score_fn(x, sigma)` receives the noise level of each sample (the VE SDE's sigma(t))."""
    if level is None:
        level = torch.randint(0, sigmas.numel(), (x0.shape[0],), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    sigma = sigmas.to(x0.dtype)[level]
    s = expand_like(sigma, x0)
    return 0.5 * (s * score_fn(x0 + s * noise, sigma) + noise).flatten(1).pow(2).sum(1)


LOSSES.register("ncsn")(ncsn_train_loss)
