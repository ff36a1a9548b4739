"""The automatic schedule's search size: its cost in score evaluations against the law of the samples it serves.

`auto_schedule(n_probe=...)` and `scoresde sample/evaluate --search-draws` shrink the search, whose cost is about
linear in its probe draws (2048 by default: 10-12e6 evaluations at NFE 5, 26-33e6 at NFE 10 on the held-out
mixtures, hours for an image model). Here, per target, method and NFE, the search at each size of `--sizes`, and
its schedule's samples from the x_T of `samplers --part heldout` (the same seeds, n and draws), scored as that part
scores them: EXACT_MEAN (`mmd2_paired_exact`: MMD^2 paired by x_T to the converged sampler from p_T's exact mean),
averaged over the x_T seeds. `--report` sets each beside the closest diffusers configuration and the method's fixed
grid, read from the `samplers_heldout-*.json` rows of the same targets and seeds (deterministic samplers from the
same x_T), as a table and a figure. No setting is chosen here: the default stays 2048 (search 12, chosen on the
selection targets of issue 22).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks import common
from benchmarks.samplers import (CONVERGED_NFE, EXACT_MEAN, F64, FIXED_ROWS, AUTO_ROWS, NAME as SAMPLERS, Scorer,
                                 MixtureScore, bandwidths, exact_shift, heldout_target, kernel_sums, paired_metrics,
                                 pool_seeds, value)
from scoresde.core.sde import VP
from scoresde.sampling import sample
from scoresde.sampling.schedule import N_PROBE, SEARCH, auto_schedule

NAME = "search-size"
SIZES = (256, 512, 1024, N_PROBE)
TARGETS = ("sing16s1702", "sing32s1703")  # fresh in session 45, where the 2048-draw schedules sat nearest 0.5x
QUICK = dict(sizes=[8, 16], targets=["d2s100"], nfes=[5], seeds=[1], n=200)


def study(tname: str, nfes: list[int], sizes: list[int], seeds: list[int], n: int, write) -> list[dict]:
    """Rows (target, method, nfe, draws, seed, EXACT_MEAN, gap, the search's evaluations and seconds) of each
    method of AUTO_ROWS at each nfe and search size; `write(rows)` after each search (a kill loses one)."""
    sde, target = VP(), heldout_target(tname)
    score_fn = MixtureScore(target).continuous(sde)
    h, cells = bandwidths(target)[:3], []
    for seed in seeds:  # the draws of samplers.heldout: the Scorer's, then x_T
        gen = torch.Generator().manual_seed(seed)
        scorer = Scorer(target, n, gen)
        x_T = sde.prior_sample((n, target.dim), gen, F64)
        y = sample(sde, score_fn, None, method="ipndm", nfe=CONVERGED_NFE, x_T=x_T + exact_shift(sde, target),
                   schedule="default")
        cells.append((seed, scorer, x_T, {EXACT_MEAN: (y, kernel_sums(y, y, h, F64))}))
    rows = []
    for method in AUTO_ROWS.values():
        for nfe in nfes:
            for draws in sizes:
                t0 = time.perf_counter()
                s = auto_schedule(sde, score_fn, (target.dim,), method=method, nfe=nfe, n_probe=draws, dtype=F64)
                cost = {"evaluations": s.evaluations, "seconds": round(time.perf_counter() - t0, 1),
                        "choice": s.choice, "search": SEARCH}
                for seed, scorer, x_T, refs in cells:
                    x = sample(sde, score_fn, None, method=method, nfe=nfe, x_T=x_T, schedule="default",
                               check_finite=False, **s.options)
                    rows.append({"target": tname, "method": method, "nfe": nfe, "draws": draws, "seed": seed, "n": n,
                                 "gap": scorer(x)["gap"], **paired_metrics(x, h, refs), **cost})
                print(rows[-1], flush=True)
                write(rows)
    return rows


def peer_rows(targets: list[str], n: int) -> list[dict]:
    """The heldout part's rows of these targets (seed means, `pool_seeds`)."""
    out = common.out_dir(SAMPLERS)
    rows = [r for f in sorted(out.glob("samplers_heldout-*.json")) for r in common.read_json(f)
            if r["target"] in targets and r["n"] == n and EXACT_MEAN in r]
    return pool_seeds(rows)


def report(rows: list[dict]) -> str:
    """Per target, method and NFE: each size's evaluations, seconds and seed-mean EXACT_MEAN, its ratio to the
    closest diffusers configuration and to the method's fixed grid (heldout rows), and a figure."""
    targets, n = sorted({r["target"] for r in rows}), rows[0]["n"]
    peers = peer_rows(targets, n)
    fixed_of = {m: FIXED_ROWS[a] for a, m in AUTO_ROWS.items()}
    lines = [f"search size: n = {n} samples per x_T seed, {EXACT_MEAN} (MMD^2 paired by x_T to the converged sampler "
             "from p_T's exact mean) averaged over the seeds; peer: the closest diffusers configuration of "
             "`samplers --part heldout` on the same x_T\n",
             "| target | method | NFE | probe draws | evaluations | seconds | seeds | MMD^2 | / peer | / fixed grid |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fig_rows = {}
    for t in targets:
        for method in AUTO_ROWS.values():
            for nfe in sorted({r["nfe"] for r in rows}):
                cell = [r for r in peers if r["target"] == t and r["nfe"] == nfe]
                peer = min((r for r in cell if r["config"].startswith("diffusers/")),
                           key=lambda r: value(r, EXACT_MEAN), default=None)
                fixed = next((r for r in cell if r["config"] == fixed_of[method]), None)
                for draws in sorted({r["draws"] for r in rows}):
                    rs = [r for r in rows
                          if (r["target"], r["method"], r["nfe"], r["draws"]) == (t, method, nfe, draws)]
                    if not rs:
                        continue
                    m = float(np.mean([r[EXACT_MEAN] for r in rs]))
                    vs = [m / value(ref, EXACT_MEAN) if ref else float("nan") for ref in (peer, fixed)]
                    fig_rows.setdefault((t, nfe), {}).setdefault(method, []).append((rs[0]["evaluations"], m))
                    lines.append(f"| {t} | {method} | {nfe} | {draws} | {rs[0]['evaluations']:.2e} | "
                                 f"{rs[0]['seconds']:.0f} | {len(rs)} | {m:.2e} | {vs[0]:.2f} | {vs[1]:.2f} |")
                if peer is not None:
                    fig_rows.setdefault((t, nfe), {})["peer"] = (peer["config"][10:], value(peer, EXACT_MEAN))
    _figure(fig_rows)
    return "\n".join(lines)


def _figure(cells: dict) -> None:
    """One panel per target (rows) and NFE (columns): each method's MMD^2 against the search's evaluations."""
    plt = common.plt()
    targets, nfes = sorted({t for t, _ in cells}), sorted({nfe for _, nfe in cells})
    fig, axes = plt.subplots(len(targets), len(nfes), figsize=(4.5 * len(nfes), 2.8 * len(targets)), squeeze=False)
    for (t, nfe), curves in cells.items():
        ax = axes[targets.index(t)][nfes.index(nfe)]
        for method, pts in curves.items():
            if method != "peer":
                ax.loglog(*zip(*pts), "o-", label=f"{method} (automatic)")
        if "peer" in curves:
            name, v = curves["peer"]
            ax.axhline(0.5 * v, ls="--", c="k", lw=1, label=f"0.5 x {name}")
        ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax.set_title(f"{t}, NFE {nfe}", fontsize=9)
        ax.set_xlabel("search cost (score evaluations)", fontsize=8)
        ax.set_ylabel(EXACT_MEAN, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    common.save_figure(fig, NAME, "search_size.png", dpi=110)


def add_arguments(ap) -> None:
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), help="held-out targets (samplers.heldout_target)")
    ap.add_argument("--sizes", type=common.positive_int, nargs="+", default=list(SIZES), help="probe draws (n_probe)")
    ap.add_argument("--nfes", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="x_T seeds (those of --part heldout)")
    ap.add_argument("--n", type=int, default=4000, help="samples per x_T seed (the heldout part's)")
    ap.add_argument("--report", action="store_true", help="the table and figure of every run's rows")


def run_tag(args) -> str:
    return "report" if args.report else "-".join(args.targets)


def run(args) -> None:
    out = common.out_dir(NAME)
    if args.report:
        rows = [r for f in sorted(out.glob("search_size-*.json")) for r in common.read_json(f)]
        text = report(rows)
        common.write_text(NAME, "search_size.md", text)
        print(text)
        return
    for t in args.targets:
        study(t, args.nfes, args.sizes, args.seeds, args.n,
              lambda rows, t=t: common.write_json(NAME, rows, file=f"search_size-{t}.json", indent=None))
