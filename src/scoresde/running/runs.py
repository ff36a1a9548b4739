"""After training: load a run folder, sample it (label-guided, on a fitted grid), inpaint, measure W2 to
held-out data and the likelihood, write plots and metrics. The CLI commands call these functions; what
applies to a run is read from its `models.Family` record (`Run.family`).

A run's data is the one its folder records (`data.data_record` in data.yaml): `load_run` reloads the config's
data and checks its content hash, or takes the data given to it (checked too). Data that cannot be had (given
to the Trainer through the API and not passed again, a data file or folder gone or changed since training)
leaves the run loadable: it samples (the sample shape is recorded), and what needs the data (evaluation,
plots beside data, inpainting, held-out likelihoods) raises `DataUnavailable` saying why and how to pass it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.devices import device_generator
from ..core.errors import InvalidValueError, ScoresdeError
from ..core.sde import LinearSDE
from ..core.validate import integer
from ..evaluation.bounds import tv_bound
from ..evaluation.metrics import check_mmd2_memory, mmd2, tv, tv_grid, w2_report
from ..sampling.entry import check_schedule, resolve_schedule
from ..sampling.guidance import INPAINT_METHODS, inpaint, label_guided
from ..sampling.likelihood import evaluate_likelihood
from ..sampling.schedule import (N_PROBE, SEARCH, Schedule, auto_by_default, auto_schedule, check_auto,
                                search_options)
from ..sampling.tuning import GridFit, fit_grid
from .build import build_model, build_sde, draw_samples, family_of, resolve_device
from .checkpoint import CHECKPOINT, has_checkpoint, load_weights
from .config import Config, load_config
from .data import (
    Dataset,
    check_dataset,
    content_hash,
    data_mismatch,
    load_config_data,
    load_dataset,
    load_mask,
    read_data_record,
)
from .feature_net import FEATURE_NETS, FeatureEvaluator
from .files import atomic_write

__all__ = [
    "DataUnavailable",
    "Run",
    "analytic_report",
    "evaluate_run",
    "feature_report",
    "fit_run_grid",
    "inpaint_run",
    "likelihood_run",
    "load_run",
    "run_method",
    "run_schedule",
    "sample_run",
    "weights_id",
    "write_report",
]


class DataUnavailable(InvalidValueError):
    """A run's training data is needed but was not reloaded; the message says why and how to pass it."""


class Run:
    """A trained run: its config, SDE, the model holding its EMA (or raw) weights, its data record (None for a
    run folder written before runs recorded their data) and its data; without data (None, with the reason
    `unavailable`) the sample shape comes from the record and `data` raises `DataUnavailable`."""

    def __init__(self, cfg: Config, data: Dataset | None, model: torch.nn.Module, step: int, *,
                 record: dict | None = None, unavailable: str = ""):
        self.cfg, self.model, self.step, self.record = cfg, model, step, record
        self._data, self._unavailable = data, unavailable
        self.sample_shape = data.sample_shape if data is not None else tuple(record["shape"])
        self.family = family_of(cfg)
        self.sde = build_sde(cfg)  # also for models without one (families: VAE, DDPM)
        self.dir = cfg.run_dir

    @property
    def data(self) -> Dataset:
        """The run's data (train and held-out points); `DataUnavailable` when it could not be had."""
        if self._data is None:
            raise DataUnavailable(self._unavailable)
        return self._data

    @property
    def device(self) -> torch.device:
        """Where the model computes (`load_run`'s device); samples and results come back on the CPU."""
        return next(iter(self.model.parameters()), torch.empty(0)).device

    @property
    def data_name(self) -> str:
        """The name of the data the run was trained on."""
        return self.record["name"] if self.record else self.cfg.data

    def require_linear(self, what: str) -> LinearSDE:
        """The run's SDE, which `what` needs to be linear."""
        if not isinstance(self.sde, LinearSDE):
            raise InvalidValueError(f"{what} needs a linear SDE; this run's sde is {self.cfg.sde!r}")
        return self.sde


