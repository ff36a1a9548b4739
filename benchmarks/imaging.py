"""The imaging tutorial end to end on scikit-learn's 8x8 digits (issue 12; DESIGN section 12).

Trains every model family through `scoresde.train.Trainer` (VAE, discrete DDPM, SMLD/NCSN,
VP / VE / sub-VP / contractive-VP score models, a class-conditional VP model, a consistency
model distilled from the VP model) and, side by side, diffusers' UNet2DModel with its
DDPMScheduler on the same data, steps and batch; then one table: FID-style distance on the
features of a digits classifier (floor: two disjoint sets of real digits), k-NN precision and
recall, bits/dim on the 17 grey levels, NFE, training and sampling wall time; class-conditional
accuracy against the guidance weight; a sample grid PNG.

    python -m benchmarks imaging --budget bench   # make bench-imaging (about 15 min, 1 thread)
    python -m benchmarks imaging --budget demo    # make demo-digits (about 10 min)
    python -m benchmarks imaging --table benchmarks/results/imaging/imaging_bench.json   # reprint the tables

Outputs: benchmarks/results/imaging/imaging_<budget>.json and imaging_<budget>_samples.png; run folders
under runs/imaging_<budget>.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from scoresde.evaluation.features import image_features, knn_precision_recall
from scoresde.evaluation.metrics import frechet_distance
from scoresde.learning.networks import EMA
from scoresde.models.ddpm import DDPMSchedule, ddpm_elbo
from scoresde.running.build import draw_samples
from scoresde.running.config import Config
from scoresde.running.data import load_digits
from scoresde.running.feature_net import digits_feature_net
from scoresde.running.plots import save_grid
from scoresde.running.train import Trainer, learning_rate
from scoresde.sampling import sample
from scoresde.sampling.guidance import inpaint, label_guided
from scoresde.sampling.likelihood import bits_per_dim

LEVELS = 17  # digits: pixel / 8 - 1, pixel in 0..16
NAME = "imaging"
BUDGETS = {"bench": dict(steps=1500, n=500, n_lik=100), "demo": dict(steps=1000, n=300, n_lik=50),
           "quick": dict(steps=20, n=40, n_lik=8)}
CANDIDATES = ("dpm2m", "dpm3m", "heun")
NFES = (10, 20, 50)
GUIDANCE = (0.0, 0.5, 1.0, 2.0, 4.0)
ALD = dict(steps_per_level=2, step_ratio=1.0)  # 100 levels x 2 steps + denoise; NCSN's step_ratio 0.2 under-mixed here
QUICK = dict(budget="quick", nfes=[10], candidates=["dpm2m"], guidance=[0.0, 1.0], ancestral_steps=20)


def base_config(args, name: str, **kw) -> Config:
    cfg = dict(name=name, out=str(args.runs), seed=0, threads=args.threads, data="digits", n_test=200, net="unet",
               net_args={"base": 16, "mults": [1, 2]}, parametrization="eps", steps=args.steps, batch_size=128,
               lr=2e-3, warmup=100, lr_schedule="cosine", ema_decay=0.995, eval_every=0, checkpoint_every=args.steps,
               progress=False, nfe=20, sampler="dpm2m")
    for k, v in kw.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) and k == "net_args" else v
    return Config(**cfg)


FAMILIES = {
    "VAE": dict(model="vae", model_args={"latent_dim": 16, "base": 32, "levels": LEVELS}, loss="vae", sampler="decoder"),
    "DDPM": dict(model="ddpm", loss="ddpm", sampler="ddpm"),
    "SMLD": dict(sde="ve", sde_args={"sigma_max": 20.0}, loss="ncsn", loss_args={"n_levels": 50}, sampler="ald"),
    "VP": dict(sde="vp"),
    "VE": dict(sde="ve", sde_args={"sigma_max": 20.0}),
    "sub-VP": dict(sde="subvp"),
    "contractive VP": dict(sde="contractive_vp"),
    "VP class-cond.": dict(sde="vp", net_args={"n_classes": 10}, label_dropout=0.1),
}


def train(args, label: str, spec: dict, trainer_cls=Trainer) -> tuple[Trainer, float]:
    tic = time.perf_counter()
    trainer = trainer_cls(base_config(args, label.replace(" ", "_").replace(".", ""), **spec), resume=False).run()
    sec = time.perf_counter() - tic
    print(f"trained {label}: {sec:.0f} s", flush=True)
    return trainer, sec


class Evaluator:
    """FID-style distance, precision and recall against one half of the real digits; floor: the other half."""

    def __init__(self, n: int, cache: Path):
        self.net, self.acc = digits_feature_net(cache)
        x, y = load_digits()
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(123))
        half = x.shape[0] // 2
        self.n = min(n, half)
        self.ref = image_features(x[perm[:half]], self.net)
        other = image_features(x[perm[half:half + self.n]], self.net)
        self.floor = frechet_distance(self.ref, other)
        self.floor_pr = knn_precision_recall(self.ref[:self.n], other)

    def __call__(self, samples: torch.Tensor) -> dict:
        f = image_features(samples.float().clamp(-1, 1), self.net)
        p, r = knn_precision_recall(self.ref[:self.n], f)
        return {"fid": frechet_distance(self.ref, f), "precision": p, "recall": r}

    def classify(self, samples: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(samples.float().clamp(-1, 1)).argmax(1)


def timed(fn):
    tic = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - tic


def diffusers_baseline(args, train_x: torch.Tensor):
    """UNet2DModel (16, 32 channels, one block per level) + DDPMScheduler, trained with the same
    steps, batch, AdamW, warm-up/cosine schedule, clipping and EMA as the scoresde runs."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    cfg = base_config(args, "diffusers")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(unet, cfg.ema_decay)
    g = torch.Generator().manual_seed(0)
    tic = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        x0 = train_x[torch.randint(train_x.shape[0], (cfg.batch_size,), generator=g)]
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (unet(sched.add_noise(x0, noise, t), t).sample - noise).pow(2).flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema.update()
    sec = time.perf_counter() - tic
    print(f"trained diffusers: {sec:.0f} s", flush=True)
    return ema.copy(), sched, sec


