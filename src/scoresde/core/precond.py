"""The one place where score, eps and x0 (data) predictions convert, and network preconditioning.

For a linear SDE, x_t = alpha x0 + sigma z with z ~ N(0, I) (DESIGN section 2), so

    score = -E[z | x_t] / sigma                     (eps parametrisation, T 4.12)
          = (alpha E[x0 | x_t] - x_t) / sigma^2     (Tweedie; the VP form T 7.7)

`ScoreModel` wraps a network `net(x, c)` (c a per-sample conditioning scalar) so that its
forward always returns the score, whatever the network predicts. Input scaling generalises
EDM (Karras et al. 2206.00364, Table 1) from alpha = 1 to any (alpha, sigma): x_t / alpha is
a VE variable with noise level sigma / alpha, so every EDM coefficient carries over and the
network's input has unit second moment for VP, VE and contractive SDEs alike when the data's mean
square per coordinate is sigma_data^2 (docs/math/reversal.md).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import InvalidValueError
from .sde import SDE, LinearSDE, TimeLike, as_time, batch_time, expand_like
from .validate import one_of, positive

__all__ = [
    "eps_to_score", "score_to_eps", "x0_to_score", "score_to_x0", "eps_to_x0", "x0_to_eps",
    "convert", "edm_scalings", "ScoreModel", "PARAMETRIZATIONS", "KINDS", "C_NOISE",
]

KINDS = ("score", "eps", "x0")
PARAMETRIZATIONS = ("score", "eps", "x0", "vp_skip", "edm")
C_NOISE = ("log_sigma", "time")


def _coef(v: TimeLike, x: Tensor) -> Tensor:
    return expand_like(as_time(v, x), x)


def eps_to_score(eps: Tensor, sigma: TimeLike) -> Tensor:
    """s = -eps / sigma (T 4.12)."""
    return -eps / _coef(sigma, eps)


def score_to_eps(score: Tensor, sigma: TimeLike) -> Tensor:
    """eps = -sigma s."""
    return -_coef(sigma, score) * score


def x0_to_score(x0_hat: Tensor, x: Tensor, alpha: TimeLike, sigma: TimeLike) -> Tensor:
    """s = (alpha x0_hat - x) / sigma^2 (T 7.7)."""
    return (_coef(alpha, x) * x0_hat - x) / _coef(sigma, x) ** 2


def score_to_x0(score: Tensor, x: Tensor, alpha: TimeLike, sigma: TimeLike) -> Tensor:
    """Tweedie's formula: E[x0 | x_t = x] = (x + sigma^2 s) / alpha."""
    return (x + _coef(sigma, x) ** 2 * score) / _coef(alpha, x)


def eps_to_x0(eps: Tensor, x: Tensor, alpha: TimeLike, sigma: TimeLike) -> Tensor:
    """x0 = (x - sigma eps) / alpha."""
    return (x - _coef(sigma, x) * eps) / _coef(alpha, x)


def x0_to_eps(x0_hat: Tensor, x: Tensor, alpha: TimeLike, sigma: TimeLike) -> Tensor:
    """eps = (x - alpha x0) / sigma."""
    return (x - _coef(alpha, x) * x0_hat) / _coef(sigma, x)


def convert(value: Tensor, src: str, dst: str, x: Tensor, alpha: TimeLike, sigma: TimeLike) -> Tensor:
    """Convert a prediction of kind `src` to kind `dst`, both in KINDS, at x_t = x."""
    one_of("src", src, KINDS)
    one_of("dst", dst, KINDS)
    if src == dst:
        return value
    if (src, dst) == ("eps", "x0"):
        return eps_to_x0(value, x, alpha, sigma)
    if (src, dst) == ("x0", "eps"):
        return x0_to_eps(value, x, alpha, sigma)
    score = eps_to_score(value, sigma) if src == "eps" else x0_to_score(value, x, alpha, sigma) if src == "x0" else value
    return score_to_eps(score, sigma) if dst == "eps" else score_to_x0(score, x, alpha, sigma) if dst == "x0" else score


