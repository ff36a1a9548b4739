"""Where the gap to the diffusers twin lies: the two networks' held-out denoising error, and the samplers swapped.

Takes a scoresde VP run and the twin's EMA weights that `weightings --twin --keep` saved beside it
(`twin_<tag>.safetensors`), trained on the same data, steps, batch, optimiser and EMA. Noise levels are matched by
alpha_bar: the twin's discrete timestep k has alphas_cumprod[k] (DDPMScheduler, linear, 1000 steps); scoresde's
continuous t with alpha(t)^2 = alphas_cumprod[k] is found by bisection, and the twin is evaluated at the
fractional timestep of a continuous t (interpolated in log alpha_bar). Two parts:

1. `profile`: the eps-prediction error E|eps_hat(x_t) - eps|^2 (summed over pixels) of both networks, both in fp32,
   on the same held-out images and noise draws at a range of timesteps. At each level it equals the score error
   sigma^2 E|s - grad log p_t|^2 plus a constant the two share, so the paired difference is the difference of the
   networks' fits, free of any sampler.
2. `swap`: each network under each sampler (scoresde's `--sampler`, diffusers' DPMSolverMultistepScheduler with
   `--algorithm`) at `--nfe` on sample seeds `--seeds`, scored as the weightings benchmark scores (FID-style,
   FID_inf per seed and pooled, class_tv). The twin runs in the runs' precision (bf16 where the CPU has it),
   scoresde's network in fp32, each as in its own pipeline.

    python -m benchmarks twin-swap --run runs/weightings_mnist_4000/VP_sigma2_s28 \\
        --twin runs/weightings_mnist_4000/twin_mnist_4000steps_seed1-4-5-6-7_s28_twin.safetensors --tag _s28

Outputs: benchmarks/results/twin-swap/twin_swap<tag>.{json,md}.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from benchmarks import common
from benchmarks.imaging import diffusers_sample
from benchmarks.train_throughput import diffusers_twin
from scoresde.evaluation.metrics import frechet_distance_infinity
from scoresde.running.build import draw_samples
from scoresde.running.feature_net import FeatureEvaluator
from scoresde.running.precision import resolve_precision
from scoresde.running.runs import load_run

NAME = "twin-swap"
QUICK = dict(parts=["profile", "swap"], seeds=[1, 2], n=40, nfe=5, timesteps=[0, 500, 999], repeats=1)


def add_arguments(ap) -> None:
    ap.add_argument("--run", type=Path, default=None, help="the scoresde VP run folder")
    ap.add_argument("--twin", type=Path, default=None, help="the twin's EMA weights (weightings --twin --keep)")
    ap.add_argument("--parts", nargs="+", choices=("profile", "swap"), default=["profile", "swap"])
    ap.add_argument("--sampler", default="dpm2m_sde", help="scoresde's sampler")
    ap.add_argument("--sampler-options", type=json.loads, default={}, metavar="JSON",
                    help='options of scoresde\'s sampler, e.g. \'{"grid": "uniform"}\' (`sampling.methods`)')
    ap.add_argument("--networks", nargs="+", choices=("scoresde", "twin"), default=["scoresde", "twin"])
    ap.add_argument("--samplers", nargs="+", choices=("scoresde", "diffusers"), default=["scoresde", "diffusers"],
                    help="the swap's samplers: scoresde's --sampler, diffusers' --algorithm")
    ap.add_argument("--algorithm", default="sde-dpmsolver++", help="DPMSolverMultistepScheduler's algorithm_type")
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--n", type=int, default=500, help="samples per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 4, 5, 6, 7], help="sample seeds")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[0, 20, 50, 100, 200, 300, 400, 500, 600, 700, 800,
                                                                  900, 999], help="the profile's twin timesteps")
    ap.add_argument("--repeats", type=int, default=2, help="noise draws per held-out image in the profile")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--threads", type=int, default=1)


def run_tag(args) -> str:
    return args.tag.lstrip("_")


class Matched:
    """The map between the twin's timesteps and scoresde's times at equal alpha_bar."""

    def __init__(self, sde, log_alpha_bar: Tensor):
        self.sde, self.lab = sde, log_alpha_bar.double()
        lo, hi = torch.zeros_like(self.lab), torch.full_like(self.lab, float(sde.T))
        for _ in range(60):  # bisection: log alpha(t)^2 decreases in t
            mid = (lo + hi) / 2
            up = 2 * torch.log(sde.alpha(mid.float()).double()) > self.lab
            lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
        self.t_of_k = ((lo + hi) / 2).float()  # t = T where the twin's last timestep is noisier than scoresde's T

    def k_of_t(self, t: Tensor) -> Tensor:
        la = (2 * torch.log(self.sde.alpha(t).double())).numpy()
        k = np.interp(la, self.lab.flip(0).numpy(), np.arange(len(self.lab) - 1, -1, -1.0))
        return torch.as_tensor(k, dtype=torch.float32)


class TwinAsScore(nn.Module):
    """The twin as a scoresde score function: s = -eps_twin(x, k(t)) / sigma(t)."""

    def __init__(self, unet: nn.Module, match: Matched, bf16: bool):
        super().__init__()
        self.unet, self.match, self.bf16 = unet, match, bf16

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
            return self.unet(x, self.match.k_of_t(t)).sample.float()

    def forward(self, x: Tensor, t) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])
        return -self.eps(x, t) / self.match.sde.sigma(t).view(-1, *[1] * (x.dim() - 1))


class ScoreAsUNet(nn.Module):
    """A scoresde model in diffusers' calling convention: model(x, k).sample = eps_hat(x, t(k))."""

    def __init__(self, model: nn.Module, match: Matched, shape: tuple[int, ...]):
        super().__init__()
        self.model, self.match = model, match
        self.config = SimpleNamespace(in_channels=shape[0], sample_size=shape[-1])

    def forward(self, x: Tensor, k: Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.model.output(x, self.match.t_of_k[k.long()], kind="eps"))


