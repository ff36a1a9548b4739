"""Fine-tuning a trained run against a reward into a new run folder (models.alignment on a run)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InvalidValueError
from ..learning.networks import EMA
from ..models.adjoint import AdjointOptions, adjoint_matching
from ..models.alignment import (
    DDPOOptions,
    DPOKOptions,
    FinetuneOptions,
    LoopOptions,
    ddpo,
    dpok,
    finetune,
    reward_of,
)
from ..models.cross_entropy import CrossEntropyOptions, cross_entropy
from ..models.reward_gradient import DRaFTOptions, draft
from ..models.rewards import Reward
from .checkpoint import CHECKPOINT, save_checkpoint
from .config import save_config
from .data import Dataset, save_data_record
from .files import atomic_write
from .plots import plot_samples, plt, save_figure
from .runs import Run, load_run, sample_run

__all__ = ["METHODS", "method_options", "finetune_run"]

# CLI name -> (options class, function): every method shares the signature f(sde, pretrained, reward, options, ...)
METHODS = {"pg": (FinetuneOptions, finetune), "ce": (CrossEntropyOptions, cross_entropy),
           "adjoint": (AdjointOptions, adjoint_matching), "dpok": (DPOKOptions, dpok), "draft": (DRaFTOptions, draft),
           "ddpo": (DDPOOptions, ddpo)}


def method_options(method: str, beta: float | None = None, k: int | None = None, **loop) -> LoopOptions:
    """The options of a method named as in `METHODS` from the CLI's inputs, checked against the fields of its
    options class: `beta` is required where that class has a `beta` without default (pg, ce, adjoint, dpok),
    optional where it has one with a default (draft) and refused where it has none (ddpo); `k`, pg's `baseline`
    and any other field (`loop`: the shared LoopOptions fields and the method's own) only where the class has
    it, an unknown one named with the fields allowed."""
    if method not in METHODS:
        raise InvalidValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    fields = {f.name: f for f in dataclasses.fields(METHODS[method][0])}

    def owners(name: str) -> str:
        return ", ".join(repr(m) for m, (cls, _) in METHODS.items() if name in {f.name for f in dataclasses.fields(cls)})

    if beta is None and "beta" in fields and fields["beta"].default is dataclasses.MISSING:
        raise InvalidValueError(f"method {method!r} needs --beta (the weight > 0 of the path KL)")
    if beta is not None and "beta" not in fields:
        raise InvalidValueError(f"method {method!r} has no KL term: omit --beta (or use one of {owners('beta')})")
    if loop.get("baseline") is None:
        loop.pop("baseline", None)
    for name, value in (("k", k), ("baseline", loop.get("baseline"))):
        if value is not None and name not in fields:
            raise InvalidValueError(f"--{name} is for method {owners(name)}, not {method!r}")
    unknown = [key for key in loop if key not in fields]
    if unknown:
        allowed = ", ".join(name for name in fields if name not in ("beta", "k"))
        raise InvalidValueError(f"{unknown[0]!r} is not an option of method {method!r}; its options: {allowed} "
                                "(beta and k have their own flags)")
    extra = {name: value for name, value in (("beta", beta), ("k", k)) if value is not None}
    return METHODS[method][0](**loop, **extra)


def finetune_run(run_dir, out_dir, reward: Reward, options: FinetuneOptions, *, data: Dataset | None = None,
                 n_samples: int = 2000, seed: int = 0, device: str | torch.device | None = "cpu") -> dict:
    """Fine-tune a trained run (`runs.load_run(run_dir, data=data)`; its data is plotted beside the samples) and
    write a new run folder at `out_dir`: its config, data record and a checkpoint (loadable by `load_run`),
    history.json, reward and KL curves, samples before and after.

    `options` choose the method (`METHODS`: FinetuneOptions -> `finetune`, AdjointOptions -> `adjoint_matching`,
    ...) and its settings; `device` where the run's model is loaded and fine-tuned (as in `load_run`; the
    chains and their noise follow it). Returns the paths and the mean reward of n_samples draws (the run's
    sampler and NFE) before and after.
    """
    method = next((name for name, (cls, _) in METHODS.items() if type(options) is cls), None)
    if method is None:
        raise InvalidValueError(f"options must be one of {', '.join(c.__name__ for c, _ in METHODS.values())}, "
                                f"got {type(options).__name__}")
    run, out_dir = load_run(run_dir, data=data, device=device), Path(out_dir)
    torch.set_num_threads(run.cfg.threads)  # a training entry point, as the Trainer: the run's thread count
    if out_dir.resolve() == Path(run_dir).resolve():
        raise InvalidValueError("out_dir must differ from run_dir (the pretrained run is left untouched)")
    test = run.data.test  # DataUnavailable before fine-tuning
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    model, history = METHODS[method][1](run.sde, run.model, reward, options, shape=run.sample_shape, generator=gen)
    cfg = dataclasses.replace(run.cfg, out=str(out_dir.parent), name=out_dir.name)
    new = Run(cfg, run.data, model.requires_grad_(False), run.step + len(history), record=run.record)
    save_config(cfg, out_dir / "config.yaml")
    if run.record is not None:
        save_data_record(run.record, out_dir)
    save_checkpoint(out_dir / CHECKPOINT, model=model, ema=EMA(model), step=new.step,
                    extra={"finetuned_from": str(run_dir), "method": method, "beta": getattr(options, "beta", None)})
    atomic_write(out_dir / "history.json", (json.dumps(history, indent=1) + "\n").encode())
    paths, rewards = {}, {}
    for key, r in (("before", run), ("after", new)):
        x, _ = sample_run(r, n_samples, seed=seed)
        rewards[key] = float(reward_of(reward, x).mean())
        paths[f"samples_{key}"] = plot_samples(x, test[:n_samples], out_dir / f"samples_{key}.png",
                                               title=f"{key} fine-tuning: mean reward {rewards[key]:.3f}")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    it = [h["iteration"] for h in history]
    for ax, key, err, label in ((axes[0], "reward_mean", "reward_std", "reward (mean +- sd)"),
                                (axes[1], "kl", "kl_stderr", "path KL to pretrained (+- se)")):
        m, e = np.array([h[key] for h in history]), np.array([h[err] for h in history])
        ax.plot(it, m), ax.fill_between(it, m - e, m + e, alpha=0.3)
        ax.set_xlabel("iteration"), ax.set_title(label)
    fig.tight_layout()
    save_figure(fig, out_dir / "finetune_curves.png", tight=False)
    paths.update(curves=out_dir / "finetune_curves.png", checkpoint=out_dir / CHECKPOINT, history=out_dir / "history.json")
    return {"paths": paths, "reward_before": rewards["before"], "reward_after": rewards["after"],
            "kl": history[-1]["kl"], "method": method}
