"""Validation helpers shared by every layer: one place for the checks and messages of bad input.

Every helper raises ValueError "<name> must be <what is allowed>, got <value>" and returns the
value in its checked form (an int, a float, the choice, the tensor).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
from torch import Tensor

from .errors import InvalidValueError

__all__ = ["batch_tensor", "check", "construct", "integer", "moments", "number", "one_of", "positive"]

C = TypeVar("C")


def check(name: str, value: Any, ok: bool, allowed: str) -> None:
    """ValueError "<name> must be <allowed>, got <value>" unless ok."""
    if not ok:
        raise InvalidValueError(f"{name} must be {allowed}, got {value!r}")


def integer(name: str, value: Any, low: int = 1) -> int:
    """An int (not a bool) >= low."""
    check(name, value, isinstance(value, int) and not isinstance(value, bool) and value >= low,
          f"an integer >= {low}")
    return value


def number(name: str, value: Any, low: float | None = None, *, strict: bool = True) -> float:
    """A finite real number (not a bool), > low (strict) or >= low when low is given; returned as float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
    check(name, value, ok, f"a finite number{bound}")
    return float(value)


def positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    return number(name, value, 0)


def one_of(name: str, value: C, choices: Iterable[C]) -> C:
    """One of `choices`; the message lists them."""
    choices = tuple(choices)
    check(name, value, value in choices, "one of " + ", ".join(repr(c) for c in choices))
    return value


def batch_tensor(name: str, x: Any, *, finite: bool = True) -> Tensor:
    """A non-empty floating tensor of shape (batch, ...), at least 2-D; finite unless finite=False (which
    spares a device synchronisation in training losses)."""
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2):
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise InvalidValueError(f"{name} must be a floating tensor of shape (batch, ...) with at least 2 dims, got {got}")
    check(name, f"shape {tuple(x.shape)}", x.numel() > 0, "non-empty")
    if finite and not bool(x.isfinite().all()):
        raise InvalidValueError(f"{name} must be finite, got non-finite values")
    return x


def moments(name: str, mean: Any, cov: Any, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian's (mean (d,), covariance (d, d)) as float64 arrays, finite, the covariance symmetric
    (to rounding; returned symmetrised) and of dimension `dim` when given."""
    m, C = (np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v, dtype=np.float64) for v in (mean, cov))
    m, C = np.atleast_1d(m), np.atleast_2d(C)
    d = m.shape[0]
    if m.ndim != 1 or C.shape != (d, d):
        raise InvalidValueError(f"{name}: mean must have shape (d,) and covariance (d, d), got {m.shape} and {C.shape}")
    check(f"{name}: the dimension", d, dim is None or d == dim, f"{dim}")
    if not (np.isfinite(m).all() and np.isfinite(C).all()):
        raise InvalidValueError(f"{name}: mean and covariance must be finite")
    if not np.allclose(C, C.T, rtol=1e-8, atol=1e-12 * max(1.0, np.abs(C).max())):
        raise InvalidValueError(f"{name}: covariance must be symmetric")
    return m, 0.5 * (C + C.T)


def construct(factory: Callable, kwargs: dict[str, Any], what: str, **fixed: Any):
    """factory(**fixed, **kwargs); an unknown keyword raises a ValueError listing the valid ones."""
    params = inspect.signature(factory).parameters
    valid = [p for p in params if p not in fixed and p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise InvalidValueError(f"unknown {what}: {', '.join(unknown)}; valid: {', '.join(valid)}")
    return factory(**fixed, **kwargs)
