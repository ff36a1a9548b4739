"""A trained model for use elsewhere: its EMA weights alone (safetensors) and a small JSON to rebuild it.

`export_run(run, out)` writes `out/model.safetensors` (the EMA weights of the run's model, no optimiser
or generator state) and `out/model.json` (family, loss, network, SDE, parametrization, sample shape,
library version, the weights' SHA-256, the run's data record), each atomically, the JSON last. `load_model(out)` rebuilds the
model with the builders of `running.build` and loads the weights: one line to a score function.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .. import __version__
from ..core.errors import InvalidValueError, MissingFileError
from ..core.sde import SDE
from .build import build_model, build_sde
from .checkpoint import CHECKPOINT, has_checkpoint, load_weights
from .config import Config, load_config
from .data import load_config_data, read_data_record
from .files import atomic_write

__all__ = ["FORMAT", "SPEC", "WEIGHTS", "export_run", "load_model", "load_sde", "read_spec"]

WEIGHTS, SPEC, FORMAT = "model.safetensors", "model.json", "scoresde-model-1"
# the Config fields that rebuild the model and its SDE
FIELDS = ("model", "model_args", "loss", "net", "net_args", "sde", "sde_args", "parametrization", "sigma_data", "c_noise")


def export_run(run_dir: str | Path, out: str | Path) -> dict[str, Path]:
    """Write the EMA weights of the run in `run_dir` and the JSON that rebuilds its model into folder `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file() or not has_checkpoint(run_dir / CHECKPOINT):
        raise InvalidValueError(f"{str(run_dir)!r} is not a run folder (needs config.yaml and {CHECKPOINT})")
    cfg = load_config(run_dir / "config.yaml", [f"out={run_dir.parent}", f"name={run_dir.name}"])
    record = read_data_record(run_dir)  # None: a run written before runs recorded their data, trained on its config's
    shape = load_config_data(cfg).sample_shape if record is None else tuple(record["shape"])
    model = build_model(cfg, build_sde(cfg), shape)  # the weights are checked to fit the model `load_model` builds
    step = load_weights(run_dir / CHECKPOINT, model, "ema", net=cfg.net, net_args=cfg.net_args)
    blob = st_save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata={"format": FORMAT})
    spec: dict[str, Any] = {"format": FORMAT, "version": __version__, **{k: getattr(cfg, k) for k in FIELDS},
                            "sample_shape": list(shape), "step": step, "sampler": cfg.sampler, "nfe": cfg.nfe,
                            "sha256": hashlib.sha256(blob).hexdigest(), "data": record}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, blob)
    atomic_write(out / SPEC, (json.dumps(spec, indent=1) + "\n").encode())
    return {"weights": out / WEIGHTS, "spec": out / SPEC}


def read_spec(path: str | Path) -> dict[str, Any]:
    """The JSON of an exported model (`path`: its folder or the JSON file), checked for format and keys; its
    own location under "path"."""
    path = Path(path)
    spec_path = path / SPEC if path.is_dir() else path
    if not spec_path.is_file():
        raise MissingFileError(f"no exported model at {str(path)!r} (needs {SPEC} and {WEIGHTS}; see `scoresde export`)")
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidValueError(f"{spec_path} is not valid JSON ({e}); export the run again") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise InvalidValueError(f"{spec_path} is not a scoresde model description (format "
                         f"{spec.get('format') if isinstance(spec, dict) else None!r}, expected {FORMAT!r})")
    spec.setdefault("c_noise", "log_sigma")  # exported before the key existed: the only conditioning then
    missing = [k for k in (*FIELDS, "sample_shape", "sha256") if k not in spec]
    if missing:
        raise InvalidValueError(f"{spec_path} lacks {', '.join(missing)}; export the run again")
    spec["path"] = spec_path
    return spec


def _config(spec: dict[str, Any]) -> Config:
    return Config(**{k: spec[k] for k in FIELDS})


def load_sde(path: str | Path) -> SDE:
    """The SDE of an exported model (to sample it: `sample(load_sde(p), load_model(p), shape, ...)`)."""
    return build_sde(_config(read_spec(path)))


def load_model(path: str | Path) -> nn.Module:
    """The exported model at `path` (folder or its model.json), in eval mode without gradients; for the
    "score" family its forward(x, t) is the score. Refuses a damaged weights file or a JSON that does
    not describe the weights."""
    spec = read_spec(path)
    weights_path = spec["path"].parent / WEIGHTS
    if not weights_path.is_file():
        raise MissingFileError(f"no {WEIGHTS} beside {spec['path']}")
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != spec["sha256"]:
        raise InvalidValueError(f"{weights_path} does not match {spec['path']} (SHA-256 differs): the file is damaged or "
                         f"from another export")
    try:
        weights = st_load(blob)
    except SafetensorError as e:
        raise InvalidValueError(f"{weights_path} is not a readable safetensors file ({e})") from None
    cfg = _config(spec)
    model = build_model(cfg, build_sde(cfg), tuple(spec["sample_shape"]))
    own = model.state_dict()
    missing, extra = own.keys() - weights.keys(), weights.keys() - own.keys()
    bad = sorted(k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape)
    if missing or extra or bad:
        raise InvalidValueError(f"{spec['path']} does not describe the weights in {weights_path}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}, shape mismatch {bad[:5]}")
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False)
