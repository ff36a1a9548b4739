"""The default ODE tolerance of `log_likelihood`: the tail error of the probability-flow likelihood.

On analytic Gaussian mixtures with their exact score, log p_t is exact at every t, so the
solver's error alone is |log p_T(x_T) + int div f~ - log p_{t_min}(x)| (the prior mismatch
is removed by using the exact p_T in place of the prior). Each batch holds 48 typical points
(samples of the mixture) and 16 tail points x = mu_k + s L_k z (z ~ N(0, I), L_k L_k^T = the
component covariance, s = 3 and 4: 3-4 component standard deviations in every coordinate), so
the tail points share the adaptive step control with a typical batch, as in an evaluation.
dopri5, time variable t, rtol = atol, float64, VP and VE; worst and mean absolute error (nats
per point) and NFE per tolerance.

The default is the loosest tolerance whose worst tail error is below GOAL on the "choose"
targets (ring, random_mixture(16, 8, seed=0)); the held-out targets (grid, random_mixture(8, 4,
seed=1)) confirm it.

Run: python -m benchmarks likelihood-tolerance (make bench-likelihood-tolerance).
Writes benchmarks/results/likelihood-tolerance/likelihood_tolerance.json and .md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from benchmarks import common
from scoresde.core import sde as S
from scoresde.core.targets import GaussianMixture, grid, random_mixture, ring
from scoresde.sampling.likelihood import log_likelihood

NAME = "likelihood-tolerance"
TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
GOAL = 0.01  # nats per point
SETS = {"choose": {"ring": ring(), "mixture16": random_mixture(16, 8, seed=0)},
        "held_out": {"grid": grid(), "mixture8": random_mixture(8, 4, seed=1)}}


def points(mix: GaussianMixture, n_typical: int = 48, n_tail: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n_typical samples, then n_tail points at s = 3 and n_tail at s = 4; a mask of the tail points."""
    g = torch.Generator().manual_seed(seed)
    typical = mix.sample(n_typical, g)
    k = torch.randint(0, mix.means.shape[0], (2 * n_tail,), generator=g)
    s = torch.tensor([3.0] * n_tail + [4.0] * n_tail, dtype=torch.float64)
    z = torch.randn(2 * n_tail, mix.dim, generator=g, dtype=torch.float64)
    chol = torch.linalg.cholesky(mix.covariances[k])
    tail = mix.means[k] + s[:, None] * (chol @ z[..., None])[..., 0]
    mask = torch.cat([torch.zeros(n_typical, dtype=torch.bool), torch.ones(2 * n_tail, dtype=torch.bool)])
    return torch.cat([typical, tail]), mask


def measure(tols=TOLS, n_typical: int = 48, n_tail: int = 8) -> list[dict]:
    rows = []
    for split, targets in SETS.items():
        for name, mix in targets.items():
            x, tail = points(mix, n_typical, n_tail)
            for sde in (S.VP(), S.VE()):
                exact = mix.at_time(sde, sde.t_min).log_prob(x)
                for tol in tols:
                    _, info = log_likelihood(sde, mix.score_fn(sde), x, rtol=tol, atol=tol)
                    err = (mix.at_time(sde, sde.T).log_prob(info["x_T"]) + info["delta_logp"] - exact).abs()
                    rows.append({"split": split, "target": name, "dim": mix.dim, "sde": type(sde).__name__,
                                 "tol": tol, "nfe": info["nfe"], "tail_max": float(err[tail].max()),
                                 "tail_mean": float(err[tail].mean()), "typical_max": float(err[~tail].max())})
                    r = rows[-1]
                    print(f"| {split} | {name} | {r['sde']} | {tol:.0e} | {r['nfe']} | {r['tail_max']:.2e} | "
                          f"{r['tail_mean']:.2e} | {r['typical_max']:.2e} |", flush=True)
    return rows


def choose(rows: list[dict], split: str) -> float | None:
    """The loosest tolerance whose worst tail error over the split's targets and SDEs is below GOAL."""
    ok = [tol for tol in sorted({r["tol"] for r in rows}) if all(r["tail_max"] < GOAL for r in rows if r["split"] == split and r["tol"] == tol)]
    return max(ok) if ok else None


QUICK = dict(tols=[1e-3, 1e-4], n_typical=8, n_tail=2)


def add_arguments(p) -> None:
    p.add_argument("--tols", type=float, nargs="+", default=list(TOLS), help="rtol = atol values")
    p.add_argument("--n-typical", type=int, default=48, help="typical points per batch")
    p.add_argument("--n-tail", type=int, default=8, help="tail points per batch at s = 3 and at s = 4 each")


def run(args) -> None:
    rows = measure(args.tols, args.n_typical, args.n_tail)
    chosen, held = choose(rows, "choose"), choose(rows, "held_out")
    common.write_json(NAME, {"goal_nats": GOAL, "chosen": chosen, "held_out_loosest": held, "rows": rows},
                      file="likelihood_tolerance.json")
    lines = ["| split | target | d | SDE | rtol = atol | NFE | tail max | tail mean | typical max |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['split']} | {r['target']} | {r['dim']} | {r['sde']} | {r['tol']:.0e} | {r['nfe']} | "
              f"{r['tail_max']:.1e} | {r['tail_mean']:.1e} | {r['typical_max']:.1e} |" for r in rows]
    lines.append(f"\nchosen (worst tail error < {GOAL} nats on the choose set): {chosen}; "
                 f"loosest passing on the held-out set: {held}")
    common.write_text(NAME, "likelihood_tolerance.md", "\n".join(lines))
    print("\n".join(lines[-1:]))
