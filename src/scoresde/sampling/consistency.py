"""Consistency functions and their sampling (Song et al. 2303.01469; T 6.15-6.18) for any linear SDE.

f(x, t) = c_skip(t) x + c_out(t) F(x, t) with CM's scalings written on x / alpha at the noise level
s = sigma / alpha, so f(x, t_min) = x exactly; one-step and multistep sampling (CM Algorithm 1),
registered as the sampling method "consistency" (`methods.METHODS`). Training: `models.consistency`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..core.errors import InvalidValueError
from ..core.precond import ScoreModel, score_to_x0
from ..core.sde import LinearSDE, TimeLike, as_time, batch_time, expand_like
from ..core.validate import check, positive
from .grids import time_grid

__all__ = ["effective_sigma", "consistency_scalings", "ConsistencyModel", "consistency_times", "multistep_times",
           "consistency_sample", "consistency_method"]


def effective_sigma(sde: LinearSDE, t: TimeLike) -> Tensor:
    """s(t) = sigma(t) / alpha(t): the noise level of the scaled variable x / alpha(t)."""
    t = as_time(t)
    return sde.sigma(t) / sde.alpha(t)


def consistency_scalings(sde: LinearSDE, t: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) at times t (module docstring), acting on x and on the x0 prediction F."""
    positive("sigma_data", sigma_data)
    t_min = torch.full_like(t, sde.t_min)
    s, s_min = effective_sigma(sde, t), effective_sigma(sde, t_min)
    sd2 = sigma_data**2
    c_skip = (sde.alpha(t_min) / sde.alpha(t)) * sd2 / ((s - s_min) ** 2 + sd2)
    c_out = sde.alpha(t_min) * sigma_data * (s - s_min) / torch.sqrt(s**2 + sd2)
    return c_skip, c_out


class ConsistencyModel(nn.Module):
    """f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(x, t) with f(x, t_min) = x (T 6.15).

    F is the data prediction of `model`, any module whose forward(x, t) returns a score (a
    `precond.ScoreModel` or a DDP wrapper of one), read back through Tweedie's formula
    (`precond.score_to_x0`). With `ScoreModel(net, sde, "x0", sigma_data)` (`from_net`) this is
    F = net(c_in x, c_noise) with EDM's input scaling for any (alpha, sigma), as in CM, and a
    consistency checkpoint has the layout of an x0-parametrised score model's; `model`'s own
    output is then not a score of p_t, only this module's forward is meaningful.
    """

    def __init__(self, model: nn.Module, sde: LinearSDE, sigma_data: float = 0.5):
        super().__init__()
        check("sde", type(sde).__name__, isinstance(sde, LinearSDE), "a LinearSDE (alpha, sigma known)")
        positive("sigma_data", sigma_data)
        self.model, self.sde, self.sigma_data = model, sde, float(sigma_data)

    @classmethod
    def from_net(cls, net: nn.Module, sde: LinearSDE, sigma_data: float = 0.5) -> "ConsistencyModel":
        """The CM parametrisation around a raw network net(x, c) -> (batch, ...)."""
        return cls(ScoreModel(net, sde, "x0", sigma_data), sde, sigma_data)

    def forward(self, x: Tensor, t: TimeLike) -> Tensor:
        t = batch_time(t, x)
        lo, hi = self.sde.t_min, self.sde.T
        if bool(((t < lo) | (t > hi * (1 + 1e-6))).any()):
            raise InvalidValueError(f"t must lie in [t_min, T] = [{lo}, {hi}], got range [{float(t.min())}, {float(t.max())}]")
        c_skip, c_out = consistency_scalings(self.sde, t, self.sigma_data)
        x0_hat = score_to_x0(self.model(x, t), x, self.sde.alpha(t), self.sde.sigma(t))
        out = expand_like(c_skip, x) * x + expand_like(c_out, x) * x0_hat
        return torch.where(expand_like(t == lo, x), x, out)


def consistency_times(sde: LinearSDE, n_steps: int, rho: float = 7.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Grid t_min = t_0 < ... < t_N = T, uniform in s^{1/rho}, s = sigma / alpha (CM eq. 5 / EDM):
    the samplers' "edm" grid in increasing order; the end points are exact."""
    return time_grid(sde, n_steps, "edm", rho=rho, dtype=dtype).flip(0)


def multistep_times(sde: LinearSDE, steps: int, rho: float = 7.0) -> Tensor:
    """Default times T = tau_1 > ... > tau_steps > t_min for multistep sampling: the first
    `steps` points of the `consistency_times(sde, steps)` grid, from T down."""
    return consistency_times(sde, steps, rho).flip(0)[:steps]


@torch.no_grad()
def consistency_sample(model: Callable[[Tensor, Tensor], Tensor], sde: LinearSDE, x_T: Tensor,
                       times: Tensor | None = None, steps: int = 1, generator: torch.Generator | None = None,
                       callback: Callable[[int, Tensor, Tensor], None] | None = None) -> Tensor:
    """One-step (x = f(x_T, T)) and multistep consistency sampling (CM Algorithm 1).

    Between steps the sample is renoised exactly from t_min to tau: for a linear SDE
    X_tau | X_{t_min} = x ~ N(alpha(tau) (x / alpha(t_min)), alpha(tau)^2 (s(tau)^2 - s_min^2) I).
    `times` (decreasing, first = T, all > t_min) defaults to `multistep_times(sde, steps)`;
    `callback(i, tau_i, x)` sees each denoised iterate. Costs len(times) model calls.
    """
    times = multistep_times(sde, steps) if times is None else as_time(times)
    if times.dim() != 1 or len(times) < 1:
        raise InvalidValueError("times must be a non-empty 1-D sequence")
    if not (bool((times[1:] < times[:-1]).all()) and float(times[-1]) > sde.t_min and float(times[0]) <= sde.T):
        raise InvalidValueError(f"times must decrease within (t_min, T] = ({sde.t_min}, {sde.T}]")
    times = times.to(x_T)
    t_min = as_time(sde.t_min, x_T)
    a_min, s_min = sde.alpha(t_min), effective_sigma(sde, t_min)
    x = model(x_T, batch_time(times[0], x_T))
    if callback is not None:
        callback(0, times[0], x)
    for i, tau in enumerate(times[1:], start=1):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_tau = sde.alpha(tau) * (x / a_min + torch.sqrt(effective_sigma(sde, tau) ** 2 - s_min**2) * z)
        x = model(x_tau, batch_time(tau, x))
        if callback is not None:
            callback(i, tau, x)
    return x


def consistency_method(sde: LinearSDE, model: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, ts: Tensor, *,
                        denoise: bool, callback=None, generator: torch.Generator | None = None) -> Tensor:
    """`sampling.sample(..., method="consistency", nfe=k)` (no denoise: `Method.denoise`): k consistency steps at
    the first k times of the grid (default "edm"). `model` is a ConsistencyModel, any consistency
    function f(x, t), or an x0-parametrised ScoreModel (a consistency run's checkpoint), wrapped here."""
    if denoise:
        raise InvalidValueError("method 'consistency' has no final denoising step (every step is one): drop denoise=True")
    if isinstance(model, ScoreModel):
        if model.parametrization != "x0":
            raise InvalidValueError(f"a ScoreModel is read as a consistency model only with parametrization 'x0', "
                             f"got {model.parametrization!r}")
        model = ConsistencyModel(model, sde, model.sigma_data)
    return consistency_sample(model, sde, x_T, times=ts[:-1], generator=generator, callback=callback)
