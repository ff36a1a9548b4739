"""GPU throughput: scoresde's U-Net training and sampling against diffusers' UNet2DModel + schedulers, equal parameters.

32x32x3 random images (nothing is downloaded), batch 128, the network of configs/unet32.yaml and its
diffusers twin (`train_throughput.diffusers_twin`: same widths, blocks, attention, parameter count).
Training: scoresde's ScoreModel with its denoising loss (as the Trainer computes it) against diffusers'
loop (DDPMScheduler.add_noise, MSE on the noise), AdamW for both, in fp32, bf16 (autocast) and
bf16 + torch.compile; diffusers' twin runs in both memory formats its documentation offers (contiguous,
channels-last) and the faster is the comparison; rounds alternate between the three after a warm-up;
images/s from the median round.
Sampling: NFE 10 (scoresde dpm2m through `sampling.sample`; diffusers DPMSolverMultistepScheduler), fp32
and bf16. Peak GPU memory of a step above what was resident; torch, CUDA and device recorded.

Needs CUDA (about 5 minutes on one GPU); --quick runs a tiny version on the CPU without compile, a smoke
test of the code path whose numbers mean nothing. Run: python -m benchmarks gpu; outputs in benchmarks/results/gpu/.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.nn import functional as F

from benchmarks import common
from benchmarks.train_throughput import diffusers_twin, n_params
from scoresde.learning.losses import denoising_score_matching
from scoresde.running.build import build_model, build_sde, draw_samples
from scoresde.running.config import Config

NAME = "gpu"
PX, CHANNELS = 32, 3
NET_ARGS = dict(base=64, mults=(1, 2, 2), num_res=2, attention=True, attention_levels=(1, 2))  # configs/unet32.yaml
PRECISIONS = ("fp32", "bf16", "bf16+compile")
QUICK = dict(batch=4, sample_batch=4, steps=1, rounds=1, warmup=1)


def add_arguments(p) -> None:
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--sample-batch", type=int, default=256, help="images per sampling call")
    p.add_argument("--steps", type=int, default=20, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


FORMATS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


def models(device: torch.device, net_args: dict):
    """scoresde's score model (network of `net_args`), its SDE, and diffusers' twin in each memory format."""
    torch.manual_seed(0)
    cfg = Config(net="unet", net_args=dict(net_args), sde="vp", parametrization="eps", progress=False)
    sde = build_sde(cfg)
    ours = build_model(cfg, sde, (CHANNELS, PX, PX)).to(device)
    twins = {fmt: diffusers_twin(CHANNELS, PX, **net_args).to(device, memory_format=mf) for fmt, mf in FORMATS.items()}
    return ours, sde, twins


def trainers(device: torch.device, batch: int, net_args: dict, compiled: bool) -> tuple[dict[str, Callable], dict]:
    """Training steps {"scoresde", "diffusers <format>"} (each one AdamW step on a fresh random batch; bf16 is the
    caller's autocast) and the parameter counts."""
    from diffusers import DDPMScheduler

    ours, sde, twins = models(device, net_args)
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.to(device)
    wrap = torch.compile if compiled else (lambda m: m)

    def ours_step(model=wrap(ours), opt=torch.optim.AdamW(ours.parameters(), lr=1e-4)) -> None:
        loss = denoising_score_matching(model, sde, torch.randn(batch, CHANNELS, PX, PX, device=device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def twin_step(net, fmt: torch.memory_format) -> Callable[[], None]:
        model, opt = wrap(net), torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step() -> None:
            x0 = torch.randn(batch, CHANNELS, PX, PX, device=device)
            noise = torch.randn_like(x0)
            steps = torch.randint(0, 1000, (batch,), device=device)
            a = alphas[steps].reshape(-1, 1, 1, 1)  # DDPMScheduler.add_noise, on the device
            xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).contiguous(memory_format=fmt)
            loss = F.mse_loss(model(xt, steps).sample.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    steps = {"scoresde": ours_step, **{f"diffusers {k}": twin_step(net, FORMATS[k]) for k, net in twins.items()}}
    return steps, {"scoresde": n_params(ours), "diffusers": n_params(twins["contiguous"])}


def timed(fn: Callable[[], None], n: int, device: torch.device, bf16: bool) -> float:
    """Seconds per call of fn over n calls (after a device sync), under bf16 autocast if asked."""
    _sync(device)
    tic = time.perf_counter()
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for _ in range(n):
            fn()
    _sync(device)
    return (time.perf_counter() - tic) / n


def peak_memory(fn: Callable[[], None], device: torch.device, bf16: bool) -> float | None:
    """GiB a step allocates at its peak above what was resident before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    timed(fn, 1, device, bf16)
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def compare(fns: dict[str, Callable], n: int, args, device: torch.device, bf16: bool) -> dict:
    """Images/s of each fn (n images per call, args.steps calls per round, rounds alternating after args.warmup
    calls), the faster diffusers format, scoresde's ratio to it and each one's peak memory."""
    for f in fns.values():
        timed(f, args.warmup, device, bf16)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, f in fns.items():
            times[k].append(timed(f, args.steps, device, bf16))
    img_s = {k: n / statistics.median(v) for k, v in times.items()}
    best = max((k for k in fns if k != "scoresde"), key=img_s.get)
    return dict(img_s=img_s, diffusers_best=best, ratio=img_s["scoresde"] / img_s[best],
                peak_gib={k: peak_memory(f, device, bf16) for k, f in fns.items()})


def train_rows(args, device, net_args) -> list[dict]:
    rows = []
    for precision in PRECISIONS:
        if precision.endswith("compile") and common.quick():
            print("bf16+compile: skipped in --quick (compilation on the CPU takes minutes)")
            continue
        fns, params = trainers(device, args.batch, net_args, precision.endswith("compile"))
        rows.append(dict(precision=precision, params=params,
                         **compare(fns, args.batch, args, device, precision != "fp32")))
        _print("train " + precision, rows[-1])
    return rows


def sample_rows(args, device, net_args) -> list[dict]:
    from diffusers import DPMSolverMultistepScheduler

    ours, sde, twins = models(device, net_args)
    solver = DPMSolverMultistepScheduler(num_train_timesteps=1000)
    shape = (args.sample_batch, CHANNELS, PX, PX)

    @torch.no_grad()
    def ours_draw() -> None:
        draw_samples(sde, ours.eval(), shape, "dpm2m", 10, generator=torch.Generator().manual_seed(0), device=device)

    def twin_draw(net, fmt: torch.memory_format) -> Callable[[], None]:
        @torch.no_grad()
        def draw() -> None:
            solver.set_timesteps(10, device=device)
            x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
            for t in solver.timesteps:
                x = solver.step(net.eval()(x, t).sample, t, x).prev_sample
        return draw

    fns = {"scoresde": ours_draw, **{f"diffusers {k}": twin_draw(net, FORMATS[k]) for k, net in twins.items()}}
    timing = argparse.Namespace(warmup=1, steps=1, rounds=args.rounds)
    rows = []
    for precision in ("fp32", "bf16"):
        rows.append(dict(precision=precision, nfe=10, **compare(fns, args.sample_batch, timing, device, precision == "bf16")))
        _print("sample NFE 10 " + precision, rows[-1])
    return rows


def _print(what: str, row: dict) -> None:
    print(f"{what}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in row["img_s"].items()) +
          f"; scoresde / {row['diffusers_best']} {row['ratio']:.2f}", flush=True)


def _gib(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def run(args) -> None:
    if common.quick():
        device, net_args = torch.device("cpu"), {**NET_ARGS, "base": 8}
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks gpu needs a CUDA device and none is available (torch "
                         f"{torch.__version__}, built with CUDA {torch.version.cuda}); --quick runs a tiny CPU smoke test")
    else:
        device, net_args = torch.device("cuda"), NET_ARGS
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    print(f"torch {versions['torch']}, CUDA {versions['cuda']}, device {versions['device']}; {PX}x{PX}x{CHANNELS}, "
          f"training batch {args.batch}, sampling batch {args.sample_batch}")
    train, sample = train_rows(args, device, net_args), sample_rows(args, device, net_args)
    print("\n| | scoresde (img/s) | diffusers (img/s, faster format) | scoresde / diffusers | peak GiB (scoresde / "
          "diffusers) |")
    print("|---|---|---|---|---|")
    for what, r in [("training " + r["precision"], r) for r in train] + [(f"sampling NFE 10, {r['precision']}", r)
                                                                          for r in sample]:
        best = r["diffusers_best"]
        print(f"| {what} | {r['img_s']['scoresde']:.0f} | {r['img_s'][best]:.0f} ({best.split()[1]}) | {r['ratio']:.2f} "
              f"| {_gib(r['peak_gib']['scoresde'])} / {_gib(r['peak_gib'][best])} |")
    fp32 = next(r for r in train if r["precision"] == "fp32")
    for r in train[1:]:
        print(f"{r['precision']} / fp32 (scoresde): {r['img_s']['scoresde'] / fp32['img_s']['scoresde']:.2f}x "
              "(goal >= 1.5x)")
    common.write_json(NAME, {"versions": versions, "px": PX, "channels": CHANNELS, "net_args": net_args,
                             "batch": args.batch, "sample_batch": args.sample_batch, "train": train,
                             "sample": sample})
