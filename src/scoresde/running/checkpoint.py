"""Checkpoints as one safetensors file: no pickle anywhere, written atomically.

Layout of the tensors: `model/<name>` (weights), `ema/<name>` (EMA weights), `optim/<i>/<key>`
(per-parameter optimiser state), `rng/<name>` (generator states as uint8 tensors). The
safetensors metadata (strings) holds the step, the EMA's update count (its warm-up schedule's
position), the optimiser's param_groups, the fp16 GradScaler's state and any non-tensor state as JSON. The file is written to a temporary name and renamed over the old one
(`config.atomic_write`), so a run killed at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..core.errors import InvalidValueError, MissingFileError
from ..learning.networks import EMA
from .files import atomic_write

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint", "read_checkpoint", "checkpoint_weights"]

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "scoresde-checkpoint-1"


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


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, step: int, ema: EMA | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None,
                    extra: dict[str, Any] | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    """Write model (+ EMA, optimiser, generator states, torch's global CPU RNG, an enabled GradScaler) at
    `step` atomically.

    `extra` is any JSON-serialisable dict, returned by `load_checkpoint`.
    """
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
    atomic_write(path, st_save(tensors, metadata=meta))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a checkpoint file (no objects are unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint at {str(path)!r}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise InvalidValueError(f"{path} is not a scoresde checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    return tensors, meta


def checkpoint_weights(path: str | os.PathLike, which: str = "ema") -> dict[str, Tensor]:
    """The model's state dict from a checkpoint: its EMA weights ("ema") or raw weights ("model")."""
    if which not in ("ema", "model"):
        raise InvalidValueError(f"which must be 'ema' or 'model', got {which!r}")
    tensors, _ = read_checkpoint(path)
    weights = _strip(which, tensors)
    if not weights:
        raise InvalidValueError(f"{path} holds no {which!r} weights")
    return weights


def _load_module(model: nn.Module, state: dict[str, Tensor], path) -> None:
    own = model.state_dict()
    missing, extra = own.keys() - state.keys(), state.keys() - own.keys()
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or extra or bad:
        raise InvalidValueError(f"checkpoint {path} does not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(extra)}, shape mismatch {sorted(bad)}")
    model.load_state_dict(state)


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, ema: EMA | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None,
                    restore_global_rng: bool = True,
                    scaler: torch.amp.GradScaler | None = None) -> tuple[int, dict[str, Any]]:
    """Restore what `save_checkpoint` wrote into the given objects; returns (step, extra). A checkpoint
    written before EMA update counts were saved (a constant decay) counts one update per step."""
    tensors, meta = read_checkpoint(path)
    _load_module(model, _strip("model", tensors), path)
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
