"""After training: load a run folder, sample it (label-guided, on a fitted grid), inpaint, measure W2 to
held-out data and the likelihood, write plots and metrics. The CLI commands call these functions; what
applies to a run is read from its `models.Family` record (`Run.family`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.sde import LinearSDE
from ..evaluation.bounds import tv_bound
from ..evaluation.metrics import mmd2, tv, tv_grid, w2_report
from ..sampling.guidance import INPAINT_METHODS, inpaint, label_guided
from ..sampling.likelihood import evaluate_likelihood
from ..sampling.tuning import GridFit, fit_grid
from .build import build_model, build_sde, draw_samples, family_of
from .checkpoint import CHECKPOINT, checkpoint_weights
from .config import Config, load_config
from .files import atomic_write
from .data import Dataset, load_config_data, load_dataset, load_mask

__all__ = ["analytic_report", "Run", "load_run", "sample_run", "fit_run_grid", "inpaint_run", "likelihood_run",
           "evaluate_run", "write_report"]


class Run:
    """A trained run: its config, data, SDE and the model holding its EMA (or raw) weights."""

    def __init__(self, cfg: Config, data: Dataset, model: torch.nn.Module, step: int):
        self.cfg, self.data, self.model, self.step = cfg, data, model, step
        self.family = family_of(cfg)
        self.sde = build_sde(cfg)  # also for models without one (families: VAE, DDPM)
        self.dir = cfg.run_dir

    def require_linear(self, what: str) -> LinearSDE:
        """The run's SDE, which `what` needs to be linear."""
        if not isinstance(self.sde, LinearSDE):
            raise InvalidValueError(f"{what} needs a linear SDE; this run's sde is {self.cfg.sde!r}")
        return self.sde


def load_run(run_dir: str | Path, which: str = "ema") -> Run:
    """Rebuild a run from `run_dir/config.yaml` and `run_dir/checkpoint.safetensors`."""
    from .checkpoint import read_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / CHECKPOINT).is_file():
        raise InvalidValueError(f"{str(run_dir)!r} is not a run folder (needs config.yaml and {CHECKPOINT})")
    cfg = load_config(run_dir / "config.yaml", [f"out={run_dir.parent}", f"name={run_dir.name}"])
    torch.set_num_threads(cfg.threads)
    data = load_config_data(cfg)
    model = build_model(cfg, build_sde(cfg), data.sample_shape)
    model.load_state_dict(checkpoint_weights(run_dir / CHECKPOINT, which))
    step = int(read_checkpoint(run_dir / CHECKPOINT)[1]["step"])
    return Run(cfg, data, model.eval().requires_grad_(False), step)


def sample_run(run: Run, n: int, *, method: str | None = None, nfe: int | None = None, seed: int = 0,
               paths: int = 0, label: int | Tensor | None = None, guidance: float = 0.0,
               **options) -> tuple[Tensor, Tensor | None]:
    """n samples (and optionally `paths` reverse trajectories) from a loaded run; method and nfe
    default to the run's config; options go to `sampling.sample` (e.g. ts from `fit_run_grid`, t_end).
    With `label` (an int or n ints) the samples are of that class, by classifier-free guidance with weight
    `guidance` (`guidance.label_guided`; a class-conditional score run)."""
    method, model, family = method or run.cfg.sampler, run.model, run.family
    if label is not None:  # the guided score is a score function of the run's family, not its model
        family.require("guidance")
        family.check_method(method)
        model, family = label_guided(run.model, label, n, guidance), None
    return draw_samples(run.sde, model, (n,) + run.data.sample_shape, method, nfe or run.cfg.nfe,
                        generator=torch.Generator().manual_seed(seed), paths=paths, family=family, **options)


def fit_run_grid(run: Run, *, method: str, nfe: int, n_probe: int, seed: int = 0, **options) -> GridFit:
    """`sampling.tuning.fit_grid` for the run's model on `n_probe` prior draws (seeded by seed + 1, apart from
    `sample_run`'s draws at `seed`); pass the result's ts to `sample_run`."""
    run.family.require("fit_grid")
    sde = run.require_linear("fit_grid")
    if isinstance(n_probe, bool) or not isinstance(n_probe, int) or n_probe < 1:
        raise InvalidValueError(f"n_probe must be an integer >= 1, got {n_probe!r}")
    probe = sde.prior_sample((n_probe,) + run.data.sample_shape, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return fit_grid(sde, run.model, probe, method=method, nfe=nfe, **options)


def inpaint_run(run: Run, mask: str | Path | Tensor, n: int, *, how: str = "tweedie", method: str = "em",
                nfe: int = 200, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Fill the pixels outside `mask` (a .npy / .png file for `data.load_mask`, or a 0/1 tensor of one
    sample's shape, 1 = known) of the run's first n held-out images; `how`: "tweedie" (default: the
    h-transform, exact for Gaussian data) or "replace" (Song et al., biased at any NFE); see
    `sampling.guidance`. Returns (known images, mask, inpainted images)."""
    run.family.require("inpaint")
    sde = run.require_linear("inpaint")
    if not run.data.is_image:
        raise InvalidValueError(f"inpaint needs a run trained on images; {run.cfg.data!r} has samples of shape "
                         f"{run.data.sample_shape}")
    if how not in INPAINT_METHODS:
        raise InvalidValueError(f"how must be one of {', '.join(INPAINT_METHODS)}, got {how!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidValueError(f"n must be an integer >= 1, got {n!r}")
    run.family.check_method(method)
    m = mask if isinstance(mask, Tensor) else load_mask(mask, run.data.sample_shape)
    known = run.data.test[:n]
    x = inpaint(sde, run.model, known, m, method=how, sampler=method, nfe=nfe,
                generator=torch.Generator().manual_seed(seed))
    return known, m, x


def likelihood_run(run: Run, *, data: str = "", n: int = 500, seed: int = 0, **options) -> dict[str, Any]:
    """Mean NLL (and bits/dim for 8-bit images) with its 95% CI through the probability-flow ODE of the run's
    model (`sampling.likelihood.evaluate_likelihood`, which takes `options`: divergence, batch_size, rtol,
    atol) on n points of `data` (a data source as in configs; default: the run's held-out set)."""
    run.family.require("likelihood")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InvalidValueError(f"n must be an integer >= 2, got {n!r}")
    if data:
        ds = load_dataset(data, n_train=n, n_test=n, seed=seed, pad_to=run.cfg.pad_to, image_size=run.cfg.image_size,
                          channels=run.cfg.channels)
        x = torch.cat([ds.test, ds.train[:n]])[:n]
    else:
        x = run.data.test[:n]
    if x.shape[1:] != run.data.sample_shape:
        raise InvalidValueError(f"data points have shape {tuple(x.shape[1:])}, the run's model takes {run.data.sample_shape}")
    out = evaluate_likelihood(run.sde, run.model, x, generator=torch.Generator().manual_seed(seed), **options)
    out.update(data=data or f"{run.cfg.data} (held out)", sde=run.cfg.sde, step=run.step)
    return out


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
    if "tv_bound" not in run.family.evaluations or not isinstance(sde, LinearSDE):
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