def _reload(cfg: Config, record: dict, where: str) -> tuple[Dataset | None, str]:
    """The config's data if its content hash is the recorded one, else None and why (module docstring)."""
    how = (f"pass the data the run was trained on: load_run({str(cfg.run_dir)!r}, data=Dataset(...)), whose sha256 "
           f"must be {record['sha256']}")
    try:
        data, error = load_config_data(cfg), ""
    except ScoresdeError as err:
        data, error = None, str(err)
    if data is not None and content_hash(data) == record["sha256"]:
        return data, ""
    if record["source"] == "api":
        return None, (f"{where} was trained on data {record['name']!r} given to the Trainer (Trainer(cfg, data=...)), "
                      f"not on its config's data {cfg.data!r}; {how}")
    if data is None:
        return None, f"{where} was trained on data {record['name']!r}, which cannot be reloaded ({error}); {how}"
    return None, f"{data_mismatch(data, record, where)}; {how}"


def load_run(run_dir: str | Path, which: str = "ema", data: Dataset | None = None,
             device: str | torch.device | None = "cpu") -> Run:
    """Rebuild a run from `run_dir/config.yaml`, its data record and `run_dir/checkpoint.safetensors`.

    `data`: the data the run was trained on, needed when it was given to the Trainer (its content hash must
    be the recorded one). Without it the config's data is reloaded and checked; data that cannot be had
    leaves a run that samples but has no `data` (module docstring). A run folder without a data record
    (written before runs recorded their data) reloads its config's data unchecked. Torch's thread count is left
    as it is (the CLI sets the run's `threads`; a Trainer loading a teacher keeps its own). `device`: where the
    model computes (cpu, cuda, auto as in configs; None: the run's config device); sampling, inpainting and
    likelihoods of the run run there."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not has_checkpoint(run_dir / CHECKPOINT):
        raise InvalidValueError(f"{str(run_dir)!r} is not a run folder (needs config.yaml and {CHECKPOINT})")
    cfg = load_config(run_dir / "config.yaml", [f"out={run_dir.parent}", f"name={run_dir.name}"])
    record, where, unavailable = read_data_record(run_dir), f"run {str(run_dir)!r}", ""
    data = None if data is None else check_dataset(data)
    if data is not None and record is not None and (mismatch := data_mismatch(data, record, where)):
        raise InvalidValueError(f"{mismatch}; pass the data the run was trained on")
    if data is None:
        data, unavailable = (load_config_data(cfg), "") if record is None else _reload(cfg, record, where)
    model = build_model(cfg, build_sde(cfg), tuple(record["shape"]) if data is None else data.sample_shape)
    step = load_weights(run_dir / CHECKPOINT, model, which, net=cfg.net, net_args=cfg.net_args)
    if device is None:
        try:
            device = resolve_device(cfg.device)
        except InvalidValueError:
            raise InvalidValueError(f"{where} is configured for device {cfg.device!r}, which is not available here; "
                                    "load it with device 'cpu' or 'auto' (CLI: --device cpu)") from None
    model = model.to(device if isinstance(device, torch.device) else resolve_device(device))
    return Run(cfg, data, model.eval().requires_grad_(False), step, record=record, unavailable=unavailable)


SCHEDULES = "schedules.json"  # the run's automatic schedules (`run_schedule`)


def weights_id(model: torch.nn.Module) -> str:
    """sha256 of the model's weights (names, dtypes, shapes and bytes in name order): the identity of the
    checkpoint a loaded run holds."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def auto_applies(run: Run, *, method: str, nfe: int, **options) -> bool:
    """Whether the CLI takes `run_schedule` by default for the run's model with `method` at `nfe`: a score model
    where `sample` would (`schedule.auto_by_default`)."""
    if not auto_by_default(run.sde, method=method, nfe=nfe, **options):
        return False
    try:
        run.family.require("fit_grid")
    except InvalidValueError:
        return False
    return True


def run_method(run: Run, nfe: int | None, *, label: int | Tensor | None = None, schedule: str | None = None,
               **options) -> str:
    """The method that samples `run` at `nfe` when none is named: the run's sampler, except at a named
    nfe <= AUTO_MAX_NFE where that sampler has no automatic schedule (`auto_applies`: em, pc, ...) and neither a
    sampler option, a label nor schedule="default" is given: then ipndm at nfe <= 5 and unipc2 above, on their
    automatic schedule (the methods that met issue 22's goals on the held-out targets of benchmarks/samplers.py;
    docs/math/samplers.md). So `scoresde sample RUN --nfe 5` gets a few-step sampler without options."""
    own = run.cfg.sampler
    if nfe is None or options or label is not None or schedule == "default" or auto_applies(run, method=own, nfe=nfe):
        return own
    few = "ipndm" if nfe <= 5 else "unipc2"
    return few if auto_applies(run, method=few, nfe=nfe) else own


