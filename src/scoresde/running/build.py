"""Builders from a Config: the SDE, the network, the model of its family, the device; and sampling glue.

`construct` validates keyword options against a factory's signature (core.validate);
`draw_samples` draws from any trained model: its family's own sampler (DDPM, VAE) or `sampling.sample`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..core.registry import Registry
from ..core.sde import SDE, SDES, ScoreFn
from ..core.validate import construct
from ..learning.networks import MLP, UNet
from ..models import MODELS
from ..sampling.methods import sample
from .config import Config

__all__ = ["NETWORKS", "build_sde", "build_network", "build_model", "construct", "draw_samples", "resolve_device",
           "lookup"]


NETWORKS: "Registry[type[nn.Module]]" = Registry("network")
NETWORKS.register("mlp")(MLP)
NETWORKS.register("unet")(UNet)


def lookup(registry: Registry, name: str):
    try:
        return registry[name]
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def build_sde(cfg: Config) -> SDE:
    return construct(lookup(SDES, cfg.sde), cfg.sde_args, f"sde_args for {cfg.sde!r}")


def build_model(cfg: Config, sde: SDE, sample_shape: tuple[int, ...]) -> nn.Module:
    """The model of family `cfg.model` (`families.MODELS`); "score": the network wrapped by `ScoreModel`
    (its forward returns the score)."""
    return lookup(MODELS, cfg.model)(cfg, sde, sample_shape, lambda: build_network(cfg, sample_shape))


def build_network(cfg: Config, sample_shape: tuple[int, ...]) -> nn.Module:
    """The network `cfg.net` with `cfg.net_args` for data of `sample_shape`."""
    cls = lookup(NETWORKS, cfg.net)
    if cls is MLP:
        if len(sample_shape) != 1:
            raise ValueError(f"net 'mlp' takes vectors (n, d); this data has samples of shape {sample_shape}: use net=unet")
        net = construct(MLP, cfg.net_args, "net_args for 'mlp'", dim=sample_shape[0])
    else:
        if len(sample_shape) != 3:
            raise ValueError(f"net 'unet' takes images (n, C, H, W); this data has samples of shape {sample_shape}")
        net = construct(UNet, cfg.net_args, "net_args for 'unet'", channels=sample_shape[0])
    return net


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use device=cpu or auto")
    return torch.device(name)


@torch.no_grad()
def draw_samples(sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...], method: str, nfe: int, *,
                 generator: torch.Generator | None = None, paths: int = 0,
                 device: torch.device | None = None, **options) -> tuple[Tensor, Tensor | None]:
    """`samplers.sample` with `method`, `nfe` and its `options`; with paths > 0 also the first `paths` reverse
    trajectories, shape (grid points, paths, ...). A model with a `generate` method (DDPM, VAE:
    `families`) draws its own samples (no trajectories). On a non-CPU `device` the prior draw comes
    from the CPU `generator` and the sampler's noise from a device generator seeded by it."""
    if hasattr(score_fn, "generate"):
        return score_fn.generate(tuple(shape), method=method, nfe=nfe, generator=generator), None
    x_T = None
    if device is not None and torch.device(device).type != "cpu":
        x_T = sde.prior_sample(tuple(shape), generator=generator).to(device)
        generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        shape = None
    states: list[Tensor] = []
    callback = (lambda step, t, x: states.append(x[:paths].detach().clone())) if paths else None
    if method == "consistency":
        options = {"denoise": False, **options}  # every consistency step is a denoise
    x = sample(sde, score_fn, shape, method=method, nfe=nfe, generator=generator, x_T=x_T, callback=callback,
               **options)
    return x, torch.stack(states) if paths else None
