"""Checkpoints as one safetensors file: no pickle anywhere, the last two kept, damage detected.

Layout of the tensors: `model/<name>` (weights), `ema/<name>` (EMA weights), `optim/<i>/<key>`
(per-parameter optimiser state), `rng/<name>` (generator states as uint8 tensors). The safetensors
metadata (strings) holds the step, the EMA's update count (its warm-up schedule's position), the
optimiser's param_groups, the fp16 GradScaler's state, any non-tensor state as JSON and a CRC-32 over
the metadata, every tensor's name, dtype, shape and bytes (`checksum`, "crc32:<8 hex digits>"; 0.14 s
per 320 MB, a 20M-parameter model with EMA and AdamW state, on one CPU core: 8% of the save).

Keeping two: `save_checkpoint(path)` writes the new file to a staging name beside `path` (temporary
file, fsync, rename: `files.atomic_write`), then renames `path` to `previous_checkpoint(path)` and the
staged file to `path`, then fsyncs the folder. Killed (SIGKILL) at any instant, a save leaves the last
completed checkpoint intact: before the renames as `path` (the new file only staged), between them as
the previous one (`path` missing), after them the new file as `path` and that one as the previous one.
`path` becomes the previous one only if it is structurally sound (header, size, format): a damaged
`path` is overwritten and the previous one kept.

Reading (`load_checkpoint`, `load_weights`, `read_checkpoint`, `checkpoint_weights`) checks the header,
the file's size against the header's and the checksum (files written before checksums existed are not
verified), and uses the newest intact one of `path` and its previous one. Falling back is announced
with one `warnings.warn` line (a UserWarning): "checkpoint X is damaged (reason); using the previous
one Y (step N)". Neither intact: `DamagedFileError` naming both; neither present: `MissingFileError`.
"""
from __future__ import annotations

import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..core.errors import (
    DamagedFileError,
    InvalidValueError,
    MissingFileError,
    OutputError,
)
from ..learning.networks import EMA
from .files import atomic_write

__all__ = ["CHECKPOINT", "checkpoint_weights", "has_checkpoint", "load_checkpoint", "load_weights",
           "previous_checkpoint", "read_checkpoint", "remove_checkpoints", "save_checkpoint"]

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "scoresde-checkpoint-1"


class _Damaged(Exception):
    """Why one file is not an intact checkpoint (internal: turned into DamagedFileError naming the files)."""


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """The previous checkpoint kept beside `path`: `checkpoint.safetensors` -> `checkpoint.prev.safetensors`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _staging(path: Path) -> Path:
    return path.with_name(f".{path.name}.new")


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` or its previous checkpoint exists (intact or not: reading tells)."""
    return Path(path).exists() or previous_checkpoint(path).exists()


def remove_checkpoints(path: str | os.PathLike) -> None:
    """Delete `path`, its previous checkpoint and what an interrupted save left beside them."""
    path = Path(path)
    for p in (path, previous_checkpoint(path), _staging(path), *_debris(path)):
        p.unlink(missing_ok=True)


