"""GPU throughput: scoresde's U-Net training and sampling against diffusers' UNet2DModel + schedulers, equal parameters.

32x32x3 random images (nothing is downloaded), batch 128, the network of configs/unet32.yaml and its
diffusers twin (`train_throughput.diffusers_twin`: same widths, blocks, attention, parameter count).
Training: scoresde's ScoreModel with its denoising loss (as the Trainer computes it) against diffusers'
loop (DDPMScheduler.add_noise, MSE on the noise), AdamW for both, in fp32, bf16 (autocast) and
bf16 + torch.compile; rounds alternate between the two after a warm-up; images/s from the median round.
Sampling: NFE 10 (scoresde dpm2m through `sampling.sample`; diffusers DPMSolverMultistepScheduler), fp32
and bf16. Peak GPU memory of a step above what was resident; torch, CUDA and device recorded.

Needs CUDA (about 5 minutes on one GPU); --quick runs a tiny version on the CPU without compile, a smoke
test of the code path whose numbers mean nothing. Run: python -m benchmarks gpu; outputs in benchmarks/results/gpu/.
"""
from __future__ import annotations

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


def trainers(device: torch.device, batch: int, net_args: dict, compiled: bool):
    """(scoresde step, diffusers step, (scoresde model, diffusers model, scoresde's SDE)): each step() is one
    AdamW training step on a fresh random batch; bf16 inside the step is the caller's autocast."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    cfg = Config(net="unet", net_args=dict(net_args), sde="vp", parametrization="eps", progress=False)
    sde = build_sde(cfg)
    ours = build_model(cfg, sde, (CHANNELS, PX, PX)).to(device)
    theirs = diffusers_twin(CHANNELS, PX, **net_args).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    alphas = scheduler.alphas_cumprod.to(device)
    f_ours, f_theirs = (torch.compile(ours), torch.compile(theirs)) if compiled else (ours, theirs)
    opt_ours, opt_theirs = (torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, theirs))

    def step_ours() -> None:
        x0 = torch.randn(batch, CHANNELS, PX, PX, device=device)
        loss = denoising_score_matching(f_ours, sde, x0).mean()
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def step_theirs() -> None:
        x0 = torch.randn(batch, CHANNELS, PX, PX, device=device)
        noise = torch.randn_like(x0)
        steps = torch.randint(0, 1000, (batch,), device=device)
        a = alphas[steps].reshape(-1, 1, 1, 1)  # DDPMScheduler.add_noise, on the device
        loss = F.mse_loss(f_theirs(a.sqrt() * x0 + (1 - a).sqrt() * noise, steps).sample.float(), noise)
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()

    return step_ours, step_theirs, (ours, theirs, sde)


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


def train_rows(args, device, net_args) -> list[dict]:
    rows = []
    for precision in PRECISIONS:
        compiled, bf16 = precision.endswith("compile"), precision != "fp32"
        if compiled and common.quick():
            print("bf16+compile: skipped in --quick (compilation on the CPU takes minutes)")
            continue
        a, b, (ours, theirs, _) = trainers(device, args.batch, net_args, compiled)
        pa, pb = n_params(ours), n_params(theirs)
        timed(a, args.warmup, device, bf16), timed(b, args.warmup, device, bf16)
        ta, tb = [], []
        for _ in range(args.rounds):
            ta.append(timed(a, args.steps, device, bf16))
            tb.append(timed(b, args.steps, device, bf16))
        ia, ib = args.batch / statistics.median(ta), args.batch / statistics.median(tb)
        rows.append(dict(precision=precision, scoresde_params=pa, diffusers_params=pb, scoresde_img_s=ia,
                         diffusers_img_s=ib, ratio=ia / ib, scoresde_peak_gib=peak_memory(a, device, bf16),
                         diffusers_peak_gib=peak_memory(b, device, bf16)))
        print(f"train {precision}: scoresde {ia:.0f} img/s ({pa / 1e6:.2f}M params), diffusers {ib:.0f} img/s "
              f"({pb / 1e6:.2f}M), ratio {ia / ib:.2f}", flush=True)
    return rows


def sample_rows(args, device, net_args) -> list[dict]:
    from diffusers import DPMSolverMultistepScheduler

    _, _, (ours, theirs, sde) = trainers(device, 1, net_args, compiled=False)
    ours.eval(), theirs.eval()
    solver = DPMSolverMultistepScheduler(num_train_timesteps=1000)
    n, shape = args.sample_batch, (args.sample_batch, CHANNELS, PX, PX)

    @torch.no_grad()
    def draw_ours() -> None:
        draw_samples(sde, ours, shape, "dpm2m", 10, generator=torch.Generator().manual_seed(0), device=device)

    @torch.no_grad()
    def draw_theirs() -> None:
        solver.set_timesteps(10, device=device)
        x = torch.randn(shape, device=device)
        for t in solver.timesteps:
            x = solver.step(theirs(x, t).sample, t, x).prev_sample

    rows = []
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        timed(draw_ours, 1, device, bf16), timed(draw_theirs, 1, device, bf16)
        ta, tb = [], []
        for _ in range(args.rounds):
            ta.append(timed(draw_ours, 1, device, bf16))
            tb.append(timed(draw_theirs, 1, device, bf16))
        ia, ib = n / statistics.median(ta), n / statistics.median(tb)
        rows.append(dict(precision=precision, nfe=10, scoresde_img_s=ia, diffusers_img_s=ib, ratio=ia / ib,
                         scoresde_peak_gib=peak_memory(draw_ours, device, bf16),
                         diffusers_peak_gib=peak_memory(draw_theirs, device, bf16)))
        print(f"sample NFE 10 {precision}: scoresde {ia:.0f} img/s, diffusers {ib:.0f} img/s, ratio {ia / ib:.2f}",
              flush=True)
    return rows


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
    print("\n| training | scoresde (img/s) | diffusers (img/s) | scoresde / diffusers | peak GiB (scoresde / diffusers) |")
    print("|---|---|---|---|---|")
    for r in train:
        print(f"| {r['precision']} | {r['scoresde_img_s']:.0f} | {r['diffusers_img_s']:.0f} | {r['ratio']:.2f} | "
              f"{_gib(r['scoresde_peak_gib'])} / {_gib(r['diffusers_peak_gib'])} |")
    for r in sample:
        print(f"| sampling NFE 10, {r['precision']} | {r['scoresde_img_s']:.0f} | {r['diffusers_img_s']:.0f} | "
              f"{r['ratio']:.2f} | {_gib(r['scoresde_peak_gib'])} / {_gib(r['diffusers_peak_gib'])} |")
    fp32 = next(r for r in train if r["precision"] == "fp32")
    for r in train[1:]:
        print(f"{r['precision']} / fp32 (scoresde): {r['scoresde_img_s'] / fp32['scoresde_img_s']:.2f}x (goal >= 1.5x)")
    common.write_json(NAME, {"versions": versions, "px": PX, "channels": CHANNELS, "net_args": net_args,
                             "batch": args.batch, "sample_batch": args.sample_batch, "train": train,
                             "sample": sample})
