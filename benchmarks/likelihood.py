"""Probability-flow likelihood: accuracy against NFE, and exact versus Hutchinson divergence cost.

1. On random_mixture(16, 8, seed=0) with its exact score, the mean absolute error of
   log_likelihood against the exact log p_{t_min}(x) (nats/dim), and the NFE, against the
   tolerance of the adaptive solver (rtol = atol), for VP and VE, in time variables t and
   log-SNR, for dopri5 (and bosh3 / dopri8 for comparison).
2. Wall time of one solve (minimum of 3) with exact and Hutchinson (Rademacher, 1 probe)
   divergence as the dimension grows (random_mixture(d, 8), VP, batch 16, rtol = atol = 1e-3);
   exact only up to d = 128 (it costs d backward passes per evaluation).

Run: python -m benchmarks likelihood   (make bench-likelihood); outputs in benchmarks/results/likelihood/.
"""
from __future__ import annotations

import time

import torch

from benchmarks import common
from scoresde.core import sde as S
from scoresde.core.targets import random_mixture
from scoresde.sampling.likelihood import log_likelihood

NAME = "likelihood"
TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
GOAL = 0.005  # nats/dim
CONFIGS = (("dopri5", "t"), ("dopri5", "log_snr"), ("bosh3", "t"), ("dopri8", "t"))
DIMS = (2, 8, 32, 128, 512)
QUICK = dict(n=8, tols=[1e-1, 1e-2], dims=[2, 8], repeats=1)


def add_arguments(p) -> None:
    p.add_argument("--n", type=int, default=64, help="samples of the accuracy sweep")
    p.add_argument("--tols", type=float, nargs="+", default=list(TOLS), help="rtol = atol values of the sweep")
    p.add_argument("--dims", type=int, nargs="+", default=list(DIMS), help="dimensions of the divergence-cost study")
    p.add_argument("--repeats", type=int, default=3, help="solves per cell of the cost study (minimum wall time)")


def accuracy_sweep(n: int = 64, tols=TOLS) -> list[dict]:
    mix = random_mixture(16, 8, seed=0)
    x = mix.sample(n, torch.Generator().manual_seed(0))
    rows = []
    for sde in (S.VP(), S.VE()):
        exact = mix.at_time(sde, sde.t_min).log_prob(x)
        for solver, tv in CONFIGS:
            for tol in tols:
                t0 = time.perf_counter()
                logp, info = log_likelihood(sde, mix.score_fn(sde), x, solver=solver, rtol=tol, atol=tol,
                                            time_variable=tv)
                wall = time.perf_counter() - t0
                ode = mix.at_time(sde, sde.T).log_prob(info["x_T"]) + info["delta_logp"]
                rows.append(dict(sde=type(sde).__name__, solver=solver, tv=tv, tol=tol, nfe=info["nfe"],
                                 err=float((logp - exact).abs().mean()) / 16,
                                 ode_err=float((ode - exact).abs().mean()) / 16, wall=wall))
                r = rows[-1]
                print(f"| {r['sde']} | {solver} | {tv} | {tol:.0e} | {r['nfe']} | {r['err']:.2e} | "
                      f"{r['ode_err']:.2e} | {wall:.2f} |", flush=True)
    return rows


def divergence_cost(dims=DIMS, n: int = 16, repeats: int = 3) -> list[dict]:
    rows = []
    sde = S.VP()
    for d in dims:
        mix = random_mixture(d, 8, seed=0)
        x = mix.sample(n, torch.Generator().manual_seed(0))
        exact = mix.at_time(sde, sde.t_min).log_prob(x)
        for div in ("exact", "hutchinson-rademacher"):
            if div == "exact" and d > 128:
                continue
            walls = []
            for _ in range(repeats):  # the minimum over repeats filters out load from other processes
                t0 = time.perf_counter()
                logp, info = log_likelihood(sde, mix.score_fn(sde), x, divergence=div, rtol=1e-3, atol=1e-3,
                                            generator=torch.Generator().manual_seed(1))
                walls.append(time.perf_counter() - t0)
            wall = min(walls)
            rows.append(dict(d=d, div=div, nfe=info["nfe"], wall=wall, per_nfe=wall / info["nfe"],
                             err=float((logp - exact).abs().mean()) / d,
                             sd=float((logp - exact).std()) / d))
            r = rows[-1]
            print(f"| {d} | {div} | {r['nfe']} | {wall:.2f} | {1e3 * r['per_nfe']:.1f} | {r['err']:.2e} | "
                  f"{r['sd']:.2e} |", flush=True)
    return rows


def plot(acc: list[dict], cost: list[dict]) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, name in zip(axes, ("VP", "VE")):
        for (solver, tv), style in zip(CONFIGS, ("o-", "s-", "^:", "v:")):
            rs = [r for r in acc if r["sde"] == name and r["solver"] == solver and r["tv"] == tv]
            ax.loglog([r["nfe"] for r in rs], [r["err"] for r in rs], style, label=f"{solver}, {tv}")
        ax.axhline(GOAL, color="k", lw=0.8, ls="--", label="goal 0.005")
        ax.set_title(f"{name}, 16-D mixture, exact score")
        ax.set_xlabel("NFE")
    axes[0].set_ylabel("mean |log p error| (nats/dim)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, NAME, "likelihood_error_vs_nfe.png", dpi=120)
    fig, ax = plt.subplots(figsize=(5, 4))
    for div, style in (("exact", "o-"), ("hutchinson-rademacher", "s-")):
        rs = [r for r in cost if r["div"] == div]
        ax.loglog([r["d"] for r in rs], [r["per_nfe"] * 1e3 for r in rs], style, label=div)
    ax.set_xlabel("dimension d")
    ax.set_ylabel("ms per score evaluation (batch 16)")
    ax.set_title("divergence cost, VP, 1 thread")
    ax.legend()
    fig.tight_layout()
    common.save_figure(fig, NAME, "likelihood_divergence_cost.png", dpi=120)


def run(args) -> None:
    print("| SDE | solver | time variable | rtol = atol | NFE | err (nats/dim) | ODE-only err | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    acc = accuracy_sweep(args.n, args.tols)
    for name in ("VP", "VE"):
        ok = [r for r in acc if r["sde"] == name and r["err"] < GOAL]
        if not ok:
            print(f"{name}: no tolerance reaches error < {GOAL} nats/dim")
            continue
        best = min(ok, key=lambda r: r["nfe"])
        print(f"{name}: smallest NFE with error < {GOAL} nats/dim: {best['nfe']} "
              f"({best['solver']}, {best['tv']}, tol {best['tol']:.0e}, err {best['err']:.2e})")
    print("\n| d | divergence | NFE | wall (s) | ms / NFE | mean abs err (nats/dim) | sd of err (nats/dim) |")
    print("|---|---|---|---|---|---|---|")
    cost = divergence_cost(args.dims, repeats=args.repeats)
    common.write_json(NAME, {"goal_nats_per_dim": GOAL, "accuracy": acc, "divergence_cost": cost})
    plot(acc, cost)
