"""Run configuration: one flat dataclass read from YAML, overridable by `key=value` strings.

Each run saves its resolved config as `config.yaml` beside its checkpoint (DESIGN section 10).
Dict-valued fields (`sde_args`, `net_args`, `loss_args`) are keyword arguments of the SDE
class, the network class and the loss function; override their entries as `net_args.hidden=256`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import InvalidValueError, MissingFileError
from .files import atomic_write

DICT_KEYS = ("sde_args", "net_args", "loss_args", "model_args")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
EMA_SCHEDULES = ("power", "edm", "constant")

__all__ = ["Config", "apply_overrides", "config_from_dict", "load_config", "read_yaml", "save_config"]

_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2 floats: a dot or an exponent (2e-3, 1E5, .5, -3e-2, 1.), and .inf / .nan; YAML 1.1 (PyYAML's
# default) needs a dot, so it reads 2e-3 as a string
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                       |[0-9][0-9_]*[eE][-+]?[0-9]+)
                    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.VERBOSE)


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2's float rule."""


_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in rules if tag != _FLOAT_TAG]
                                   for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InvalidValueError(f"{source} is not valid YAML{where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise InvalidValueError(f"{source} is not valid YAML: {err}") from None


def read_yaml(text_or_path: str | os.PathLike, source: str = "YAML text") -> Any:
    """Parse YAML text (a str; `source` names it in errors) or a YAML file (a Path / os.PathLike) with the
    YAML 1.2 float rule, so 2e-3, 1E5, .5 and -3e-2 read as floats; malformed YAML raises InvalidValueError
    naming the file (or source) and line, a missing file MissingFileError."""
    if isinstance(text_or_path, str):
        return _parse_yaml(text_or_path, source)
    path = Path(text_or_path)
    if not path.is_file():
        raise MissingFileError(f"YAML file {str(path)!r} does not exist")
    return _parse_yaml(path.read_text(), f"YAML file {str(path)!r}")


@dataclass
class Config:
    """Every setting of a training run; `run_dir = out/name`."""

    name: str = "run"
    out: str = "runs"
    seed: int = 0
    device: str = "cpu"            # cpu | cuda | auto
    threads: int = 1               # torch intra-op threads (CPU)
    # data (scoresde.data.load_dataset)
    data: str = "moons"            # a built-in name or a path to .npy/.npz/an image folder (running.images)
    n_train: int = 20000           # points drawn for built-in toy/mixture sets
    n_test: int = 2000             # held-out points (at most a fifth of a finite set)
    pad_to: int = 0                # pad square images to this size (0: as they are)
    image_size: int = 0            # image folders: resize the shorter side and centre-crop to this size (0: as they are)
    channels: int = 0              # image folders: 1 (grey) | 3 (RGB) | 0 (1 if every image is grey, else 3)
    hflip: bool = False            # images: mirror each training image left-right with probability 1/2
    data_memory_mb: int = 1024     # image folders decoding to more than this are read lazily from disk (0: always)
    data_workers: int = 2          # DataLoader worker processes reading a lazy image folder (0: in the main process)
    # model
    model: str = "score"           # scoresde.models.FAMILIES: score | vae | ddpm (its record lists losses, samplers)
    model_args: dict = field(default_factory=dict)  # keywords of the family (ddpm: n_steps, schedule; vae: latent_dim, ...)
    label_dropout: float = 0.0     # class-conditional nets (net_args.n_classes): share of labels replaced by the null label
    sde: str = "vp"                # scoresde.sde.SDES
    sde_args: dict = field(default_factory=dict)
    net: str = "mlp"               # mlp | unet
    net_args: dict = field(default_factory=dict)
    parametrization: str = "eps"   # scoresde.precond.PARAMETRIZATIONS
    sigma_data: float = 0.5
    c_noise: str = "log_sigma"     # the network's noise conditioning: log_sigma (EDM's) | time (scoresde.precond.C_NOISE)
    loss: str = "denoising"        # scoresde.losses.LOSSES
    loss_args: dict = field(default_factory=dict)
    # optimisation (AdamW, linear warm-up, gradient clipping, EMA)
    steps: int = 5000
    batch_size: int = 256          # global batch, split across DDP processes
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100              # linear warm-up steps
    lr_schedule: str = "constant"  # constant | cosine (decay to 0 at `steps` after warm-up)
    grad_clip: float = 1.0         # max gradient norm; 0 disables clipping
    accumulate: int = 1            # micro-batches per optimiser step (slices of one drawn batch): effective batch = accumulate x batch_size
    precision: str = "fp32"        # fp32 | bf16 | fp16 | auto: the network's forward and backward under torch.autocast (fp16
                                   # with a GradScaler); weights, optimiser, EMA, SDE coefficients, losses and samplers stay
                                   # fp32/fp64; auto: bf16 where the device computes it natively, else fp32 (running.precision)
    compile: bool = False          # torch.compile the network for training (inductor: a C++ compiler on CPU, Triton on CUDA)
    # EMA of the weights, used for sampling: beta_n is the decay of the n-th update (learning.networks.EMA)
    ema_schedule: str | None = None  # power | edm | constant; unset: constant when ema_decay is set, else power
    ema_decay: float | None = None   # constant: beta_n = ema_decay (the schedule of configs written before warm-up)
    ema_gamma: float = 1.0         # power: beta_n = 1 - (1 + n / ema_gamma)^(-ema_power) (ema-pytorch, diffusers' warm-up)
    ema_power: float = 0.75
    ema_halflife: float = 1000.0   # edm: beta_n = 0.5^(1 / min(ema_halflife, ema_rampup n)), half-life in steps (EDM)
    ema_rampup: float = 0.05       # edm: 0 gives a constant half-life ema_halflife
    # logging, evaluation, checkpoints
    log_every: int = 50
    eval_every: int = 1000         # held-out loss, W2 and a sample snapshot; 0 disables
    checkpoint_every: int = 500
    n_eval: int = 1000             # samples drawn at each evaluation
    sampler: str = "em"            # a method of the model's family: sampling.METHODS (score), ddpm, decoder (vae)
    nfe: int = 500                 # score evaluations per sample
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    def validate(self) -> None:
        """Types and ranges of the fields (names of SDEs, losses etc. are checked where they are built; model,
        loss and sampler against the family's record by `build.check_config`)."""
        for f in dataclasses.fields(self):
            value, kind_name = getattr(self, f.name), str(f.type)
            if value is None and kind_name.endswith(" | None"):
                continue
            kind = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict}[kind_name.removesuffix(" | None")]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            elif kind is int and isinstance(value, float) and value.is_integer():  # steps: 1e5
                value = int(value)
                setattr(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise InvalidValueError(f"config {f.name} must be of type {kind.__name__}, got {value!r}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "n_eval", "nfe", "threads", "n_train", "n_test"):
            if getattr(self, name) < 1:
                raise InvalidValueError(f"config {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "pad_to", "seed", "image_size", "data_memory_mb", "data_workers"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"config {name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InvalidValueError(f"config lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.sigma_data <= 0:
            raise InvalidValueError("config weight_decay and grad_clip must be >= 0 and sigma_data > 0")
        if not 0 <= self.label_dropout <= 1:
            raise InvalidValueError(f"config label_dropout must be in [0, 1], got {self.label_dropout}")
        if self.accumulate < 1:
            raise InvalidValueError(f"config accumulate must be >= 1, got {self.accumulate}")
        if self.precision not in PRECISIONS:
            raise InvalidValueError(f"config precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self._validate_ema()
        if self.lr_schedule not in ("constant", "cosine"):
            raise InvalidValueError(f"config lr_schedule must be one of constant, cosine, got {self.lr_schedule!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise InvalidValueError(f"config device must be one of cpu, cuda, auto, got {self.device!r}")
        if not self.name or "/" in self.name:
            raise InvalidValueError(f"config name must be a non-empty name without '/', got {self.name!r}")

    def _validate_ema(self) -> None:
        """Resolve an unset ema_schedule (constant when ema_decay is set, so configs written before the
        warm-up schedules train as they did; else power) and check the schedule's keys."""
        if self.ema_schedule is None:
            self.ema_schedule = "power" if self.ema_decay is None else "constant"
        if self.ema_schedule not in EMA_SCHEDULES:
            raise InvalidValueError(f"config ema_schedule must be one of {', '.join(EMA_SCHEDULES)}, got {self.ema_schedule!r}")
        if self.ema_schedule == "constant":
            if self.ema_decay is None or not 0 <= self.ema_decay < 1:
                raise InvalidValueError(f"config ema_decay must be in [0, 1) for ema_schedule constant, got {self.ema_decay}")
        elif self.ema_decay is not None:
            raise InvalidValueError(f"config ema_decay sets the constant schedule; ema_schedule {self.ema_schedule} is set by "
                             f"{'ema_gamma and ema_power' if self.ema_schedule == 'power' else 'ema_halflife and ema_rampup'}"
                             f": drop ema_decay or set ema_schedule constant")
        for name in ("ema_gamma", "ema_power", "ema_halflife"):
            if not getattr(self, name) > 0:
                raise InvalidValueError(f"config {name} must be > 0, got {getattr(self, name)}")
        if self.ema_rampup < 0:
            raise InvalidValueError(f"config ema_rampup must be >= 0, got {self.ema_rampup}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def config_from_dict(values: dict[str, Any]) -> Config:
    """A Config from a dict; unknown keys raise an error listing the valid ones."""
    unknown = sorted(set(values) - set(_field_names()))
    if unknown:
        raise InvalidValueError(f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(_field_names())}")
    return Config(**values)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` (or `dictkey.entry=value`) strings; values are parsed as YAML scalars."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InvalidValueError(f"override {item!r} must look like key=value")
        value = _parse_yaml(raw, f"override {item!r}") if raw else ""
        head, dot, entry = key.partition(".")
        if head not in _field_names():
            raise InvalidValueError(f"unknown config key {head!r}; valid: {', '.join(_field_names())}")
        if dot:
            if head not in DICT_KEYS:
                raise InvalidValueError(f"{head} is not a dict-valued key; write {head}=value")
            values.setdefault(head, {})[entry] = value
        else:
            values[key] = value
    return values


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (None: the defaults), apply overrides; `name` defaults to the file's stem."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise InvalidValueError(f"config file {str(path)!r} is a folder; give a YAML file (see configs/)")
        if not path.is_file():
            raise MissingFileError(f"config file {str(path)!r} does not exist")
        values = _parse_yaml(path.read_text(), f"config file {str(path)!r}") or {}
        if not isinstance(values, dict):
            raise InvalidValueError(f"config file {str(path)!r} must hold a mapping of key: value")
        values.setdefault("name", path.stem)
    return config_from_dict(apply_overrides(values, list(overrides)))


def save_config(config: Config, path: str | os.PathLike) -> None:
    atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
