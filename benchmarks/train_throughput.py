"""Training throughput of scoresde's Trainer against a bare PyTorch loop of the same network and batch.

The bare loop: index a batch, draw t ~ U(t_min, T) and noise, form x_t, eps-loss |sigma s + z|^2, AdamW
step; nothing else. The Trainer adds what a real run needs: seeded batch/time/noise generators that
survive checkpoints, the loss's input checks, the learning-rate schedule, gradient clipping, an EMA
update, the finite-loss guard and JSONL logging (every 50 steps; no evaluation, no checkpoint inside
the timed window, progress bar off). Both are timed in alternating rounds on the same machine state;
the table reports medians and overhead = loop / bare - 1.

Run: python -m benchmarks train  (make bench-train); outputs in benchmarks/results/train/.
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from benchmarks import common
from scoresde.running.build import build_model, build_sde
from scoresde.running.config import Config
from scoresde.running.train import Trainer

NAME = "train"
CASES = [  # name, config overrides, steps per round
    ("MLP 128x3, 2-D moons, batch 256 (demo)", dict(data="moons", net_args={"hidden": 128, "depth": 3}, batch_size=256), 300),
    ("MLP 512x4, 16-D mixture, batch 1024", dict(data="mixture16", net_args={"hidden": 512, "depth": 4}, batch_size=1024), 40),
    ("U-Net 32 (1,2,2)+attn, 16x16 digits, batch 64",
     dict(data="digits", pad_to=16, n_test=200, net="unet", net_args={"base": 32, "mults": [1, 2, 2], "attention": True},
          batch_size=64), 10),
]
ROUNDS = 5
QUICK = dict(rounds=1, steps=2)


def add_arguments(p) -> None:
    p.add_argument("--rounds", type=int, default=ROUNDS, help="alternating timed rounds per case")
    p.add_argument("--steps", type=int, default=0, help="steps per round for every case (0: each case's own)")


def trainer_round(tr: Trainer, steps: int) -> float:
    start = tr.step
    tic = time.perf_counter()
    tr.run(until=start + steps)
    return (time.perf_counter() - tic) / steps


def bare_setup(cfg: Config, data: torch.Tensor):
    torch.manual_seed(cfg.seed)
    sde = build_sde(cfg)
    model = build_model(cfg, sde, tuple(data.shape[1:]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def round_(steps: int) -> float:
        tic = time.perf_counter()
        for _ in range(steps):
            x0 = data[torch.randint(data.shape[0], (cfg.batch_size,))]
            t = sde.t_min + (sde.T - sde.t_min) * torch.rand(cfg.batch_size)
            z = torch.randn_like(x0)
            sigma = sde.sigma(t).reshape(-1, *([1] * (x0.dim() - 1)))
            xt = sde.alpha(t).reshape(sigma.shape) * x0 + sigma * z
            loss = (sigma * model(xt, t) + z).pow(2).flatten(1).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - tic) / steps

    return round_


def run(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, over, steps in CASES:
            steps = args.steps or steps
            cfg = Config(**{"name": "bench", "out": tmp, "steps": 10**9, "eval_every": 0, "checkpoint_every": 10**9,
                            "progress": False, "log_every": 50, **over})
            tr = Trainer(cfg, resume=False)
            bare = bare_setup(cfg, tr.train_x)
            trainer_round(tr, 3), bare(3)  # warm-up
            loop_t, bare_t = [], []
            for _ in range(args.rounds):
                loop_t.append(trainer_round(tr, steps))
                bare_t.append(bare(steps))
            lo, ba = statistics.median(loop_t), statistics.median(bare_t)
            ratios = [a / b - 1 for a, b in zip(loop_t, bare_t)]
            rows.append((name, ba * 1e3, lo * 1e3, 100 * (lo / ba - 1), 100 * min(ratios), 100 * max(ratios)))
            print(f"{name}: bare {ba * 1e3:.2f} ms/step, Trainer {lo * 1e3:.2f} ms/step, overhead "
                  f"{rows[-1][3]:+.1f}% (rounds {rows[-1][4]:+.1f}% .. {rows[-1][5]:+.1f}%)", flush=True)
    print("\n| case | bare loop (ms/step) | Trainer (ms/step) | overhead (median) | per-round range |")
    print("|---|---|---|---|---|")
    for name, ba, lo, ov, omin, omax in rows:
        print(f"| {name} | {ba:.2f} | {lo:.2f} | {ov:+.1f}% | {omin:+.1f}% .. {omax:+.1f}% |")
    common.write_json(NAME, {"rounds": args.rounds, "columns": ["case", "bare_ms", "trainer_ms", "overhead_pct",
                                                                 "round_min_pct", "round_max_pct"], "rows": rows})
    print(f"\nfigure: {plot(rows)}")


def plot(rows):
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r[1] for r in rows], height=0.4, label="bare PyTorch loop")
    ax.barh([i - 0.2 for i in y], [r[2] for r in rows], height=0.4, label="scoresde Trainer")
    for i, r in enumerate(rows):
        ax.text(max(r[1], r[2]) * 1.02, i, f"{r[3]:+.0f}%", va="center")
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per training step (1 thread, log scale)")
    ax.legend(fontsize=8)
    return common.save_figure(fig, NAME, "train_throughput.png", dpi=110)
