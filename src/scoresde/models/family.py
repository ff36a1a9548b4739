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

from functools import partial
from typing import Callable

from torch import nn

from ..core.registry import Registry

__all__ = ["MODELS", "unwrap"]

Builder = Callable[..., nn.Module]  # (cfg, sde, sample_shape, network: () -> nn.Module) -> model
MODELS: "Registry[Builder]" = Registry("model")


def unwrap(model: Callable) -> nn.Module:
    """The module under label binding (functools.partial) and DistributedDataParallel."""
    if isinstance(model, partial):
        model = model.func
    return getattr(model, "module", model)
