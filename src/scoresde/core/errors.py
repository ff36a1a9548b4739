"""The errors scoresde raises on purpose: one base class, so a caller (and the CLI's error boundary) can
tell an expected failure (a bad value, a missing or damaged file, an unwritable output, a stopped run)
from a bug. Each subclasses the built-in exception a Python user would expect, so `except ValueError`,
`except FileNotFoundError`, `except OSError` and `except ArithmeticError` keep working."""
from __future__ import annotations

import errno
import os

__all__ = [
    "BudgetExhaustedError",
    "DamagedFileError",
    "InvalidValueError",
    "MissingFileError",
    "MissingPackageError",
    "NonFiniteError",
    "OutputError",
    "ScoresdeError",
    "describe_os_error",
]


class ScoresdeError(Exception):
    """Base of every error scoresde raises on purpose; its message names the parameter or file and what
    is allowed."""


class InvalidValueError(ScoresdeError, ValueError):
    """A parameter, config value, shape or data set that is not allowed."""


class MissingFileError(ScoresdeError, FileNotFoundError):
    """A file or folder that should exist does not."""


class DamagedFileError(InvalidValueError):
    """A file exists but is not what it should be: truncated, corrupt, or written by something else."""


class BudgetExhaustedError(ScoresdeError, RuntimeError):
    """A method with adaptive steps needed more score evaluations than its budget `nfe` allows."""


class MissingPackageError(ScoresdeError, ImportError):
    """A package that a feature needs is not installed."""


class OutputError(ScoresdeError, OSError):
    """An output cannot be written: the folder is not writable, or the disk is full."""


class NonFiniteError(ScoresdeError, ArithmeticError):
    """A computation produced NaN or infinite values (a score returning NaN/inf, an unstable step)."""


_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def describe_os_error(err: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OSError from a file: "disk full writing P", "P is not writable (...)", else
    "<strerror>: P"; `path` defaults to the error's filename."""
    path = path if path is not None else err.filename
    where = f"{str(path)!r}" if path is not None else "a file"
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        return f"disk full writing {where} ({reason})"
    if err.errno in _NOT_WRITABLE:
        return f"{where} is not writable ({reason})"
    return f"{reason}: {where}"
