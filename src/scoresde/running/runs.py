"""After training: load a run folder, sample it, measure W2 to held-out data, write plots and metrics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.sde import LinearSDE
from ..evaluation.bounds import tv_bound
from ..evaluation.metrics import mmd2, tv, tv_grid, w2_report
from .build import build_model, build_sde, draw_samples
from .checkpoint import CHECKPOINT, checkpoint_weights
from .config import Config, atomic_write, load_config
from .data import Dataset, load_dataset

__all__ = ["analytic_report", "Run", "load_run", "sample_run", "evaluate_run", "write_report"]


class Run:
    """A trained run: its config, data, SDE and the model holding its EMA (or raw) weights."""

    def __init__(self, cfg: Config, data: Dataset, model: torch.nn.Module, step: int):
        self.cfg, self.data, self.model, self.step = cfg, data, model, step
        self.sde = build_sde(cfg)  # also for models without one (families: VAE, DDPM)
        self.dir = cfg.run_dir


def load_run(run_dir: str | Path, which: str = "ema") -> Run:
    """Rebuild a run from `run_dir/config.yaml` and `run_dir/checkpoint.safetensors`."""
    from .checkpoint import read_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / CHECKPOINT).is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run folder (needs config.yaml and {CHECKPOINT})")
    cfg = load_config(run_dir / "config.yaml", [f"out={run_dir.parent}", f"name={run_dir.name}"])
    torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed, pad_to=cfg.pad_to)
    model = build_model(cfg, build_sde(cfg), data.sample_shape)
    model.load_state_dict(checkpoint_weights(run_dir / CHECKPOINT, which))
    step = int(read_checkpoint(run_dir / CHECKPOINT)[1]["step"])
    return Run(cfg, data, model.eval().requires_grad_(False), step)


def sample_run(run: Run, n: int, *, method: str | None = None, nfe: int | None = None, seed: int = 0,
               paths: int = 0, **options) -> tuple[Tensor, Tensor | None]:
    """n samples (and optionally `paths` reverse trajectories) from a loaded run; method and nfe
    default to the run's config; options go to `samplers.sample` (e.g. ts, t_end)."""
    return draw_samples(run.sde, run.model, (n,) + run.data.sample_shape, method or run.cfg.sampler,
                        nfe or run.cfg.nfe, generator=torch.Generator().manual_seed(seed), paths=paths, **options)


def _evaluate(run: Run, n: int | None, method: str | None, nfe: int | None, seed: int,
              paths: int = 0) -> tuple[dict[str, Any], Tensor, Tensor | None]:
    n = n or min(run.cfg.n_eval * 2, run.data.test.shape[0])
    x, traj = sample_run(run, n, method=method, nfe=nfe, seed=seed, paths=paths)
    metrics = {"step": run.step, "sampler": method or run.cfg.sampler, "nfe": nfe or run.cfg.nfe,
               **w2_report(x, run.data, generator=torch.Generator().manual_seed(seed + 1))}
    target = run.data.mixture if run.data.mixture is not None else run.data.test[:x.shape[0]].flatten(1)
    mmd = mmd2(x.flatten(1), target)
    metrics.update(mmd2=mmd.value, mmd2_stderr=mmd.stderr)
    if run.data.mixture is not None:
        metrics.update(analytic_report(run, x, generator=torch.Generator().manual_seed(seed + 2)))
    return metrics, x, traj


@torch.no_grad()
def analytic_report(run: Run, x: Tensor, n_times: int = 24, n_points: int = 2000,
                    generator: torch.Generator | None = None) -> dict[str, Any]:
    """For data with a known law: TV of the samples to it (histogram, 1-D/2-D, with its floor), and the
    TV bound of T 5.2 fed with the model's measured L2 score error E(t)^2 = E_{p_t}|s - grad log p_t|^2
    on a grid uniform in log t, and with TV(p_T, pi) by Monte Carlo."""
    out: dict[str, Any] = {}
    mix, sde = run.data.mixture, run.sde
    if x.flatten(1).shape[1] <= 2:
        g = tv_grid(x.flatten(1).double(), mix.log_prob)
        out.update(tv_histogram=g.value, tv_histogram_floor=g.floor)
    if run.cfg.model != "score" or not isinstance(sde, LinearSDE):
        return out
    ts = np.geomspace(sde.t_min, sde.T, n_times)
    errors = []
    for t in ts:
        pt = mix.at_time(sde, float(t))
        xt = pt.sample(n_points, generator)
        tb = torch.full((n_points,), float(t))
        s = run.model(xt.float(), tb).double()
        errors.append(float((s - pt.score(xt)).pow(2).sum(1).mean().sqrt()))
    pT = mix.at_time(sde, sde.T)
    prior = tv(pT.log_prob, sde.prior_logp, pT.sample(n_points, generator))
    bound = tv_bound(sde, score_error=lambda t: float(np.interp(np.log(t), np.log(ts), errors)),
                     prior_tv=prior.value, t_end=sde.t_min, breakpoints=ts[1:-1].tolist())
    out.update(score_error_rms=float(np.sqrt(np.mean(np.square(errors)))), prior_tv=prior.value,
               tv_bound=bound.value, tv_bound_score_term=bound.score_term)
    return out


def evaluate_run(run: Run, n: int | None = None, *, method: str | None = None, nfe: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """W2 of n samples (default 2 n_eval, at most the held-out size) to held-out data with its floor,
    MMD^2 (closed form against a known mixture, else against held-out data), and for data with a known
    law the histogram TV and the T 5.2 TV bound from the measured score error (`analytic_report`)."""
    return _evaluate(run, n, method, nfe, seed)[0]


def write_report(run: Run, n: int | None = None, *, method: str | None = None, nfe: int | None = None,
                 seed: int = 0) -> dict[str, Path]:
    """Loss curve, samples beside held-out data, reverse trajectories (2-D) and metrics.json in the run folder."""
    from .plots import plot_loss, plot_samples, plot_trajectories

    metrics, x, traj = _evaluate(run, n, method, nfe, seed, paths=12 if run.data.train.dim() == 2 else 0)
    d = run.dir
    out = {"metrics": d / "metrics.json", "loss": plot_loss(d / "metrics.jsonl", d / "loss.png"),
           "samples": plot_samples(x, run.data.test[:x.shape[0]], d / "samples.png",
                                   title=f"{run.cfg.name}: W2 {metrics['w2']:.3f} (floor {metrics['w2_floor']:.3f})")}
    if traj is not None:
        out["trajectories"] = plot_trajectories(traj, run.data.test[:x.shape[0]], d / "trajectories.png")
    atomic_write(out["metrics"], (json.dumps(metrics, indent=2) + "\n").encode())
    return out