def run_schedule(run: Run, *, method: str, nfe: int, n_probe: int | None = None, progress: bool = False,
                 **options) -> tuple[Schedule, bool]:
    """The automatic schedule (`sampling.schedule.auto_schedule`) of the run's model for `method` at `nfe`, and
    whether it came from the run folder; refused, naming why, where it does not apply (`check_auto`, and a
    family whose model is not a score model). Pass it on as `sample_run(..., **s.options)`.

    Kept in `run_dir/schedules.json` (written atomically), keyed by method, nfe, solver options (those of the
    search, `search_options`), the sample shape, the search's version (`schedule.SEARCH`), its probe draws
    (`n_probe`, None: N_PROBE; the search's cost is about linear in them) and the weights (`weights_id`): paid once
    per model, nfe and size; a new checkpoint drops the entries of the old one. `progress`: the search's progress
    bar (`auto_schedule`)."""
    check_auto(run.sde, method=method, nfe=nfe, **options)
    run.family.require("fit_grid")
    if n_probe is not None:
        integer("n_probe", n_probe, 4)
    path, weights = run.dir / SCHEDULES, weights_id(run.model)
    size = "" if n_probe in (None, N_PROBE) else f", {n_probe} probe draws"  # the default's keys of search 12 hold
    key = json.dumps([method, int(nfe), list(run.sample_shape),
                      sorted((k, repr(v)) for k, v in search_options(method, options).items()),
                      f"search {SEARCH}{size}"])
    try:
        stored = json.loads(path.read_text())
        entries = stored["entries"] if stored.get("weights") == weights else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or unreadable: recompute
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    try:
        entry = entries[key]
        mean = None if entry["prior_mean"] is None else torch.tensor(entry["prior_mean"], dtype=torch.float64)
        s = Schedule(**{**entry, "ts": torch.tensor(entry["ts"], dtype=torch.float64), "prior_mean": mean})
        if mean is None or tuple(mean.shape) == tuple(run.sample_shape):
            return s, True
    except (KeyError, TypeError, ValueError):  # none yet, or a damaged entry: recompute
        pass
    with torch.no_grad():
        s = auto_schedule(run.sde, run.model, run.sample_shape, method=method, nfe=int(nfe), device=run.device,
                          n_probe=n_probe, progress=progress, **options)
    entries[key] = {**dataclasses.asdict(s), "ts": s.ts.tolist(),
                    "prior_mean": None if s.prior_mean is None else s.prior_mean.tolist()}
    atomic_write(path, (json.dumps({"weights": weights, "entries": entries}, indent=1) + "\n").encode())
    return s, False


def sample_run(run: Run, n: int, *, method: str | None = None, nfe: int | None = None, seed: int = 0,
               paths: int = 0, label: int | Tensor | None = None, guidance: float = 0.0, schedule: str | None = None,
               search_draws: int | None = None, **options) -> tuple[Tensor, Tensor | None]:
    """n samples (and optionally `paths` reverse trajectories) from a loaded run; method and nfe
    (None: `run_method`'s, the run's configured sampler but at a few-step nfe, and the run's nfe) and options go
    to `sampling.sample` (e.g. ts from `fit_run_grid`), t_end. schedule and search_draws as `sampling.sample`'s,
    the automatic schedule being the run's (`run_schedule`, kept in the run folder): None takes it where it applies
    (`auto_applies`) and no label is given. With `label` (an int or n ints) the samples are of that class, by
    classifier-free guidance with weight `guidance` (`guidance.label_guided`; a class-conditional score run)."""
    integer("n", n)
    check_schedule(schedule)
    schedule = resolve_schedule(schedule, search_draws)
    method = run_method(run, nfe, label=label, schedule=schedule, **options) if method is None else method
    model, family = run.model, run.family
    nfe = run.cfg.nfe if nfe is None else nfe
    if schedule == "auto" and label is not None:
        raise InvalidValueError("schedule='auto' is searched for the unconditional model: it does not combine with label")
    if schedule == "auto" or schedule is None and label is None and auto_applies(run, method=method, nfe=nfe,
                                                                                  **options):
        s, _ = run_schedule(run, method=method, nfe=nfe, n_probe=search_draws, progress=run.cfg.progress, **options)
        options = {**options, **s.options}
    if label is not None:  # the guided score is a score function of the run's family, not its model
        family.require("guidance")
        family.check_method(method)
        model, family = label_guided(run.model, label, n, guidance), None
    x, traj = draw_samples(run.sde, model, (n,) + run.sample_shape, method, nfe, device=run.device,
                           generator=torch.Generator().manual_seed(seed), paths=paths, family=family, **options)
    return x.cpu(), None if traj is None else traj.cpu()


