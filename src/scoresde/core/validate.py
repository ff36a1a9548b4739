"""Validation helpers shared by every layer: one place for the checks and messages of bad input."""
from __future__ import annotations

import inspect
from typing import Any, Callable

__all__ = ["check", "construct"]


def check(name: str, value: Any, ok: bool, allowed: str) -> None:
    """ValueError "<name> must be <allowed>, got <value>" unless ok."""
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def construct(factory: Callable, kwargs: dict[str, Any], what: str, **fixed: Any):
    """factory(**fixed, **kwargs); an unknown keyword raises a ValueError listing the valid ones."""
    params = inspect.signature(factory).parameters
    valid = [p for p in params if p not in fixed and p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)}; valid: {', '.join(valid)}")
    return factory(**fixed, **kwargs)
