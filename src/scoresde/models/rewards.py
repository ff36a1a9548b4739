"""Terminal rewards r(x) -> (batch,) for alignment (DESIGN section 9).

Every reward is a plain callable on a batch x of shape (batch, ...). The likelihood-ratio methods
(`alignment.finetune`, `ddpo`, `dpok`) never differentiate it; adjoint matching and DRaFT need its
gradient in x: every reward here is built from differentiable torch operations (autograd gives it),
and `value_and_grad` / `differentiable` raise a clear error for a reward that has none.
`REWARDS` maps CLI names to factories.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.registry import Registry
from ..core.validate import check, positive

Reward = Callable[[Tensor], Tensor]

__all__ = ["Reward", "linear", "neg_distance", "region_mass", "class_log_prob", "ink", "REWARDS", "differentiable",
           "value_and_grad"]

REWARDS: "Registry[Callable[..., Reward]]" = Registry("reward")


def _vector(name: str, v, dim: int | None = None) -> Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    if v.dim() != 1 or (dim is not None and v.numel() != dim) or not torch.isfinite(v).all():
        raise InvalidValueError(f"{name} must be a finite 1-D vector{'' if dim is None else f' of length {dim}'}, got shape {tuple(v.shape)}")
    return v


@REWARDS.register("linear")
def linear(c) -> Reward:
    """r(x) = c^T x (x flattened); the reward with a closed-form tilt (DESIGN 9)."""
    c = _vector("c", c)

    def reward(x: Tensor) -> Tensor:
        return x.flatten(1) @ c.to(x)

    return reward


@REWARDS.register("distance")
def neg_distance(points) -> Reward:
    """r(x) = -min_k |x - p_k|: minus the distance to a point (shape (d,)) or a finite set (shape (K, d))."""
    p = torch.as_tensor(points, dtype=torch.float64)
    p = p[None] if p.dim() == 1 else p
    if p.dim() != 2 or not torch.isfinite(p).all():
        raise InvalidValueError(f"points must be a finite point (d,) or set (K, d), got shape {tuple(p.shape)}")

    def reward(x: Tensor) -> Tensor:
        return -torch.cdist(x.flatten(1), p.to(x)).min(dim=1).values

    return reward


@REWARDS.register("region")
def region_mass(low, high, sharpness: float = 10.0) -> Reward:
    """Smooth indicator of the box [low, high]: prod_i sigmoid(k (x_i - low_i)) sigmoid(k (high_i - x_i)).

    Its mean under a law is the (smoothed) mass that law puts in the box; k = sharpness.
    """
    low, high = _vector("low", low), _vector("high", high)
    if low.shape != high.shape or not (low < high).all():
        raise InvalidValueError(f"need low < high elementwise with equal lengths, got {low.tolist()} and {high.tolist()}")
    positive("sharpness", sharpness)

    def reward(x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != low.numel():
            raise InvalidValueError(f"x must have {low.numel()} coordinates, got {x.shape[1]}")
        lo, hi = low.to(x), high.to(x)
        return (torch.sigmoid(sharpness * (x - lo)) * torch.sigmoid(sharpness * (hi - x))).prod(1)

    return reward


@REWARDS.register("class")
def class_log_prob(classifier: Callable[[Tensor], Tensor], label: int) -> Reward:
    """r(x) = log p(y = label | x) = log_softmax(classifier(x))[:, label]; classifier returns logits (batch, K)."""
    if not callable(classifier):
        raise InvalidValueError("classifier must be a callable x -> logits of shape (batch, n_classes)")
    if int(label) != label or label < 0:
        raise InvalidValueError(f"label must be an integer >= 0, got {label}")

    def reward(x: Tensor) -> Tensor:
        logits = classifier(x)
        if logits.dim() != 2 or not label < logits.shape[1]:
            raise InvalidValueError(f"classifier must return logits (batch, K) with K > label = {label}, got {tuple(logits.shape)}")
        return torch.log_softmax(logits, dim=1)[:, int(label)]

    return reward


@REWARDS.register("ink")
def ink(threshold: float = 0.0, sharpness: float = 5.0) -> Reward:
    """Mean stroke intensity: the smooth share of pixels above `threshold`, mean_i sigmoid(k (x_i - threshold)),
    k = sharpness; a non-class image reward with a gradient everywhere."""
    check("threshold", threshold, isinstance(threshold, (int, float)) and math.isfinite(threshold), "a finite number")
    positive("sharpness", sharpness)

    def reward(x: Tensor) -> Tensor:
        return torch.sigmoid(sharpness * (x.flatten(1) - threshold)).mean(1)

    return reward


def differentiable(reward: Reward, x: Tensor, method: str) -> Tensor:
    """r(x) (batch,) with its autograd graph (x must require grad); a clear error naming `method` when the
    reward returns no gradient or the wrong shape."""
    with torch.enable_grad():
        r = reward(x)
    if r.shape != x.shape[:1]:
        raise InvalidValueError(f"reward must return shape ({x.shape[0]},), got {tuple(r.shape)}")
    if not r.requires_grad:
        raise InvalidValueError(f"method {method!r} needs the reward's gradient in x, but this reward returns no "
                                "gradient: build it from differentiable torch operations (rewards.linear, neg_distance, "
                                "region_mass, class_log_prob, ink are) or use a likelihood-ratio method (pg, dpok, ddpo)")
    return r


def value_and_grad(reward: Reward, x: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """(r(x), grad_x r(x)) by autograd, both detached; errors as `differentiable`."""
    x = x.detach().requires_grad_(True)
    r = differentiable(reward, x, method)
    (grad,) = torch.autograd.grad(r.sum(), x)
    return r.detach().to(x.dtype), grad


def parse_reward(name: str, params: dict[str, str] | list[str]) -> Reward:
    """A reward from `rewards.REWARDS` with CLI-style string parameters (a dict or "key=value" strings):
    numbers and comma-separated vectors, points of a set separated by ';' (c=1,0 points=0,1;1,0 sharpness=5)."""
    if not isinstance(params, dict):
        bad = [p for p in params if "=" not in p]
        check("reward parameters", bad, not bad, "key=value strings")
        params = dict(p.split("=", 1) for p in params)

    def value(s: str):
        rows = [[float(v) for v in row.split(",")] for row in s.split(";")]
        return rows if ";" in s else rows[0] if "," in s else rows[0][0]

    try:
        factory = REWARDS[name]
    except KeyError as err:
        raise InvalidValueError(f"reward: {err.args[0]}") from None
    try:
        parsed = {k: value(v) for k, v in params.items()}
    except ValueError:
        raise InvalidValueError(f"reward parameters must be numbers or comma/semicolon-separated numbers, got {params}") from None
    try:
        return factory(**parsed)
    except TypeError as err:
        raise InvalidValueError(f"reward {name!r}: {err}") from None