def edm_scalings(alpha: Tensor, sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) with x0_hat = c_skip x + c_out F(c_in x, c_noise).

    EDM (2206.00364, Table 1) applied to x / alpha at noise level s = sigma / alpha, written in x:
    c_skip = alpha sd^2 / (sigma^2 + alpha^2 sd^2), c_out = sigma sd / sqrt(sigma^2 + alpha^2 sd^2),
    c_in = 1 / sqrt(sigma^2 + alpha^2 sd^2), c_noise = log(sigma / alpha) / 4. For alpha = 1 these
    are Table 1's. c_in x and the training target of F have unit second moment when E x0^2 = sd^2 per
    coordinate (for centred data: std sd)."""
    positive("sigma_data", sigma_data)
    norm2 = sigma**2 + alpha**2 * sigma_data**2
    c_in = torch.rsqrt(norm2)
    return alpha * sigma_data**2 / norm2, sigma * sigma_data * c_in, c_in, 0.25 * (sigma.log() - alpha.log())


class ScoreModel(nn.Module):
    """A network wrapped so that forward(x, t) returns the score grad log p_t(x).

    parametrization (what `net(x_in, c)` predicts; c_in, c_noise from `edm_scalings`):
      "score":   s = net(x, t); needs no (alpha, sigma), so it also serves Langevin.
      "eps":     s = -net(c_in x, c_noise) / sigma                          (T 4.12)
      "x0":      s = (alpha net(c_in x, c_noise) - x) / sigma^2             (T 7.7)
      "vp_skip": s = -x / sigma^2 + alpha net(x, t) / sigma^2, the VP shortcut form (T 7.8)
                 taken literally: raw x and t in, x0 out (the x0 form without input scaling).
      "edm":     x0 = c_skip x + c_out net(c_in x, c_noise), s from x0      (2206.00364 Table 1)

    c_noise (the network's conditioning scalar in the eps, x0 and edm forms):
      "log_sigma": log(sigma / alpha) / 4, EDM's on the VE variable x / alpha (`edm_scalings`);
      "time":      t itself, as Song et al. 2011.13456 and DDPM (its timestep / N for VP).
    """

    def __init__(self, net: nn.Module, sde: SDE, parametrization: str = "eps", sigma_data: float = 0.5,
                 c_noise: str = "log_sigma"):
        super().__init__()
        one_of("parametrization", parametrization, PARAMETRIZATIONS)
        one_of("c_noise", c_noise, C_NOISE)
        if parametrization != "score" and not isinstance(sde, LinearSDE):
            raise InvalidValueError(f"parametrization {parametrization!r} needs a linear SDE with (alpha, sigma); "
                             f"{type(sde).__name__} supports only 'score'")
        positive("sigma_data", sigma_data)
        self.net = net
        self.sde = sde
        self.parametrization = parametrization
        self.sigma_data = float(sigma_data)
        self.c_noise = c_noise

    @property
    def native_kind(self) -> str:
        """Which of KINDS `predict` computes without conversion."""
        return {"score": "score", "eps": "eps"}.get(self.parametrization, "x0")

    def _net(self, x: Tensor, c: Tensor, y: Tensor | None) -> Tensor:
        return self.net(x, c) if y is None else self.net(x, c, y)

    def predict(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The network's prediction of kind `native_kind`, with alpha(t) and sigma(t) (None for 'score').
        Labels y (class-conditional networks, `networks`) pass through to the network."""
        t = batch_time(t, x)
        p = self.parametrization
        if p == "score":
            return self._net(x, t, y), None, None
        alpha, sigma = self.sde.alpha(t), self.sde.sigma(t)
        if p == "vp_skip":
            return self._net(x, t, y), alpha, sigma
        c_skip, c_out, c_in, c_noise = edm_scalings(alpha, sigma, self.sigma_data)
        out = self._net(expand_like(c_in, x) * x, t if self.c_noise == "time" else c_noise, y)
        if p == "edm":
            out = expand_like(c_skip, x) * x + expand_like(c_out, x) * out
        return out, alpha, sigma

    def output(self, x: Tensor, t: TimeLike, kind: str = "score", y: Tensor | None = None) -> Tensor:
        """The model's prediction as `kind` in KINDS (score, eps or x0)."""
        value, alpha, sigma = self.predict(x, t, y)
        if alpha is None and kind != "score":
            alpha, sigma = self.sde.alpha(batch_time(t, x)), self.sde.sigma(batch_time(t, x))
        return convert(value, self.native_kind, kind, x, alpha, sigma)

    def forward(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
        """The score; with labels y (class-conditional nets) the conditional score, y=None the unconditional one."""
        return self.output(x, t, "score", y)
