"""Training throughput: scoresde's Trainer against a bare loop, and its U-Net against diffusers' UNet2DModel.

The bare loop: index a batch, draw t ~ U(t_min, T) and noise, form x_t, eps-loss |sigma s + z|^2, AdamW
step; nothing else. "bare + EMA + clipping" adds by hand the two things every diffusion training loop
does and the Trainer does too: clip_grad_norm_ at the same norm and a foreach EMA update with the same
warm-up schedule; it is the reference of the overhead. The Trainer adds the bookkeeping a real run needs:
seeded batch/time/noise generators that survive checkpoints, the loss's input checks and weighting, the
learning-rate schedule, the finite-loss guard and JSONL logging (every 50 steps; no evaluation, no
checkpoint inside the timed window, progress bar off). The three are timed in alternating rounds on the
same machine state; the table reports medians, overhead = Trainer / (bare + EMA + clipping) - 1 and,
beside it, Trainer / bare - 1.

The U-Net part times one training step (forward, eps-loss, backward, AdamW step) of scoresde's UNet and
of diffusers' UNet2DModel built as its twin (`diffusers_twin`: same widths, residual blocks per level,
attention levels and middle attention, so the same parameter count; diffusers' defaults otherwise) in
both memory formats diffusers documents (contiguous, channels-last), on the same random batch, fp32 and
bf16 (torch.autocast on the CPU), alternating the three round by round after a warm-up; the table reports
medians and the ratio scoresde / the faster diffusers format (below 1: scoresde faster).

Run: python -m benchmarks train [--part trainer unet] (make bench-train); outputs in benchmarks/results/train/.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from typing import Callable

import torch
from torch import nn

from benchmarks import common
from scoresde.learning.networks import UNet
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
    ("U-Net 64 (1,2,2)x2, attn 7x7 + mid (configs/unet28.yaml), 28x28 digits, batch 16",
     dict(data="digits", pad_to=28, n_test=200, net="unet", batch_size=16,
          net_args={"base": 64, "mults": [1, 2, 2], "num_res": 2, "attention": True, "attention_levels": [2]}), 3),
]
# the U-Net against diffusers: px -> (channels, batch, UNet arguments = configs/unet28.yaml, unet64.yaml)
UNET_CASES = {
    28: (1, 16, dict(base=64, mults=(1, 2, 2), num_res=2, attention=True, attention_levels=(2,))),
    64: (3, 8, dict(base=64, mults=(1, 2, 2, 4), num_res=2, attention=True, attention_levels=(2, 3))),
}
UNET_STEPS = 2
ROUNDS = 5
QUICK = dict(rounds=1, steps=2)


def add_arguments(p) -> None:
    p.add_argument("--rounds", type=int, default=ROUNDS, help="alternating timed rounds per case")
    p.add_argument("--steps", type=int, default=0, help="steps per round for every case (0: each case's own)")
    p.add_argument("--part", nargs="+", choices=["trainer", "unet"], default=["trainer", "unet"],
                   help="trainer: the Trainer against a bare loop; unet: scoresde's U-Net against diffusers'")


def diffusers_twin(channels: int, px: int, base: int, mults, num_res: int, attention: bool,
                   attention_levels=(), groups: int = 8) -> nn.Module:
    """diffusers' UNet2DModel with the widths, blocks per level, attention and GroupNorm groups of scoresde's
    UNet(channels, base, mults, num_res, attention, attention_levels, groups): the same parameter count (diffusers'
    defaults otherwise). The groups matter at small widths: diffusers' default of 32 groups on 32 channels is a
    per-channel (instance) norm, which cost its twin most of its sample quality on MNIST at base 32."""
    from diffusers import UNet2DModel

    levels = range(len(mults))
    return UNet2DModel(sample_size=px, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(base * m for m in mults), layers_per_block=num_res,
                       down_block_types=tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D"
                                              for i in levels),
                       up_block_types=tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D"
                                            for i in reversed(levels)), add_attention=attention,
                       norm_num_groups=math.gcd(groups, base))  # as scoresde's _norm: gcd(groups, channels)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def step_timer(net: nn.Module, call: Callable, batch: tuple, device: str = "cpu") -> Callable[[int, str], float]:
    """round_(steps, precision) -> seconds per training step of `net` (fp32 or bf16 autocast) on `batch`."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t, z = batch

    def round_(steps: int, precision: str) -> float:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        tic = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device, torch.bfloat16, enabled=precision != "fp32"):
                out = call(x, t)
            loss = (out.float() - z).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        return (time.perf_counter() - tic) / steps

    return round_