def fit_run_grid(run: Run, *, method: str, nfe: int, n_probe: int, seed: int = 0, **options) -> GridFit:
    """`sampling.tuning.fit_grid` for the run's model on `n_probe` prior draws (seeded by seed + 1, apart from
    `sample_run`'s draws at `seed`); pass the result's ts to `sample_run`."""
    run.family.require("fit_grid")
    sde = run.require_linear("fit_grid")
    if isinstance(n_probe, bool) or not isinstance(n_probe, int) or n_probe < 1:
        raise InvalidValueError(f"n_probe must be an integer >= 1, got {n_probe!r}")
    probe = sde.prior_sample((n_probe,) + run.sample_shape, torch.Generator().manual_seed(seed + 1)).to(run.device)
    with torch.no_grad():
        return fit_grid(sde, run.model, probe, method=method, nfe=nfe, **options)


def inpaint_run(run: Run, mask: str | Path | Tensor, n: int, *, how: str = "tweedie", method: str | None = None,
                nfe: int | None = None, seed: int = 0, cg_iters: int | None = None, weight: float = 1.0,
                **options) -> tuple[Tensor, Tensor, Tensor]:
    """Fill the pixels outside `mask` (a .npy / .png file for `data.load_mask`, or a 0/1 tensor of one
    sample's shape, 1 = known) of the run's first n held-out images with sampler `method` at `nfe` (None: the
    run's; for "smc", em); `how`: "tweedie" (default: the h-transform, exact for Gaussian data; `cg_iters` CG
    iterations per step), "replace" (Song et al., biased at any NFE) or "smc" (twisted SMC, exact as its
    `particles` grow), `weight` the likelihood (twisting) weight, `options` those of `sampling.guidance.inpaint`.
    Returns (known images, mask, inpainted images)."""
    run.family.require("inpaint")
    sde = run.require_linear("inpaint")
    if len(run.sample_shape) != 3:
        raise InvalidValueError(f"inpaint needs a run trained on images; {run.data_name!r} has samples of shape "
                                f"{run.sample_shape}")
    if how not in INPAINT_METHODS:
        raise InvalidValueError(f"how must be one of {', '.join(INPAINT_METHODS)}, got {how!r}")
    integer("n", n)
    method = ("em" if how == "smc" else run.cfg.sampler) if method is None else method
    run.family.check_method(method)
    m = mask if isinstance(mask, Tensor) else load_mask(mask, run.sample_shape)
    known = run.data.test[:n]
    x = inpaint(sde, run.model, known.to(run.device), m.to(run.device), method=how, sampler=method,
                nfe=run.cfg.nfe if nfe is None else nfe, cg_iters=cg_iters, weight=weight,
                generator=device_generator(torch.Generator().manual_seed(seed), run.device), **options)
    return known, m, x.cpu()


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
    if x.shape[1:] != run.sample_shape:
        raise InvalidValueError(f"data points have shape {tuple(x.shape[1:])}, the run's model takes {run.sample_shape}")
    out = evaluate_likelihood(run.sde, run.model, x.to(run.device),
                              generator=device_generator(torch.Generator().manual_seed(seed), run.device), **options)
    out.update(data=data or f"{run.data_name} (held out)", sde=run.cfg.sde, step=run.step)
    return out