@torch.no_grad()
def diffusers_sample(unet, scheduler_cls, config, steps: int, n: int, seed: int) -> torch.Tensor:
    scheduler = scheduler_cls.from_config(config)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 8, 8), generator=g)
    for t in scheduler.timesteps:
        eps = unet(x, t.expand(n)).sample
        x = scheduler.step(eps, t, x, generator=g).prev_sample
    return x


def add_arguments(ap) -> None:
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="bench")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: the budget's)")
    ap.add_argument("--n", type=int, default=0, help="samples per row (0: the budget's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=Path, default=None, help="run folder parent (default runs/imaging_<budget>)")
    ap.add_argument("--nfes", type=int, nargs="+", default=list(NFES), help="NFE of the score models' samplers")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="samplers tried at each NFE")
    ap.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCE), help="guidance weights")
    ap.add_argument("--ancestral-steps", type=int, default=1000, help="steps of the long DDPM ancestral chains")
    ap.add_argument("--table", type=Path, default=None, help="only print the tables of a saved imaging_<budget>.json")


def run_tag(args) -> str:
    return "table" if args.table else args.budget  # reprinting a table keeps the run's own log


def run(args) -> None:
    global NFES, CANDIDATES, GUIDANCE
    if args.table:
        print_table(common.read_json(args.table))
        return
    NFES, CANDIDATES, GUIDANCE = tuple(args.nfes), tuple(args.candidates), tuple(args.guidance)
    long_chain = args.ancestral_steps
    budget = BUDGETS[args.budget]
    args.steps = args.steps or budget["steps"]
    n = args.n or budget["n"]
    n_lik = min(budget["n_lik"], n)
    args.runs = args.runs or common.scratch_dir(NAME, f"runs/imaging_{args.budget}")
    torch.set_num_threads(args.threads)
    total = time.perf_counter()
    ev = Evaluator(n, common.REPO / "runs" / "features")
    print(f"feature classifier held-out accuracy {ev.acc:.3f}; FID floor {ev.floor:.3f} (n={ev.n})", flush=True)

    rows, grid, grid_labels, trained = [], [], [], {}
    for label, spec in FAMILIES.items():
        trained[label] = train(args, label, spec)
    test = trained["VP"][0].data.test[:n_lik]

    def add(label, method, nfe, x, t_train, t_sample, bpd=None):
        m = ev(x)
        rows.append({"model": label, "sampler": method, "nfe": nfe, **m, "bpd": bpd, "train_s": t_train,
                     "sample_s": t_sample})
        print(json.dumps(rows[-1]), flush=True)
        return m

    def samples(tr, method, nfe, score=None, seed=1):
        model = tr.ema.copy()
        return timed(lambda: draw_samples(tr.sde, score or model, (n,) + tr.data.sample_shape, method, nfe,
                                          generator=torch.Generator().manual_seed(seed), family=tr.family)[0])

    # VAE: importance-weighted bound (K = 100)
    tr, sec = trained["VAE"]
    vae = tr.ema.copy()
    bpd = float(vae.bits_per_dim(test, k=100, generator=torch.Generator().manual_seed(0)).mean())
    x, ts = samples(tr, "decoder", 1)
    add("VAE (conv, latent 16)", "decoder mean", 1, x, sec, ts, bpd)
    grid.append(x), grid_labels.append("VAE")

    # DDPM: ancestral at 1000 and 50 steps; ELBO with the discretised decoder on 17 levels
    tr, sec = trained["DDPM"]
    ddpm = tr.ema.copy()
    bpd = float(ddpm_elbo(ddpm, ddpm.schedule, test, levels=LEVELS, generator=torch.Generator().manual_seed(0))
                ["bits_per_dim"].mean())
    for steps in (long_chain, 50):
        x, ts = samples(tr, "ddpm", steps)
        add("DDPM (discrete, eps)", "ancestral", steps, x, sec, ts, bpd if steps == long_chain else None)
        if steps == long_chain:
            grid.append(x), grid_labels.append(f"DDPM {long_chain}")

    # SMLD / NCSN with annealed Langevin (100 levels x 2 steps + denoise)
    tr, sec = trained["SMLD"]
    x, ts = timed(lambda: sample(tr.sde, tr.ema.copy(), (n,) + tr.data.sample_shape, method="ald", nfe=201,
                                 generator=torch.Generator().manual_seed(1), **ALD))
    bpd = float(bits_per_dim(tr.sde, tr.ema.copy(), test, levels=LEVELS, generator=torch.Generator().manual_seed(0),
                                divergence="hutchinson-rademacher", rtol=1e-3, atol=1e-3, dtype=torch.float32)[0].mean())
    add("SMLD/NCSN (VE, 50 levels)", f"ald (ratio {ALD['step_ratio']:g})", 201, x, sec, ts, bpd)
    grid.append(x), grid_labels.append("SMLD ald")

    # continuous SDE models: best of CANDIDATES at each NFE; probability-flow bits/dim
    best = {}
    for label in ("VP", "VE", "sub-VP", "contractive VP"):
        tr, sec = trained[label]
        model = tr.ema.copy()
        bpd, _ = timed(lambda: float(bits_per_dim(
            tr.sde, model, test, levels=LEVELS, generator=torch.Generator().manual_seed(0),
            divergence="hutchinson-rademacher", rtol=1e-3, atol=1e-3, dtype=torch.float32)[0].mean()))
        for nfe in NFES:
            results = []
            for method in CANDIDATES:
                x, ts = samples(tr, method, nfe)
                results.append((ev(x)["fid"], method, x, ts))
            fid, method, x, ts = min(results, key=lambda r: r[0])
            add(f"{label} score model", method, nfe, x, sec, ts, bpd if nfe == NFES[-1] else None)
            best[(label, nfe)] = fid
            if nfe == NFES[-1]:
                grid.append(x), grid_labels.append(f"{label} {method} {nfe}")

    # consistency model distilled from the VP model, one step
    from scoresde.running.consistency_train import ConsistencyTrainer

    cm_spec = dict(sde="vp", parametrization="x0", loss="consistency", sampler="consistency", nfe=1,
                   loss_args={"mode": "cd", "teacher": str(trained["VP"][0].run_dir)}, ema_decay=0.95)
    tr, sec = train(args, "consistency", cm_spec, ConsistencyTrainer)
    for steps in (1, 2):
        x, ts = samples(tr, "consistency", steps)
        add("consistency (CD from VP)", f"{steps}-step", steps, x, sec, ts)
        grid.append(x), grid_labels.append(f"consistency {steps}")

    # diffusers side by side
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    unet, sched, sec = diffusers_baseline(args, trained["VP"][0].train_x.cpu())
    eps_fn = lambda x, i: unet(x.float(), i).sample.to(x.dtype)
    bpd = float(ddpm_elbo(eps_fn, DDPMSchedule.linear(1000), test, levels=LEVELS,
                          generator=torch.Generator().manual_seed(0))["bits_per_dim"].mean())
    for cls, steps_list in ((DDPMScheduler, (long_chain,)), (DPMSolverMultistepScheduler, NFES)):
        for steps in steps_list:
            x, ts = timed(lambda: diffusers_sample(unet, cls, sched.config, steps, n, seed=1))
            add("diffusers UNet2DModel", cls.__name__, steps, x, sec, ts, bpd if cls is DDPMScheduler else None)
            if cls is DDPMScheduler:
                grid.append(x), grid_labels.append("diffusers DDPM")

    # class-conditional: accuracy of the feature classifier on guided samples, per guidance weight
    tr, sec = trained["VP class-cond."]
    model = tr.ema.copy()
    labels = torch.arange(10).repeat_interleave(math.ceil(n / 10))[:n]
    cond = []
    for w in GUIDANCE:
        x, ts = samples(tr, "dpm2m", 20, score=label_guided(model, labels, n, w))
        acc = float((ev.classify(x) == labels).float().mean())
        cond.append({"w": w, "accuracy": acc, **ev(x), "sample_s": ts})
        print(json.dumps(cond[-1]), flush=True)
    pick = next((c for c in cond if c["accuracy"] > 0.95), max(cond, key=lambda c: c["accuracy"]))
    x, _ = samples(tr, "dpm2m", 20, score=label_guided(model, labels, n, pick["w"]), seed=2)
    order = torch.cat([torch.nonzero(labels == k)[:2, 0] for k in range(10)])[:16]
    grid.append(x[order]), grid_labels.append(f"cond. w={pick['w']:g}")

    # inpainting with the VP model: right half of held-out digits unknown, replacement method, Euler-Maruyama
    tr = trained["VP"][0]
    known, truth = tr.data.test, tr.data.test_labels
    mask = torch.ones(1, 8, 8)
    mask[..., 4:] = 0
    x, ts = timed(lambda: inpaint(tr.sde, tr.ema.copy(), known, mask, method="replace", sampler="em", nfe=200,
                                  generator=torch.Generator().manual_seed(3)))
    blank = mask * known - (1 - mask)
    inp = {"n": known.shape[0], "nfe": 200, "sample_s": ts,
           "accuracy_inpainted": float((ev.classify(x) == truth).float().mean()),
           "accuracy_left_half_only": float((ev.classify(blank) == truth).float().mean()),
           "accuracy_original": float((ev.classify(known) == truth).float().mean())}
    print(json.dumps(inp), flush=True)
    grid += [mask * known, x, known]
    grid_labels += ["known half", "inpainted (VP, em)", "original"]

    fig = common.record_png(save_grid(grid, common.out_dir(NAME) / f"imaging_{args.budget}_samples.png", grid_labels))
    result = {"budget": args.budget, "steps": args.steps, "batch": 128, "n": ev.n, "threads": args.threads,
              "feature_accuracy": ev.acc, "fid_floor": ev.floor, "pr_floor": ev.floor_pr, "rows": rows,
              "conditional": cond, "inpainting": inp, "total_s": time.perf_counter() - total,
              "figure": str(fig.relative_to(common.REPO)) if fig.is_relative_to(common.REPO) else str(fig)}
    common.write_json(NAME, result, file=f"imaging_{args.budget}.json")
    print_table(result)


def print_table(res: dict) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"\nDigits 8x8, {res['steps']} steps x batch {res['batch']}, n = {res['n']} samples per row, "
          f"{res['threads']} thread(s); feature net held-out accuracy {res['feature_accuracy']:.3f}")
    print(f"FID-style floor (two disjoint sets of real digits): {res['fid_floor']:.3f}; precision/recall floor "
          f"{res['pr_floor'][0]:.3f}/{res['pr_floor'][1]:.3f}\n")
    print("| model | sampler | NFE | FID-style | precision | recall | bits/dim | train s | sample s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['fid']:.3f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {fmt(r['bpd'], '.3f')} | {r['train_s']:.0f} | {r['sample_s']:.1f} |")
    print("\n| guidance w | label accuracy | FID-style | precision | recall |")
    print("|---:|---:|---:|---:|---:|")
    for c in res["conditional"]:
        print(f"| {c['w']:g} | {c['accuracy']:.3f} | {c['fid']:.3f} | {c['precision']:.3f} | {c['recall']:.3f} |")
    if "inpainting" in res:
        print(f"\ninpainting (right half unknown): {json.dumps(res['inpainting'])}")
    print(f"\ntotal {res['total_s']:.0f} s; grid {res['figure']}")

