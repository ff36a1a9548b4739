"""Consistency distillation (CD) and training (CT) against their teacher's probability-flow ODE.

For each data set: a teacher score (the EXACT score for the analytic mixtures ring and
mixture16; a score model trained by `scoresde.train.Trainer` from configs/<set>.yaml for the toy
sets), its probability-flow ODE sampled with Euler, Heun, DPM-Solver++(2M) and dopri5 (rtol = atol = 1e-3; "n/a"
where it needs more evaluations) at 10, 20 and 100 NFE, and one- and two-step samples of a CD student (Heun teacher steps, N = 18, EMA
target) and a CT student (no teacher), both trained by `ConsistencyTrainer` (the same loop).
All samplers start from the same prior draws x_T; W2 to 2000 held-out points is averaged over
`--seeds` draws, beside its floor (W2 of 2000 training points to the same held-out points).
The two-step intermediate time is chosen on training points (not the held-out ones) from a
small grid of noise levels. Also reported: the RMS distance |f(x_T, T) - ODE(x_T)| of the
one-step CD map to the teacher's 100-NFE DPM-Solver++ output from the same x_T.

    python -m benchmarks consistency [--sets moons,ring] [--seeds 3]      (make bench-consistency)

Writes benchmarks/results/consistency/consistency_<set>.png and consistency_<set>.json; run folders
(teachers, students) under runs/bench-consistency.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from scoresde.evaluation.metrics import w2
from scoresde.running.build import build_sde
from scoresde.running.config import Config, load_config
from scoresde.running.consistency_train import ConsistencyTrainer
from scoresde.running.data import load_dataset
from scoresde.running.runs import load_run
from scoresde.running.train import Trainer
from scoresde.sampling import sample
from scoresde.sampling.consistency import ConsistencyModel, consistency_sample, effective_sigma

NAME = "consistency"
REPO = common.REPO
DEFAULT_RUNS = "runs/bench-consistency"
RUNS = REPO / DEFAULT_RUNS  # a quick run trains under its output folder instead (run())
ANALYTIC = {"ring": "moons", "mixture16": "mixture16"}  # set -> config giving SDE and network
TOY_CONFIG = {"moons": "moons", "checkerboard": "checkerboard", "swiss_roll": "swiss_roll", "rings": "moons"}
METHODS, NFES = ("euler", "heun", "dpm2m", "dopri5"), (10, 20, 100)
OPTIONS = {"dopri5": {"rtol": 1e-3, "atol": 1e-3}}  # at its default 1e-5 it never fits 100 NFE here
S_MID = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)  # two-step noise levels sigma/alpha, times sigma_data
N = 2000  # samples, held-out and reference points (--n)
QUICK = dict(sets="ring", seeds=1, steps=20, n=200)


def add_arguments(p) -> None:
    p.add_argument("--sets", default="ring,mixture16,moons,checkerboard,swiss_roll,rings")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--n", type=int, default=N, help="samples per W2 and held-out points")
    p.add_argument("--reuse", action="store_true", help="evaluate finished students of a previous run")


def run_tag(args) -> str:
    return args.sets.replace(",", "-")


def base_config(name: str) -> dict:
    cfg = load_config(REPO / "configs" / f"{TOY_CONFIG.get(name, ANALYTIC.get(name))}.yaml").to_dict()
    return {**cfg, "data": name, "out": str(RUNS), "progress": False, "eval_every": 0, "n_train": 20000,
            "n_test": N, "seed": 0}


def teacher(name: str) -> tuple[str, float]:
    """The teacher spec for loss_args.teacher and its training time (0 for the exact score)."""
    if name in ANALYTIC:
        return "exact", 0.0
    base = base_config(name)
    cfg = Config(**{**base, "name": f"{name}-teacher", "steps": min(base["steps"], 5000)})
    Trainer(cfg).run()  # resumes (and does nothing) when the run is complete
    return str(cfg.run_dir), logged_time(cfg.run_dir)


def _last_log(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def logged_steps(run_dir: Path) -> int:
    return _last_log(run_dir)["step"]


def logged_time(run_dir: Path) -> float:
    """Training time of a finished run from its metrics log: steps / steps per second."""
    last = _last_log(run_dir)
    return last["step"] / last["steps_per_s"]


def student(name: str, mode: str, spec: str, steps: int, sigma_data: float, reuse: bool) -> tuple[torch.nn.Module, float]:
    """The trained student's EMA model (x0-parametrised ScoreModel) and its training time; reuse=True
    loads a finished run of this script, when there is one, instead of training (time from its log)."""
    run_dir = RUNS / f"{name}-{mode}"
    if reuse and (run_dir / "metrics.jsonl").is_file() and logged_steps(run_dir) == steps:
        return load_run(run_dir).model, logged_time(run_dir)
    base = base_config(name)
    dim = load_dataset(name, n_train=10, n_test=2).train.shape[1]
    if mode == "cd":  # CM's CD: Heun teacher steps on N = 18 intervals, EMA target mu = 0.95, squared L2
        loss_args, mu = {"mode": "cd", "teacher": spec, "n_steps": 18, "solver": "heun"}, 0.95
    else:  # iCT: N doubling 10 -> 320, lognormal n (P_mean shifted by log(sigma_data / 0.5)), 1/ds, pseudo-Huber
        loss_args, mu = {"mode": "ct", "curriculum": "improved", "n_steps": 10, "max_steps": 320, "index": "lognormal",
                         "p_mean": -1.1 + math.log(sigma_data / 0.5), "weighting": "inverse_gap",
                         "distance": "pseudo_huber", "huber_c": 0.007 * math.sqrt(dim)}, 0.0
    cfg = Config(**{**base, "name": f"{name}-{mode}", "loss": "consistency", "parametrization": "x0",
                    "sigma_data": sigma_data, "loss_args": loss_args, "steps": steps, "lr": 2e-3, "warmup": 100,
                    "lr_schedule": "cosine", "ema_decay": mu, "nfe": 1, "sampler": "consistency",
                    "checkpoint_every": steps})
    tic = time.perf_counter()
    tr = ConsistencyTrainer(cfg, resume=False).run()
    return tr.ema.copy(), time.perf_counter() - tic


def two_step_time(cm: ConsistencyModel, sde, ref: torch.Tensor, sigma_data: float) -> float:
    """The intermediate time of two-step sampling with the least W2 to training points `ref`."""
    g = torch.Generator().manual_seed(999)
    x_T = sde.prior_sample(ref.shape, generator=g)
    best = None
    for s in S_MID:
        t = float(sde.inverse_log_snr(-torch.log(torch.tensor(s * sigma_data, dtype=torch.float64))))
        if not sde.t_min < t < sde.T:
            continue
        value = w2(consistency_sample(cm, sde, x_T, times=torch.tensor([sde.T, t]), generator=g), ref)
        best = min(best or (math.inf, t), (value, t))
    return best[1]


def run_set(name: str, seeds: int, steps: int, reuse: bool = False) -> dict:
    torch.manual_seed(0)
    spec, teacher_s = teacher(name)
    cfg = Config(**base_config(name))
    data, sde = load_dataset(name, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed), build_sde(cfg)
    sigma_data = round(float(data.train.std()), 2)
    score = data.mixture.score_fn(sde) if spec == "exact" else load_run(spec).model.eval().requires_grad_(False)
    out: dict = {"set": name, "sde": type(sde).__name__,
                 "teacher": "exact score" if spec == "exact" else os.path.relpath(spec, REPO),
                 "teacher_train_s": round(teacher_s, 1), "sigma_data": sigma_data, "steps": steps}
    students = {m: student(name, m, spec, steps, sigma_data, reuse) for m in ("cd", "ct")}
    out["train_s"] = {m: round(s, 1) for m, (_, s) in students.items()}
    cms = {m: ConsistencyModel(model, sde, sigma_data) for m, (model, _) in students.items()}
    ref = data.train[-N:]
    t_mid = {m: two_step_time(cm, sde, ref, sigma_data) for m, cm in cms.items()}
    out["two_step_s_mid"] = {m: float(effective_sigma(sde, torch.tensor(t, dtype=torch.float64))) for m, t in t_mid.items()}
    test = data.test[:N]
    rows: dict[str, list[float]] = {}
    flow = []
    keep = {}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x_T = sde.prior_sample((N,) + data.sample_shape, generator=g,
                               dtype=torch.float64 if spec == "exact" else torch.float32)
        with torch.no_grad():
            for method in METHODS:
                for nfe in NFES:
                    try:
                        x = sample(sde, score, None, x_T=x_T, method=method, nfe=nfe, generator=g,
                                   **OPTIONS.get(method, {})).float()
                        rows.setdefault(f"{method}@{nfe}", []).append(w2(x, test))
                    except RuntimeError as err:  # dopri5 needs more evaluations at its tolerances
                        if method != "dopri5":
                            raise
                        rows.setdefault(f"{method}@{nfe}", []).append(math.nan)
                        print(f"{name} {method}@{nfe}: {err}", flush=True)
                    if (method, nfe) == ("dpm2m", 100):
                        ode = x
            for m, cm in cms.items():
                x1 = consistency_sample(cm, sde, x_T.float(), steps=1)
                x2 = consistency_sample(cm, sde, x_T.float(), times=torch.tensor([sde.T, t_mid[m]]), generator=g)
                rows.setdefault(f"{m}-1step", []).append(w2(x1, test))
                rows.setdefault(f"{m}-2step", []).append(w2(x2, test))
                if m == "cd":
                    flow.append(float((x1 - ode).pow(2).sum(1).mean().sqrt()))
                if seed == 0:
                    keep[m], keep[f"{m}-2"] = x1, x2
        if seed == 0:
            keep["ode"] = ode
        rows.setdefault("floor", []).append(w2(data.train[torch.randperm(len(data.train) - N, generator=g)[:N]], test))
    out["w2"] = {k: [float(np.nanmean(v)), float(np.nanstd(v))] for k, v in rows.items()}
    if data.mixture is not None:  # mean log p_0 of the samples under the true law: stray points show here
        logp = lambda x: float(data.mixture.log_prob(x.double()).mean())
        out["mean_log_p0"] = {"held-out data": logp(test), "teacher dpm2m@100": logp(keep["ode"]),
                              **{k: logp(keep[k]) for k in ("cd", "cd-2", "ct", "ct-2")}}
    out["cd_flow_rms"] = float(np.mean(flow))
    best = min((v[0], k) for k, v in out["w2"].items() if k.endswith("@100"))
    out["best_teacher_100"] = {"method": best[1], "w2": best[0]}
    out["ratios"] = {k: out["w2"][k][0] / best[0] for k in ("cd-1step", "cd-2step", "ct-1step", "ct-2step")}
    picture(name, test, keep, out)
    return out


def picture(name: str, test: torch.Tensor, keep: dict, out: dict) -> None:
    panels = [("held-out data", test), (f"teacher ODE, DPM-Solver++ 100 NFE", keep["ode"]),
              (f"CD, 1 step (W2 ratio {out['ratios']['cd-1step']:.2f})", keep["cd"]),
              (f"CT, 1 step (W2 ratio {out['ratios']['ct-1step']:.2f})", keep["ct"])]
    plt = common.plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), sharex=True, sharey=True)
    for ax, (title, x) in zip(axes, panels):
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
    fig.suptitle(f"{name}: one-step consistency samples beside the teacher"
                 + (" (first two coordinates)" if test.shape[1] > 2 else ""))
    common.save_figure(fig, NAME, f"consistency_{name}.png", dpi=90)


def table(out: dict) -> str:
    w = out["w2"]
    fmt = lambda k: f"{w[k][0]:.3f}" if not math.isnan(w[k][0]) else "n/a"
    lines = [f"### {out['set']} ({out['sde']}, teacher: {out['teacher']}, floor {w['floor'][0]:.3f})", "",
             "| sampler | NFE 10 | NFE 20 | NFE 100 |", "|---|---|---|---|"]
    lines += [f"| teacher PF-ODE {m} | " + " | ".join(fmt(f"{m}@{n}") for n in NFES) + " |" for m in METHODS]
    lines += ["", "| student | 1 step W2 (ratio) | 2 steps W2 (ratio) | train s |", "|---|---|---|---|"]
    for m in ("cd", "ct"):
        lines.append(f"| {m.upper()} | {fmt(f'{m}-1step')} ({out['ratios'][f'{m}-1step']:.2f}) | "
                     f"{fmt(f'{m}-2step')} ({out['ratios'][f'{m}-2step']:.2f}) | {out['train_s'][m]} |")
    if "mean_log_p0" in out:
        lines.append("\nmean log p_0 under the true mixture (seed 0): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in out["mean_log_p0"].items()))
    lines.append(f"\nbest teacher at 100 NFE: {out['best_teacher_100']['method']}; CD flow-map RMS error "
                 f"{out['cd_flow_rms']:.3f}; teacher training {out['teacher_train_s']} s")
    return "\n".join(lines)


def run(args) -> None:
    global RUNS, N
    RUNS, N = common.scratch_dir(NAME, DEFAULT_RUNS), args.n
    for name in args.sets.split(","):
        out = run_set(name, args.seeds, args.steps, args.reuse)
        common.write_json(NAME, out, file=f"consistency_{name}.json")
        print(table(out), flush=True)
