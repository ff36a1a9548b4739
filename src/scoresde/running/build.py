"""Builders from a Config: the SDE, the network, the model of its family, the device; and sampling glue.

`construct` validates keyword options against a factory's signature (core.validate); `family_of` and
`check_config` resolve a config's `models.Family` record and check model, loss and sampler against it;
`draw_samples` draws from any trained model: its family's own sampler (DDPM, VAE) or `sampling.sample`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.devices import device_generator
from ..core.errors import InvalidValueError, NonFiniteError
from ..core.registry import Registry
from ..core.sde import SDE, SDES, ScoreFn
from ..core.validate import construct
from ..learning.networks import MLP, UNet
from ..models import FAMILIES, Family, unwrap
from ..sampling.methods import sample_on_grid
from .config import Config

__all__ = [
    "NETWORKS",
    "build_model",
    "build_network",
    "build_sde",
    "check_config",
    "construct",
    "draw_samples",
    "family_of",
    "lookup",
    "resolve_device",
]


NETWORKS: Registry[type[nn.Module]] = Registry("network")
NETWORKS.register("mlp")(MLP)
NETWORKS.register("unet")(UNet)


def lookup(registry: Registry, name: str):
    try:
        return registry[name]
    except KeyError as e:
        raise InvalidValueError(e.args[0]) from None


def build_sde(cfg: Config) -> SDE:
    return construct(lookup(SDES, cfg.sde), cfg.sde_args, f"sde_args for {cfg.sde!r}")


def family_of(cfg: Config) -> Family:
    """The family of a run: the record `cfg.model` in `models.FAMILIES`, or its variant for `cfg.loss`;
    ValueError if the model does not train with that loss."""
    return lookup(FAMILIES, cfg.model).for_loss(cfg.loss)


def check_config(cfg: Config) -> Family:
    """`family_of(cfg)`, also checking that its family samples with `cfg.sampler`."""
    family = family_of(cfg)
    family.check_method(cfg.sampler)
    if cfg.c_noise != Config.c_noise and family.name not in ("score", "consistency"):
        raise InvalidValueError(f"config c_noise conditions the network of a score model; model {cfg.model!r} "
                                f"conditions its own network: leave c_noise at {Config.c_noise!r}")
    return family


def build_model(cfg: Config, sde: SDE, sample_shape: tuple[int, ...]) -> nn.Module:
    """The model of the run's family (`family_of`); "score": the network wrapped by `ScoreModel`
    (its forward returns the score)."""
    return family_of(cfg).build(cfg, sde, sample_shape, lambda: build_network(cfg, sample_shape))


def build_network(cfg: Config, sample_shape: tuple[int, ...]) -> nn.Module:
    """The network `cfg.net` with `cfg.net_args` for data of `sample_shape`."""
    cls = lookup(NETWORKS, cfg.net)
    if cls is MLP:
        if len(sample_shape) != 1:
            raise InvalidValueError(f"net 'mlp' takes vectors (n, d); this data has samples of shape {sample_shape}: use net=unet")
        net = construct(MLP, cfg.net_args, "net_args for 'mlp'", dim=sample_shape[0])
    else:
        if len(sample_shape) != 3:
            raise InvalidValueError(f"net 'unet' takes images (n, C, H, W); this data has samples of shape {sample_shape}")
        net = construct(UNet, cfg.net_args, "net_args for 'unet'", channels=sample_shape[0])
    return net


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError("device 'cuda' requested but CUDA is not available; use device=cpu or auto")
    return torch.device(name)


@torch.no_grad()
def draw_samples(sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...], method: str, nfe: int, *,
                 generator: torch.Generator | None = None, paths: int = 0, family: Family | None = None,
                 device: torch.device | None = None, **options) -> tuple[Tensor, Tensor | None]:
    """`sampling.methods.sample_on_grid` with `method`, `nfe` and its `options`: the method's fixed grid unless the
    options give one (a run's automatic schedule is `runs.run_schedule`'s); with paths > 0 also the first `paths`
    reverse trajectories, shape (grid points, paths, ...). `score_fn` is the model of `family` (None: any score
    function, or a consistency function for methods that take one), which must accept `method`; a family
    with its own sampler (`Family.generate`: DDPM, VAE) draws its samples itself (trajectories None, no
    options). On a non-CPU `device` the prior draw comes from the CPU `generator` and the sampler's noise
    from a device generator seeded by it; a family's own sampler draws all of its randomness from that one."""
    if family is not None:
        family.check_method(method)
        if family.generate is not None:
            if options:
                raise InvalidValueError(f"a {family.name!r} model draws its own samples: it takes no sampler options, "
                                 f"got {', '.join(sorted(options))}")
            x = family.generate(unwrap(score_fn), tuple(shape), method=method, nfe=nfe,
                                generator=device_generator(generator, device))
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(f"the samples of {family.name!r} with method {method!r} at nfe={nfe} are not "
                                     f"finite: the model returned NaN/inf")
            return x, None
    x_T = None
    if device is not None and torch.device(device).type != "cpu":
        x_T = sde.prior_sample(tuple(shape), generator=generator).to(device)
        generator, shape = device_generator(generator, device), None
    states: list[Tensor] = []
    callback = (lambda step, t, x: states.append(x[:paths].detach().clone())) if paths else None
    x = sample_on_grid(sde, score_fn, shape, method=method, nfe=nfe, generator=generator, x_T=x_T,
                       callback=callback, **options)
    return x, torch.stack(states) if paths else None