def twin_for(run, path: Path) -> nn.Module:
    """The twin's UNet2DModel as `imaging.diffusers_baseline` builds it for this run's config, with saved weights."""
    net = {"num_res": 1, "attention": False, **run.cfg.net_args}
    c, px = run.sample_shape[0], run.sample_shape[-1]
    unet = diffusers_twin(c, px, net["base"], net["mults"], net["num_res"], net["attention"],
                          net.get("attention_levels", ()), net.get("groups", 8))
    unet.load_state_dict(load_file(path))
    return unet.eval().requires_grad_(False)


@torch.no_grad()
def profile(run, twin: TwinAsScore, match: Matched, timesteps: list[int], repeats: int) -> list[dict]:
    x0 = run.data.test
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in timesteps:
        t = match.t_of_k[torch.full((len(x0),), k)]
        a2 = float(match.lab[k].exp())
        ours, theirs = [], []
        for _ in range(repeats):
            z = torch.randn(x0.shape, generator=g)
            xt = (a2 ** 0.5 * x0 + (1 - a2) ** 0.5 * z).float()
            ours.append((run.model.output(xt, t, kind="eps") - z).flatten(1).pow(2).sum(1))
            theirs.append((twin.eps(xt, torch.full((len(xt),), float(t[0]))) - z).flatten(1).pow(2).sum(1))
        o, w = torch.cat(ours).double(), torch.cat(theirs).double()
        d = o - w
        rows.append({"k": k, "t": float(t[0]), "snr": a2 / (1 - a2), "scoresde": float(o.mean()),
                     "twin": float(w.mean()), "diff": float(d.mean()), "diff_se": float(d.std() / len(d) ** 0.5)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run(args) -> None:
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    torch.set_num_threads(args.threads)
    if common.quick():
        args.run, args.twin = quick_pair(args)
    if args.run is None or args.twin is None:
        raise SystemExit("--run (a scoresde VP run) and --twin (its twin's weights, weightings --keep) are required")
    for what, path in (("--run", args.run), ("--twin", args.twin)):
        if not path.exists():
            raise SystemExit(f"{what} {path}: no such file or folder")
    run_ = load_run(args.run)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    match = Matched(run_.sde, torch.log(sched.alphas_cumprod))
    bf16 = resolve_precision(run_.cfg.precision, torch.device("cpu")) == "bf16"
    unet = twin_for(run_, args.twin)
    twin = TwinAsScore(unet, match, bf16)
    model = run_.model.eval().requires_grad_(False)
    result = {"run": str(args.run), "twin": str(args.twin), "twin_precision": "bf16" if bf16 else "fp32"}
    lines = [f"{args.run} against {args.twin}\n"]
    if "profile" in args.parts:
        result["profile"] = profile(run_, TwinAsScore(unet, match, bf16=False), match, args.timesteps, args.repeats)
        lines += ["| twin timestep k | scoresde t | SNR | eps error, scoresde | twin | scoresde - twin (se) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['k']} | {r['t']:.4f} | {r['snr']:.3g} | {r['scoresde']:.3f} | {r['twin']:.3f} | "
                  f"{r['diff']:+.3f} ({r['diff_se']:.3f}) |" for r in result["profile"]] + [""]
    if "swap" in args.parts:
        ev = FeatureEvaluator(run_.cfg.data, args.n, common.REPO / "runs" / "features")
        shape = (args.n, *run_.sample_shape)
        cfg = {**sched.config, "algorithm_type": args.algorithm}
        ours = common.sampler_label(args.sampler, args.sampler_options)
        draws = {
            ("scoresde", "scoresde", ours): lambda s: draw_samples(
                run_.sde, model, shape, args.sampler, args.nfe, generator=torch.Generator().manual_seed(s),
                **args.sampler_options)[0],
            ("twin", "scoresde", ours): lambda s: draw_samples(
                run_.sde, twin, shape, args.sampler, args.nfe, generator=torch.Generator().manual_seed(s),
                **args.sampler_options)[0],
            ("scoresde", "diffusers", args.algorithm): lambda s: diffusers_sample(
                ScoreAsUNet(model, match, run_.sample_shape), DPMSolverMultistepScheduler, cfg, args.nfe, args.n, s),
            ("twin", "diffusers", args.algorithm): lambda s: diffusers_sample(
                unet, DPMSolverMultistepScheduler, cfg, args.nfe, args.n, s, "bf16" if bf16 else "fp32"),
        }
        draws = {(net, sampler): f for (net, side, sampler), f in draws.items()
                 if net in args.networks and side in args.samplers}
        result["swap"] = []
        lines += [f"NFE {args.nfe}, sample seeds {args.seeds}, n = {ev.n}\n",
                  "| network | sampler | FID-style per seed | FID_inf per seed | FID_inf pooled | class TV pooled |",
                  "|---|---|---|---|---:|---:|"]
        for (net, sampler), draw in draws.items():
            feats = [ev.features(draw(s)) for s in args.seeds]
            per = [ev.metrics(f) for f in feats]
            pooled = torch.cat(feats)
            row = {"network": net, "sampler": sampler, "seeds": args.seeds, "fid": [m["fid"] for m in per],
                   "fid_inf": [m.get("fid_inf") for m in per], "class_tv": [m["class_tv"] for m in per],
                   "class_tv_pooled": ev.class_tv(pooled),
                   "fid_inf_pooled": frechet_distance_infinity(pooled, ev.ref)
                   if len(pooled) // 2 > pooled.shape[1] + 1 else None}
            result["swap"].append(row)
            print(json.dumps(row), flush=True)
            fmt = lambda v: " / ".join("-" if x is None else f"{x:.1f}" for x in v)  # noqa: E731
            pool = "-" if row["fid_inf_pooled"] is None else f"{row['fid_inf_pooled']:.1f}"
            lines.append(f"| {net} | {sampler} | {fmt(row['fid'])} | {fmt(row['fid_inf'])} | {pool} | "
                         f"{row['class_tv_pooled']:.3f} |")
    common.write_json(NAME, result, file=f"twin_swap{args.tag}.json")
    common.write_text(NAME, f"twin_swap{args.tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def quick_pair(args) -> tuple[Path, Path]:
    """--quick: a 3-step digits VP run and its twin, trained by `weightings --quick --keep` into the output folder."""
    import argparse

    from benchmarks import weightings

    parser = argparse.ArgumentParser()
    weightings.add_arguments(parser)
    parser.set_defaults(**weightings.QUICK, weightings=["sigma2"], keep=True, threads=args.threads, device="cpu")
    ns = parser.parse_args([])
    weightings.run(ns)
    return ns.runs / "VP_sigma2", ns.runs / f"twin_{weightings.tag(ns)}.safetensors"
