"""Writing files so that nothing is lost: every output is written to a temporary file beside its target,
fsynced and renamed over it, so a reader (or a resumed run) sees the old file or the new one, never a
partial one. `check_writable` lets a command refuse an unwritable output before it computes anything;
a failed write raises `OutputError` naming the file and leaves the previous file as it was."""
from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..core.errors import InvalidValueError, OutputError, describe_os_error

__all__ = ["atomic_write", "append_line", "check_writable", "save_array", "save_json", "save_text"]

ARRAY_SUFFIXES = (".npy", ".npz")


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder, fsync, then os.replace: readers see
    the old file or the new one, never a partial one. An OSError (disk full, folder not writable)
    becomes an `OutputError` naming `path`; no temporary file is left behind."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise _output_error(err, describe_os_error(err, path)) from err
        raise


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` and a newline to a log file (created with its folder). An OSError becomes an OutputError
    naming `path`; a line cut short by a full disk or a kill is for the reader to skip."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as err:
        raise _output_error(err, describe_os_error(err, path)) from err


def _output_error(err: OSError, message: str) -> OutputError:
    """An OutputError with `message` (str() is the message alone) that keeps the errno of `err`."""
    out = OutputError(message)
    out.errno = err.errno
    return out


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(path: str | os.PathLike, *, suffixes: Sequence[str] = (), name: str = "output") -> Path:
    """Refuse, before any computation, an output `path` that cannot be written: a suffix outside
    `suffixes` (when given; InvalidValueError naming `name`), a folder, or a folder that neither exists
    nor can be created, or is not writable (OutputError naming the path). Tries a temporary file in the
    folder (or its nearest existing parent, so nothing is created) and removes it. Returns the path."""
    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise InvalidValueError(f"{name} must end in {', '.join(suffixes)}, got {str(path)!r}")
    if path.is_dir():
        raise OutputError(f"{name} {str(path)!r} is a folder, not a file")
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise OutputError(f"{name} {str(path)!r}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"{name} {str(path)!r} is not writable (folder {str(folder)!r}: permission denied)")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".check")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise _output_error(err, f"{name} {str(path)!r}: {describe_os_error(err, folder)}") from err
    return path


def save_array(path: str | os.PathLike, x: Tensor | np.ndarray) -> Path:
    """`x` as .npy (np.save) or .npz (np.savez: one array, key arr_0), written atomically."""
    path = Path(path)
    if path.suffix not in ARRAY_SUFFIXES:
        raise InvalidValueError(f"an array file must end in {', '.join(ARRAY_SUFFIXES)}, got {str(path)!r}")
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    buf = io.BytesIO()
    (np.save if path.suffix == ".npy" else np.savez)(buf, a)
    atomic_write(path, buf.getvalue())
    return path


def save_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """`obj` as indented JSON with a final newline, written atomically."""
    return save_text(path, json.dumps(obj, indent=indent) + "\n")


def save_text(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8), written atomically."""
    atomic_write(path, text.encode())
    return Path(path)
