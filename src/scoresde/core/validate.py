"""Validation helpers shared by every layer: one place for the checks and messages of bad input.

Every helper raises ValueError "<name> must be <what is allowed>, got <value>" and returns the
value in its checked form (an int, a float, the choice, the tensor).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from torch import Tensor

__all__ = ["check", "construct", "finite_tensor", "integer", "number", "one_of", "positive"]

C = TypeVar("C")


def check(name: str, value: Any, ok: bool, allowed: str) -> None:
    """ValueError "<name> must be <allowed>, got <value>" unless ok."""
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


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


def finite_tensor(name: str, x: Any) -> Tensor:
    """A non-empty finite floating tensor of shape (batch, ...), at least 2-D."""
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2):
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating tensor of shape (batch, ...) with at least 2 dims, got {got}")
    check(name, f"shape {tuple(x.shape)}", x.numel() > 0, "non-empty")
    if not bool(x.isfinite().all()):
        raise ValueError(f"{name} must be finite, got non-finite values")
    return x


def construct(factory: Callable, kwargs: dict[str, Any], what: str, **fixed: Any):
    """factory(**fixed, **kwargs); an unknown keyword raises a ValueError listing the valid ones."""
    params = inspect.signature(factory).parameters
    valid = [p for p in params if p not in fixed and p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)}; valid: {', '.join(valid)}")
    return factory(**fixed, **kwargs)