def _evaluate(run: Run, n: int | None, method: str | None, nfe: int | None, seed: int, paths: int = 0,
              feature_cache: str | Path = "runs/features", **options) -> tuple[dict[str, Any], Tensor, Tensor | None]:
    data = run.data  # DataUnavailable before any sampling
    features = run.cfg.data in FEATURE_NETS and not run.cfg.image_size
    if features and n is not None and integer("n", n) < 20:
        raise InvalidValueError(f"n must be at least 20 on {run.cfg.data} (KID over 10 blocks of 2+ samples), got {n}")
    n = min(run.cfg.n_eval * 2, data.test.shape[0]) if n is None else integer("n", n)
    features = features and n >= 20  # a default n (2 n_eval) too small for KID: the report goes without them
    method = run_method(run, nfe, **options) if method is None else method
    nfe = run.cfg.nfe if nfe is None else nfe
    check_mmd2_memory(n, None if data.mixture is not None else min(n, data.test.shape[0]))  # before sampling
    x, traj = sample_run(run, n, method=method, nfe=nfe, seed=seed, paths=paths, **options)
    metrics = {"step": run.step, "sampler": method, "nfe": nfe,
               **w2_report(x, data, generator=torch.Generator().manual_seed(seed + 1))}
    target = data.mixture if data.mixture is not None else data.test[:x.shape[0]].flatten(1)
    mmd = mmd2(x.flatten(1), target)
    metrics.update(mmd2=mmd.value, mmd2_stderr=mmd.stderr)
    if data.mixture is not None:
        metrics.update(analytic_report(run, x, generator=torch.Generator().manual_seed(seed + 2)))
    if features:
        metrics.update(feature_report(run, x, feature_cache))
    return metrics, x, traj


def feature_report(run: Run, x: Tensor, cache: str | Path = "runs/features") -> dict[str, float]:
    """For a built-in image set (`FEATURE_NETS`: digits, mnist): FID-style distance with its floor, KID +- its
    standard error, k-NN precision / recall and the class frequencies' total variation (each with its floor) of
    the samples x on the data's download-free feature network (`FeatureEvaluator`, trained once into `cache`),
    and where x is large enough the FID-style distance extrapolated to infinitely many samples, with its floor;
    not comparable with Inception FIDs."""
    ev = FeatureEvaluator(run.cfg.data, x.shape[0], cache, run.cfg.pad_to)
    m = ev(x)
    out = {"fid_style": m["fid"], "fid_style_floor": ev.floor, "kid": m["kid"], "kid_stderr": m["kid_se"],
           "precision": m["precision"], "recall": m["recall"], "precision_floor": ev.floor_pr[0],
           "recall_floor": ev.floor_pr[1], "class_tv": m["class_tv"], "class_tv_floor": ev.floor_metrics["class_tv"],
           "feature_net_accuracy": ev.acc, "feature_n": ev.n}
    if "fid_inf" in m and "fid_inf" in ev.floor_metrics:
        out.update(fid_style_inf=m["fid_inf"], fid_style_inf_floor=ev.floor_metrics["fid_inf"])
    return out


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
        s = run.model(xt.float().to(run.device), tb.to(run.device)).double().cpu()
        errors.append(float((s - pt.score(xt)).pow(2).sum(1).mean().sqrt()))
    pT = mix.at_time(sde, sde.T)
    prior = tv(pT.log_prob, sde.prior_logp, pT.sample(n_points, generator))
    bound = tv_bound(sde, score_error=lambda t: float(np.interp(np.log(t), np.log(ts), errors)),
                     prior_tv=prior.value, t_end=sde.t_min, breakpoints=ts[1:-1].tolist())
    out.update(score_error_rms=float(np.sqrt(np.mean(np.square(errors)))), prior_tv=prior.value,
               tv_bound=bound.value, tv_bound_score_term=bound.score_term)
    return out


def evaluate_run(run: Run, n: int | None = None, *, method: str | None = None, nfe: int | None = None,
                 seed: int = 0, feature_cache: str | Path = "runs/features", **options) -> dict[str, Any]:
    """W2 of n samples (None: 2 n_eval, at most the held-out size) drawn with sampler `method` at `nfe` (None: the
    run's; options to `sample_run`, e.g. ts and denoise of `run_schedule`) to held-out data with its floor, MMD^2
    (closed form against a known mixture, else against held-out data), for data with a known law the histogram
    TV and the T 5.2 TV bound from the measured score error (`analytic_report`), and for the built-in image sets
    FID-style, KID, precision and recall (`feature_report`, its network cached in `feature_cache`)."""
    return _evaluate(run, n, method, nfe, seed, feature_cache=feature_cache, **options)[0]


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
