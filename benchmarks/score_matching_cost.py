"""Cost of one loss + backward step: implicit versus sliced (M = 1, 4) versus denoising score matching.

Claim under test (DESIGN section 3): the implicit loss needs d backward passes for the exact
divergence (one vector-Jacobian product per coordinate), sliced needs M, denoising none.
Setup: scoresde.networks.MLP(d, hidden=64, depth=2), batch 256, VP, float32, one thread;
each step is loss(...).mean().backward(). Times are medians over repetitions capped by a
per-cell time budget, as process CPU time (robust on a shared, oversubscribed machine) and
wall time. Slopes are least-squares fits of log(time) on log(d) over d >= 32.

Run: python -m benchmarks score-matching   (make bench-score-matching); outputs in
benchmarks/results/score-matching/.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from benchmarks import common
from scoresde.core.sde import VP
from scoresde.learning.losses import denoising_score_matching, implicit_score_matching, sliced_score_matching
from scoresde.learning.networks import MLP

NAME = "score-matching"
DIMS = (2, 8, 32, 128, 512, 1024)
BATCH = 256
HIDDEN, DEPTH = 64, 2
MAX_REPS, BUDGET_S = 5, 2.0
QUICK = dict(dims=[8, 32, 64], max_reps=1, budget_s=0.2)
METHODS = {
    "implicit": lambda f, sde, x, g: implicit_score_matching(f, sde, x, generator=g),
    "sliced M=1": lambda f, sde, x, g: sliced_score_matching(f, sde, x, generator=g, n_projections=1),
    "sliced M=4": lambda f, sde, x, g: sliced_score_matching(f, sde, x, generator=g, n_projections=4),
    "denoising": lambda f, sde, x, g: denoising_score_matching(f, sde, x, generator=g),
}


def add_arguments(p) -> None:
    p.add_argument("--dims", type=int, nargs="+", default=list(DIMS), help="dimensions d")
    p.add_argument("--max-reps", type=int, default=MAX_REPS, help="timed repetitions per cell at most")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-time budget per cell (s)")


def time_step(loss, model, sde, x0, g, max_reps: int = MAX_REPS, budget_s: float = BUDGET_S) -> tuple[float, float, int]:
    """Median wall and process-CPU seconds of loss + backward, and the number of timed steps: one warm-up
    step, then up to MAX_REPS within BUDGET_S (wall); a warm-up longer than BUDGET_S is the measurement."""
    wall: list[float] = []
    cpu: list[float] = []
    for i in range(max_reps + 1):
        model.zero_grad(set_to_none=True)
        w0, c0 = time.perf_counter(), time.process_time()
        loss(model, sde, x0, g).mean().backward()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        if i == 0 and wall[0] <= budget_s:
            wall.clear()
            cpu.clear()
        elif sum(wall) > budget_s:
            break
    return statistics.median(wall), statistics.median(cpu), len(wall)


def slope(dims, seconds) -> float:
    big = np.array(dims) >= 32
    return float(np.polyfit(np.log(np.array(dims)[big]), np.log(np.array(seconds)[big]), 1)[0])


def run(args) -> None:
    dims = tuple(args.dims)
    torch.manual_seed(0)
    sde, g = VP(), torch.Generator().manual_seed(0)
    wall: dict[str, list[float]] = {name: [] for name in METHODS}
    cpu: dict[str, list[float]] = {name: [] for name in METHODS}
    print("CPU ms (wall ms, timed reps) per loss + backward step")
    print("| d | " + " | ".join(METHODS) + " | implicit / sliced M=1 (CPU) |")
    print("|---" * (len(METHODS) + 2) + "|")
    for d in dims:
        model = MLP(d, hidden=HIDDEN, depth=DEPTH)
        x0 = torch.randn(BATCH, d, generator=g)
        cells = []
        for name, loss in METHODS.items():
            w, c, reps = time_step(loss, model, sde, x0, g, args.max_reps, args.budget_s)
            wall[name].append(w)
            cpu[name].append(c)
            cells.append(f"{c * 1e3:.1f} ({w * 1e3:.1f}, {reps})")
        ratio = cpu["implicit"][-1] / cpu["sliced M=1"][-1]
        print(f"| {d} | " + " | ".join(cells) + f" | {ratio:.0f} |", flush=True)
    slopes = {n: (slope(dims, cpu[n]), slope(dims, wall[n])) for n in METHODS}
    print("slopes of log time on log d, d >= 32 (CPU / wall): "
          + ", ".join(f"{n} {c:.2f} / {w:.2f}" for n, (c, w) in slopes.items()))
    ratio_slope = slope(dims, np.array(cpu["implicit"]) / np.array(cpu["sliced M=1"]))
    print(f"slope of implicit / sliced M=1 (CPU) on d, d >= 32: {ratio_slope:.2f}")
    common.write_json(NAME, {"dims": dims, "batch": BATCH, "hidden": HIDDEN, "depth": DEPTH, "cpu_s": cpu,
                             "wall_s": wall, "slopes_cpu_wall": slopes, "ratio_slope": ratio_slope})
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k, name in enumerate(METHODS):
        ax.loglog(dims, np.array(cpu[name]) * 1e3, "o-", color=f"C{k}", label=f"{name} (slope {slopes[name][0]:.2f})")
        ax.loglog(dims, np.array(wall[name]) * 1e3, ":", color=f"C{k}", alpha=0.5)
    ax.set_xlabel("dimension d")
    ax.set_ylabel("loss + backward, ms (batch 256; dotted: wall)")
    ax.set_title(f"score-matching cost, MLP {HIDDEN}x{DEPTH}, 1 CPU thread")
    ax.legend(fontsize=8)
    fig.tight_layout()
    print(f"wrote {common.save_figure(fig, NAME, 'score_matching_cost.png', dpi=120)}")