def unet_timers(channels: int, px: int, batch: int, args: dict) -> tuple[int, int, dict[str, Callable]]:
    """Parameter counts of scoresde's UNet and its diffusers twin, and step timers on one seeded random batch:
    "scoresde", and diffusers' twin in both memory formats its documentation offers ("contiguous", "channels-last")."""
    torch.manual_seed(0)
    ours = UNet(channels=channels, **args)
    twins = {fmt: diffusers_twin(channels, px, **args).to(memory_format=mf)
             for fmt, mf in (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last))}
    g = torch.Generator().manual_seed(1)
    x, z = (torch.randn(batch, channels, px, px, generator=g) for _ in range(2))
    t = 1e-3 + torch.rand(batch, generator=g)
    timers = {"scoresde": step_timer(ours, ours, (x, t, z))}
    for fmt, net in twins.items():
        xf = x.contiguous(memory_format=torch.channels_last) if fmt == "channels-last" else x
        timers[fmt] = step_timer(net, lambda x, t, net=net: net(x, t * 999).sample, (xf, t, z))
    return n_params(ours), n_params(twins["contiguous"]), timers


def run_unet(args) -> list:
    """Per size and precision: scoresde against the faster of diffusers' two memory formats (medians of rounds
    alternating the three)."""
    rows = []
    for px, (channels, batch, net_args) in UNET_CASES.items():
        if common.quick():
            batch, net_args = 2, {**net_args, "base": 8}
        pa, pb, timers = unet_timers(channels, px, batch, net_args)
        if abs(pa / pb - 1) > 0.1:
            raise RuntimeError(f"the twins differ by more than 10% in parameters: {pa} against {pb}")
        steps = args.steps or UNET_STEPS
        for precision in ("fp32", "bf16"):
            times: dict[str, list[float]] = {k: [] for k in timers}
            for f in timers.values():
                f(1, precision)  # warm-up
            for _ in range(args.rounds):
                for k, f in timers.items():
                    times[k].append(f(steps, precision))
            med = {k: statistics.median(v) for k, v in times.items()}
            fmt = min(("contiguous", "channels-last"), key=med.get)
            ma, mb = med["scoresde"], med[fmt]
            ratios = [u / v for u, v in zip(times["scoresde"], times[fmt])]
            rows.append((px, channels, batch, precision, pa, pb, ma * 1e3, mb * 1e3, fmt, ma / mb, min(ratios),
                         max(ratios), {k: v * 1e3 for k, v in med.items()}))
            print(f"{px} px, batch {batch}, {precision}: scoresde {ma * 1e3:.0f} ms/step ({pa / 1e6:.2f}M params), "
                  f"diffusers " + ", ".join(f"{k} {med[k] * 1e3:.0f}" for k in ("contiguous", "channels-last")) +
                  f" ms/step ({pb / 1e6:.2f}M), ratio to the faster {ma / mb:.3f}", flush=True)
    print("\n| size | batch | precision | scoresde params | diffusers params | scoresde (ms/step) | diffusers (ms/step, "
          "faster format) | scoresde / diffusers (median) | per-round range |")
    print("|---|---|---|---|---|---|---|---|---|")
    for px, ch, batch, prec, pa, pb, ma, mb, fmt, r, rmin, rmax, _ in rows:
        print(f"| {px}x{px}x{ch} | {batch} | {prec} | {pa / 1e6:.2f}M | {pb / 1e6:.2f}M | {ma:.0f} | {mb:.0f} ({fmt}) "
              f"| {r:.3f} | {rmin:.3f} .. {rmax:.3f} |")
    return rows


def trainer_round(tr: Trainer, steps: int) -> float:
    start = tr.step
    tic = time.perf_counter()
    tr.run(until=start + steps)
    return (time.perf_counter() - tic) / steps


