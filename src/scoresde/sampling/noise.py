"""The noise of the stochastic samplers: one standard normal z_i per step t_i -> t_{i+1} of a decreasing grid.

noise="gaussian" (the default): i.i.d. draws from the generator, made when the step asks for them.
noise="brownian": z_i = (W(t_i) - W(t_{i+1})) / sqrt(t_i - t_{i+1}) for one Brownian path W on [0, T],
a Brownian tree (torchsde's BrownianInterval with the dyadic `halfway_tree`), whose entropy is drawn from the
generator. The path depends only on that seed, not on the grid, so the increments over a coarse grid are the
sums of those over any refinement of it and samples change smoothly with the NFE. A callable noise(i) gives
z_i directly (common random numbers, or another library's draws).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchsde
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.validate import one_of
from .common import noise_like

__all__ = ["NOISES", "Noise", "brownian_increments", "step_noise"]

NOISES = ("gaussian", "brownian")
Noise = str | Callable[[int], Tensor]

# the tree's times are rounded to this fraction of T, so increments resolve steps down to ~1e-9 T
_TOL = 1e-9


def brownian_increments(x: Tensor, T: float, generator: torch.Generator | None = None
                        ) -> Callable[[float, float], Tensor]:
    """(t, t_next) -> W(t) - W(t_next) for t_next <= t in [0, T]: one Brownian path of x's shape, dtype and
    device, determined by one draw from `generator` (torch's global generator when None)."""
    device = generator.device if generator is not None else None
    entropy = int(torch.randint(2**62, (), generator=generator, device=device))
    tree = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=tuple(x.shape), dtype=x.dtype, device=x.device,
                                     entropy=entropy, tol=_TOL, halfway_tree=True)
    scale = math.sqrt(T)  # W(t) = sqrt(T) B(t / T) for the standard path B on [0, 1]
    return lambda t, t_next: scale * tree(t_next / T, t / T)


def step_noise(noise: Noise, x: Tensor, ts: Tensor, T: float,
               generator: torch.Generator | None = None) -> Callable[[int], Tensor]:
    """i -> z_i, standard normal of x's shape for the step ts[i] -> ts[i + 1] (module docstring); T is the
    end of the Brownian path's time range (sde.T), which the grid must not exceed."""
    if callable(noise):
        return noise
    one_of("noise", noise, NOISES)
    if noise == "gaussian":
        return lambda i: noise_like(x, generator)
    t = ts.detach().to("cpu", torch.float64).tolist()
    if t[0] > T or t[-1] < 0:
        raise InvalidValueError(f"ts must lie in [0, T = {T}] for noise='brownian', got [{t[-1]}, {t[0]}]")
    increment = brownian_increments(x, T, generator)
    return lambda i: increment(t[i], t[i + 1]) / math.sqrt(t[i] - t[i + 1])
