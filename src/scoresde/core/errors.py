"""The errors scoresde raises on purpose: one base class, so a caller (and the CLI's error boundary) can
tell an expected failure (a bad value, a missing or damaged file, an unwritable output, a stopped run)
from a bug. Each subclasses the built-in exception a Python user would expect, so `except ValueError`
and `except FileNotFoundError` keep working."""
from __future__ import annotations

__all__ = ["ScoresdeError", "InvalidValueError", "MissingFileError", "DamagedFileError", "OutputError"]


class ScoresdeError(Exception):
    """Base of every error scoresde raises on purpose; its message names the parameter or file and what
    is allowed."""


class InvalidValueError(ScoresdeError, ValueError):
    """A parameter, config value, shape or data set that is not allowed."""


class MissingFileError(ScoresdeError, FileNotFoundError):
    """A file or folder that should exist does not."""


class DamagedFileError(InvalidValueError):
    """A file exists but is not what it should be: truncated, corrupt, or written by something else."""


class OutputError(ScoresdeError, OSError):
    """An output cannot be written: the folder is not writable, or the disk is full."""