def bare_setup(cfg: Config, data: torch.Tensor, ema_and_clip: bool):
    """A hand-written loop: batch, t, noise, eps-loss, AdamW; with `ema_and_clip` also what every diffusion
    training loop does by hand, the same gradient clipping and the same EMA warm-up schedule as the Trainer."""
    torch.manual_seed(cfg.seed)
    sde = build_sde(cfg)
    model = build_model(cfg, sde, tuple(data.shape[1:]))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    shadow = [p.detach().clone() for p in params]
    updates = 0

    def round_(steps: int) -> float:
        nonlocal updates
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
            if ema_and_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ema_and_clip:
                with torch.no_grad():
                    torch._foreach_lerp_(shadow, params, (1 + updates / cfg.ema_gamma) ** -cfg.ema_power)
                updates += 1
        return (time.perf_counter() - tic) / steps

    return round_


def run(args) -> None:
    out = {"rounds": args.rounds, "threads": torch.get_num_threads()}
    if "trainer" in args.part:
        out.update(run_trainer(args))
    if "unet" in args.part:
        out["unet_columns"] = ["px", "channels", "batch", "precision", "scoresde_params", "diffusers_params",
                               "scoresde_ms", "diffusers_ms", "diffusers_format", "ratio", "round_min_ratio",
                               "round_max_ratio", "median_ms"]
        out["unet_rows"] = run_unet(args)
    common.write_json(NAME, out, file=f"{NAME}_{'_'.join(args.part)}.json")


def run_tag(args) -> str:
    return "" if set(args.part) == {"trainer", "unet"} else "-".join(args.part)


def run_trainer(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, over, steps in CASES:
            steps = args.steps or steps
            cfg = Config(**{"name": "bench", "out": tmp, "steps": 10**9, "eval_every": 0, "checkpoint_every": 10**9,
                            "progress": False, "log_every": 50, **over})
            tr = Trainer(cfg, resume=False)
            timers = {"bare": bare_setup(cfg, tr.train_x, False), "same": bare_setup(cfg, tr.train_x, True),
                      "trainer": lambda n, tr=tr: trainer_round(tr, n)}
            times: dict[str, list[float]] = {k: [] for k in timers}
            for f in timers.values():
                f(3)  # warm-up
            for _ in range(args.rounds):
                for k, f in timers.items():
                    times[k].append(f(steps))
            ba, sa, lo = (statistics.median(times[k]) for k in timers)
            ratios = [a / b - 1 for a, b in zip(times["trainer"], times["same"])]
            rows.append((name, ba * 1e3, sa * 1e3, lo * 1e3, 100 * (lo / sa - 1), 100 * min(ratios),
                         100 * max(ratios), 100 * (lo / ba - 1)))
            print(f"{name}: bare {ba * 1e3:.2f}, bare + EMA + clipping {sa * 1e3:.2f}, Trainer {lo * 1e3:.2f} ms/step; "
                  f"overhead {rows[-1][4]:+.1f}% (rounds {rows[-1][5]:+.1f}% .. {rows[-1][6]:+.1f}%), "
                  f"{rows[-1][7]:+.1f}% against the bare loop", flush=True)
    print("\n| case | bare loop (ms/step) | bare + EMA + clipping (ms/step) | Trainer (ms/step) | overhead against "
          "bare + EMA + clipping (median) | per-round range | against the bare loop |")
    print("|---|---|---|---|---|---|---|")
    for name, ba, sa, lo, ov, omin, omax, ob in rows:
        print(f"| {name} | {ba:.2f} | {sa:.2f} | {lo:.2f} | {ov:+.1f}% | {omin:+.1f}% .. {omax:+.1f}% | {ob:+.1f}% |")
    print(f"\nfigure: {plot(rows)}")
    return {"columns": ["case", "bare_ms", "bare_ema_clip_ms", "trainer_ms", "overhead_pct", "round_min_pct",
                        "round_max_pct", "overhead_vs_bare_pct"], "rows": rows}


def plot(rows):
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    y = range(len(rows))
    ax.barh([i + 0.27 for i in y], [r[1] for r in rows], height=0.27, label="bare PyTorch loop")
    ax.barh(list(y), [r[2] for r in rows], height=0.27, label="bare + EMA + clipping")
    ax.barh([i - 0.27 for i in y], [r[3] for r in rows], height=0.27, label="scoresde Trainer")
    for i, r in enumerate(rows):
        ax.text(max(r[1:4]) * 1.02, i, f"{r[4]:+.0f}%", va="center")
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per training step (1 thread, log scale)")
    ax.legend(fontsize=8)
    return common.save_figure(fig, NAME, "train_throughput.png", dpi=110)
