"""Every model family of the imaging tutorial through the one `train.Trainer` (DESIGN section 12).

`Config.model` picks a builder in `MODELS`; `Config.loss` a loss in `losses.LOSSES` (this module
adds "ddpm", "vae" and "ncsn"); sampling goes through `train.draw_samples`, which calls a model's
`generate(shape, method=, nfe=, generator=)` when it has one (DDPM, VAE) and `samplers.sample`
otherwise. Checkpoints, EMA, resume, DDP and the CLI are shared.

- "score": `precond.ScoreModel` on `Config.sde` (VP, VE, sub-VP, contractive VP, ...); with
  loss "ncsn" it is SMLD/NCSN: the VE score model trained at geometric noise levels, sampled
  with annealed Langevin (`sampler: ald`).
- "ddpm": discrete DDPM, `DDPMModel` = eps_theta(x_t, i) with the network fed c = i / N;
  model_args: n_steps (1000), schedule ("linear" | "cosine"); loss "ddpm" (Ho et al. eq. 14),
  ancestral sampling on `nfe` evenly respaced steps.
- "vae": `vae.ConvVAE` for images, `vae.MLPVAE` for vectors; model_args go to the class
  (latent_dim, likelihood, levels, ...); loss "vae" (negative ELBO).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from . import consistency  # noqa: F401  (registers the sampling method "consistency" for consistency runs)
from .discrete import DDPMSchedule, ddpm_sample, ddpm_simple_loss, geometric_sigmas, ncsn_loss
from .losses import LOSSES
from .precond import ScoreModel
from .registry import Registry
from .sde import SDE, LinearSDE, ScoreFn
from .vae import ConvVAE, MLPVAE

__all__ = ["MODELS", "DDPMModel", "make_schedule", "ddpm_loss", "vae_loss", "ncsn_sigmas", "ncsn_train_loss",
           "unwrap", "bits_per_dim_offset", "pf_bits_per_dim"]

Builder = Callable[..., nn.Module]  # (cfg, sde, sample_shape, network: () -> nn.Module) -> model
MODELS: "Registry[Builder]" = Registry("model")


def make_schedule(n_steps: int = 1000, schedule: str = "linear") -> DDPMSchedule:
    """Ho et al.'s linear schedule (1e-4 .. 0.02) or the cosine one of Nichol & Dhariwal."""
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
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
        """Ancestral sampling (Ho et al. Alg. 2) on `nfe` respaced steps (default: all N); method 'ddpm'."""
        if method != "ddpm":
            raise ValueError(f"a DDPM run samples with method 'ddpm' (ancestral), got {method!r}")
        sched, idx = self.schedule.respace(int(nfe or self.schedule.n_steps))
        idx = idx.to(next(self.parameters()).device)
        return ddpm_sample(lambda x, i: self(x, idx[i]), sched, tuple(shape), generator=generator)


def unwrap(model: Callable) -> nn.Module:
    """The module under label binding (functools.partial) and DistributedDataParallel."""
    if isinstance(model, partial):
        model = model.func
    return getattr(model, "module", model)


def _construct(factory: Callable, kwargs: dict, what: str, **fixed):
    from .train import construct

    return construct(factory, kwargs, what, **fixed)


@MODELS.register("score")
def _score(cfg, sde: SDE, sample_shape: tuple[int, ...], network: Callable[[], nn.Module]) -> nn.Module:
    if cfg.model_args:
        raise ValueError(f"model 'score' takes no model_args, got {sorted(cfg.model_args)}")
    return ScoreModel(network(), sde, cfg.parametrization, cfg.sigma_data)


@MODELS.register("ddpm")
def _ddpm(cfg, sde: SDE, sample_shape: tuple[int, ...], network: Callable[[], nn.Module]) -> nn.Module:
    return DDPMModel(network(), _construct(make_schedule, cfg.model_args, "model_args for 'ddpm'"))


@MODELS.register("vae")
def _vae(cfg, sde: SDE, sample_shape: tuple[int, ...], network: Callable[[], nn.Module]) -> nn.Module:
    if len(sample_shape) == 1:
        return _construct(MLPVAE, cfg.model_args, "model_args for 'vae'", dim=sample_shape[0])
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ValueError(f"model 'vae' takes vectors or square images, got samples of shape {sample_shape}")
    return _construct(ConvVAE, cfg.model_args, "model_args for 'vae'", channels=sample_shape[0], size=sample_shape[1])


def ddpm_loss(model: Callable, sde: SDE, x0: Tensor, *, t: Tensor | None = None, noise: Tensor | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """The trainer's form of `discrete.ddpm_simple_loss` (its t, a continuous time, is unused: the
    loss draws integer steps)."""
    return ddpm_simple_loss(model, unwrap(model).schedule, x0, noise=noise, generator=generator)


def vae_loss(model: Callable, sde: SDE, x0: Tensor, *, t: Tensor | None = None, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Per-sample negative ELBO in nats (t and noise unused)."""
    return model(x0, generator=generator)


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
        raise ValueError(f"loss 'ncsn' needs a variance-exploding SDE (alpha = 1), got {type(sde).__name__}")
    sigmas = ncsn_sigmas(sde, n_levels)
    time = lambda s: sde.inverse_log_snr(-torch.log(s)).to(s.dtype)  # log_snr = log(alpha / sigma)
    return ncsn_loss(lambda x, s: score_fn(x, time(s)), sigmas, x0, noise=noise, generator=generator)


for _name, _fn in {"ddpm": ddpm_loss, "vae": vae_loss, "ncsn": ncsn_train_loss}.items():
    if _name not in LOSSES:
        LOSSES.register(_name)(_fn)


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
    from .likelihood import log_likelihood

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