def _debris(path: Path) -> list[Path]:
    """The temporary files that saves of `path` killed mid-write left (`files.atomic_write` names them
    .<name>.<random>.tmp, for the checkpoint and for its staged copy)."""
    if not path.parent.is_dir():
        return []
    return [p for name in (path.name, _staging(path).name) for p in path.parent.glob(f".{name}.*.tmp")]


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}/{k}": v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _strip(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    p = prefix + "/"
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def _optim_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{i}/{key}"] = value
            else:
                scalars[f"{i}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_join(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        i, key = flat.split("/", 1)
        state.setdefault(int(i), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _checksum(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """CRC-32 of the metadata (less the checksum) and, in name order, each tensor's name, dtype, shape and
    bytes: independent of where safetensors places the tensors in the file."""
    crc = zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"crc32:{crc:08x}"


def _sync_folder(folder: Path) -> None:
    """fsync a folder so that renames in it survive a power cut; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # file systems that refuse to sync a folder
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, step: int, ema: EMA | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None,
                    extra: dict[str, Any] | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    """Write model (+ EMA, optimiser, generator states, torch's global CPU RNG, an enabled GradScaler) at
    `step`, keeping the checkpoint it replaces as `previous_checkpoint(path)` (module docstring).

    `extra` is any JSON-serialisable dict, returned by `load_checkpoint`; its "net" and "net_args" (the
    Trainer's) name the differences when the weights later do not fit a model.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write a checkpoint to {str(path)!r}: it is a folder")
    tensors = _prefixed("model", model.state_dict())
    meta: dict[str, str] = {"format": FORMAT, "step": str(int(step)), "extra": json.dumps(extra or {})}
    if ema is not None:
        tensors.update(_prefixed("ema", ema.state_dict()))
        meta["ema"] = json.dumps({"updates": ema.updates})
    if optimizer is not None:
        opt_tensors, opt_meta = _optim_split(optimizer)
        tensors.update(_prefixed("optim", opt_tensors))
        meta["optim"] = json.dumps(opt_meta)
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = json.dumps(scaler.state_dict())
    rng = {f"gen/{name}": g.get_state() for name, g in (generators or {}).items()}
    rng["torch_cpu"] = torch.get_rng_state()
    tensors.update(_prefixed("rng", rng))
    meta["checksum"] = _checksum(tensors, meta)
    staged = _staging(path)
    for stale in _debris(path):  # a save killed mid-write left it; this process is the only writer
        stale.unlink(missing_ok=True)
    atomic_write(staged, st_save(tensors, metadata=meta))
    try:
        _header(path)
    except (_Damaged, FileNotFoundError):  # missing or damaged: the previous one stays
        pass
    else:
        os.replace(path, previous_checkpoint(path))
    os.replace(staged, path)
    _sync_folder(path.parent)


def _header(path: Path) -> None:
    """Check the structure of `path` without reading the tensors: a safetensors header that parses, a size
    equal to the one the header describes, the scoresde format."""
    if path.is_dir():
        raise _Damaged("a folder, not a file")
    size = path.stat().st_size
    if size < 8:
        raise _Damaged("empty file" if size == 0 else f"{size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise _Damaged(f"not a safetensors file, or truncated in its header: the header length {n} "
                           f"exceeds the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
            expected = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                                   default=0)
            meta = header.get("__metadata__") or {}
            form = meta.get("format")
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise _Damaged(f"unparsable safetensors header ({type(e).__name__})") from None
    if size != expected:
        raise _Damaged(f"truncated: {size} bytes, the header describes {expected}" if size < expected
                       else f"{size - expected} bytes beyond the {expected} the header describes")
    if form != FORMAT:
        raise _Damaged(f"not a scoresde checkpoint: format {form!r}, expected {FORMAT!r}")


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of one file, verified (`_header`, safetensors' own checks, the checksum)."""
    _header(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise _Damaged(f"unreadable safetensors file ({str(e).splitlines()[0]})") from None
    stored = meta.get("checksum")
    if stored is not None and stored != (actual := _checksum(tensors, meta)):
        raise _Damaged(f"checksum mismatch: stored {stored}, the contents give {actual}")
    return tensors, meta


def _newest_intact(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str], Path]:
    """Tensors, metadata and file of the newest intact one of `path` and its previous checkpoint."""
    path = Path(path)
    prev = previous_checkpoint(path)
    if not path.exists() and not prev.exists():
        raise MissingFileError(f"no checkpoint at {str(path)!r}")
    problems = []
    for candidate in (path, prev):
        if not candidate.exists():
            problems.append(f"{candidate} is missing")
            continue
        try:
            tensors, meta = _read(candidate)
        except _Damaged as e:
            if not prev.exists():
                raise DamagedFileError(f"{path} is not a usable checkpoint: {e}") from None
            problems.append(f"{candidate} is damaged ({e})")
            continue
        if candidate == prev:
            warnings.warn(f"checkpoint {problems[0]}; using the previous one {prev} (step {meta.get('step')})",
                          stacklevel=3)
        return tensors, meta, candidate
    raise DamagedFileError(f"no intact checkpoint: {problems[0]}; {problems[1]}")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of the newest intact checkpoint of `path` and its previous one (no
    objects are unpickled)."""
    tensors, meta, _ = _newest_intact(path)
    return tensors, meta


def _check_which(which: str) -> None:
    if which not in ("ema", "model"):
        raise InvalidValueError(f"which must be 'ema' or 'model', got {which!r}")


def _weights(tensors: dict[str, Tensor], which: str, path: Path) -> dict[str, Tensor]:
    weights = _strip(which, tensors)
    if not weights:
        raise InvalidValueError(f"{path} holds no {which!r} weights")
    return weights


def checkpoint_weights(path: str | os.PathLike, which: str = "ema") -> dict[str, Tensor]:
    """The model's state dict from a checkpoint: its EMA weights ("ema") or raw weights ("model")."""
    _check_which(which)
    tensors, _, used = _newest_intact(path)
    return _weights(tensors, which, used)


def _few(items: list[str], k: int = 3) -> str:
    return ", ".join(items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")


def _config_diff(meta: dict[str, str], net: str | None, net_args: dict[str, Any] | None) -> list[str]:
    """The net / net_args entries that differ between the checkpoint's extra and the caller's."""
    saved = json.loads(meta.get("extra", "{}"))
    diffs = []
    if net is not None and saved.get("net") not in (None, net):
        diffs.append(f"net {saved['net']!r} vs {net!r}")
    if net_args is not None and isinstance(saved.get("net_args"), dict):
        own = json.loads(json.dumps(net_args))  # tuples become lists, as in the checkpoint
        for key in sorted(saved["net_args"].keys() | own.keys()):
            a, b = saved["net_args"].get(key, "unset"), own.get(key, "unset")
            if a != b:
                diffs.append(f"net_args.{key} {a} vs {b}")
    return diffs


def _load_module(model: nn.Module, state: dict[str, Tensor], path: Path, meta: dict[str, str],
                 net: str | None, net_args: dict[str, Any] | None) -> None:
    own = model.state_dict()
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    bad = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or extra or bad:
        parts = [f"{what} {_few(names)}" for what, names in (("missing", missing), ("unexpected", extra)) if names]
        if bad:
            parts.append("shape mismatch " + _few([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad]))
        diffs = _config_diff(meta, net, net_args)
        first = f"checkpoint {path} was saved from another network: {'; '.join(diffs)} (checkpoint vs model)\n" \
            if diffs else ""
        raise InvalidValueError(f"{first}checkpoint {path} does not match the model (checkpoint vs model): "
                                f"{'; '.join(parts)}")
    model.load_state_dict(state)


def load_weights(path: str | os.PathLike, model: nn.Module, which: str = "ema", *, net: str | None = None,
                 net_args: dict[str, Any] | None = None) -> int:
    """Load a checkpoint's EMA ("ema") or raw ("model") weights into `model`; returns the checkpoint's step.
    `net` / `net_args`: the config `model` was built from, named where it differs from the checkpoint's
    when the weights do not fit."""
    _check_which(which)
    tensors, meta, used = _newest_intact(path)
    _load_module(model, _weights(tensors, which, used), used, meta, net, net_args)
    return int(meta["step"])


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, ema: EMA | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None,
                    restore_global_rng: bool = True,
                    scaler: torch.amp.GradScaler | None = None, net: str | None = None,
                    net_args: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Restore what `save_checkpoint` wrote (the newest intact of `path` and its previous one) into the
    given objects; returns (step, extra). `net` / `net_args` as in `load_weights`. A checkpoint written
    before EMA update counts were saved (a constant decay) counts one update per step."""
    tensors, meta, path = _newest_intact(path)
    _load_module(model, _strip("model", tensors), path, meta, net, net_args)
    if ema is not None:
        ema.load_state_dict(_strip("ema", tensors))
        ema.updates = json.loads(meta["ema"])["updates"] if "ema" in meta else int(meta["step"])
    if scaler is not None and scaler.is_enabled():
        if "scaler" not in meta:
            raise InvalidValueError(f"{path} holds no GradScaler state (it was not trained with precision fp16)")
        scaler.load_state_dict(json.loads(meta["scaler"]))
    if optimizer is not None:
        if "optim" not in meta:
            raise InvalidValueError(f"{path} holds no optimiser state")
        optimizer.load_state_dict(_optim_join(_strip("optim", tensors), json.loads(meta["optim"])))
    rng = _strip("rng", tensors)
    for name, g in (generators or {}).items():
        if f"gen/{name}" not in rng:
            raise InvalidValueError(f"{path} holds no state for generator {name!r}")
        g.set_state(rng[f"gen/{name}"])
    if restore_global_rng:
        torch.set_rng_state(rng["torch_cpu"])
    return int(meta["step"]), json.loads(meta["extra"])
