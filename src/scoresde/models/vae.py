"""Variational autoencoders, the imaging tutorial's baseline (Chan 2403.18103 sec. 1; Kingma & Welling 1312.6114).

Encoder q_phi(z | x) = N(mu(x), diag s(x)^2), prior N(0, I), decoder p_theta(x | z) Gaussian with a
learned global scale: a density on R^D ("continuous") or, for 8-bit images in [-1, 1], the
discretised Gaussian of Ho et al. eq. 13 ("discretized"), so that its bound in bits/dim is on the
scale of the DDPM ELBO and the probability-flow likelihood.
ELBO(x) = E_q log p_theta(x | z) - KL(q_phi(z | x) || N(0, I)) <= log p_theta(x); the
importance-weighted bound (Burda et al. 1509.00519) log (1/K) sum_k p(x, z_k) / q(z_k | x) tightens with K.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..core.errors import InvalidValueError
from ..core.sde import SDE
from ..core.validate import construct
from ..learning.losses import LOSSES
from .ddpm import discretized_gaussian_log_likelihood
from .family import Family, register

__all__ = ["VAE", "MLPVAE", "ConvVAE", "VAE_FAMILY"]

LOG_2PI = math.log(2 * math.pi)


class VAE(nn.Module):
    """Shared ELBO machinery; subclasses provide `encoder` (x -> 2 * latent features) and `decoder` (z -> x)."""

    def __init__(self, latent_dim: int, likelihood: str = "continuous", levels: int = 256):
        super().__init__()
        if likelihood not in ("continuous", "discretized"):
            raise InvalidValueError(f"likelihood must be 'continuous' or 'discretized', got {likelihood!r}")
        if latent_dim < 1:
            raise InvalidValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.levels = levels
        self.log_scale = nn.Parameter(torch.tensor(math.log(0.1)))
        self.encoder: nn.Module
        self.decoder: nn.Module

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z | x)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def log_px_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        mean = self.decoder(z)
        std = self.log_scale.exp().expand_as(mean)
        if self.likelihood == "discretized":
            return discretized_gaussian_log_likelihood(x, mean, std, self.levels).flatten(1).sum(1)
        return (-0.5 * ((x - mean) / std) ** 2 - self.log_scale - 0.5 * LOG_2PI).flatten(1).sum(1)

    def elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample ELBO in nats: one reparametrised draw z = mu + s eps, KL in closed form."""
        mu, logvar = self.encode(x)
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        return self.log_px_given_z(x, z) - kl

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample negative ELBO, for the training loop."""
        return -self.elbo(x, generator)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The per-sample training loss (negative ELBO), so that DDP wraps the VAE like any model."""
        return self.loss(x, generator)

    def generate(self, shape: tuple[int, ...], *, method: str = "decoder", nfe: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """The family's sampler (`running.build.draw_samples`): decoder means of shape[0] prior draws, method
        "decoder", one network evaluation (nfe 1 or None)."""
        if method != "decoder":
            raise InvalidValueError(f"a VAE samples with method 'decoder' (decoder means of prior draws), got {method!r}")
        if nfe not in (None, 1):
            raise InvalidValueError(f"a VAE sample costs one decoder evaluation: nfe must be 1, got {nfe!r}")
        x = self.sample(shape[0], generator)
        if tuple(x.shape) != tuple(shape):
            raise InvalidValueError(f"this VAE draws samples of shape {tuple(x.shape[1:])}, asked for {tuple(shape[1:])}")
        return x

    @torch.no_grad()
    def log_likelihood_bound(self, x: Tensor, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample importance-weighted lower bound on log p(x) with k samples (k = 1: the ELBO's
        Monte Carlo form, the KL not in closed form)."""
        if k < 1:
            raise InvalidValueError(f"k must be >= 1, got {k}")
        mu, logvar = self.encode(x)
        std = (0.5 * logvar).exp()
        log_w = []
        for _ in range(k):
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            z = mu + std * eps
            log_q = (-0.5 * eps**2 - 0.5 * logvar - 0.5 * LOG_2PI).sum(1)
            log_prior = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(1)
            log_w.append(self.log_px_given_z(x, z) + log_prior - log_q)
        return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)

    def bits_per_dim(self, x: Tensor, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample upper bound on -log2 P(x) / D for images on `levels` grey levels in [-1, 1]."""
        if self.likelihood != "discretized":
            raise InvalidValueError("bits_per_dim needs likelihood='discretized' (a probability over the grey levels)")
        return -self.log_likelihood_bound(x, k, generator) / (x[0].numel() * math.log(2))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean_only: bool = True) -> Tensor:
        """Decoder means (or noisy draws) at z ~ N(0, I)."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=p.dtype, device=p.device)
        mean = self.decoder(z)
        if mean_only:
            return mean
        return mean + self.log_scale.exp() * torch.randn(mean.shape, generator=generator, dtype=p.dtype, device=p.device)


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class MLPVAE(VAE):
    """VAE for vectors (batch, dim); `hidden=()` makes encoder and decoder affine (a linear-Gaussian model)."""

    def __init__(self, dim: int, latent_dim: int = 8, hidden: Sequence[int] = (256, 256), likelihood: str = "continuous",
                 levels: int = 256):
        super().__init__(latent_dim, likelihood, levels)
        self.encoder = _mlp([dim, *hidden, 2 * latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden), dim])


class ConvVAE(VAE):
    """Convolutional VAE for images (batch, C, H, W) with H, W divisible by 4."""

    def __init__(self, channels: int = 1, size: int = 8, latent_dim: int = 16, base: int = 32,
                 likelihood: str = "discretized", levels: int = 256):
        super().__init__(latent_dim, likelihood, levels)
        if size % 4:
            raise InvalidValueError(f"size must be divisible by 4, got {size}")
        s, c2 = size // 4, 2 * base
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, base, 3, padding=1), nn.SiLU(),
            nn.Conv2d(base, c2, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c2, c2, 4, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(c2 * s * s, 2 * latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, c2 * s * s), nn.SiLU(), nn.Unflatten(1, (c2, s, s)),
            nn.ConvTranspose2d(c2, c2, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(c2, base, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(base, channels, 3, padding=1))


def _vae(cfg, sde: SDE, sample_shape: tuple[int, ...], network: Callable[[], nn.Module]) -> nn.Module:
    if len(sample_shape) == 1:
        return construct(MLPVAE, cfg.model_args, "model_args for 'vae'", dim=sample_shape[0])
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise InvalidValueError(f"model 'vae' takes vectors or square images, got samples of shape {sample_shape}")
    return construct(ConvVAE, cfg.model_args, "model_args for 'vae'", channels=sample_shape[0], size=sample_shape[1])


def vae_loss(model: Callable, sde: SDE, x0: Tensor, *, t: Tensor | None = None, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Per-sample negative ELBO in nats (t and noise unused)."""
    return model(x0, generator=generator)


LOSSES.register("vae")(vae_loss)


VAE_FAMILY = register(Family("vae", _vae, losses=("vae",), methods=("decoder",), generate=VAE.generate))
