"""Alignment benchmark (issue 11): KL-regularised continuous-time policy gradient vs DDPO.

(a) Tilted mixture: the pretrained score is the exact score of a 3-component 2-D Gaussian
    mixture under VP, the reward linear r = c^T x, so the optimum of E r - beta KL is the
    closed-form tilted mixture (DESIGN 9). scoresde's `finetune` at several betas and one
    DDPO run, at equal score evaluations (both spend 2 B N per iteration with a residual
    network on the frozen exact score). Reported: final reward, path KL, and the MMD
    (sqrt of metrics.mmd2, closed form against the mixture) to the exact tilt; for DDPO the
    reward at the same KL (interpolated along its training curve) and its closest approach
    to each tilt over the whole run (the most generous early stopping).
(b) Toy model trained by the library (moons, VP, eps-MLP): the fine-tuned network is a copy
    of the trained one; "exact tilt" = the pretrained model's own EM samples (N steps)
    reweighted by exp(r / beta) and resampled (self-normalised importance sampling).
    finetune evaluates the frozen network too (3 B N per iteration), DDPO 2 B N; DDPO gets
    1.5x the iterations so the budgets are equal.
(c) Time grid: the same budget in iterations at N = 10, 20, 40 steps for both methods; each
    result is also evaluated on a common fine grid (N = 100).
Run: `python -m benchmarks alignment` (make bench-alignment); outputs in benchmarks/results/alignment/.
"""
from __future__ import annotations

import json
import math
import tempfile
import time

import numpy as np
import torch

from benchmarks import common
from scoresde.core.sde import VP
from scoresde.core.targets import GaussianMixture
from scoresde.evaluation.metrics import mmd2
from scoresde.learning.networks import MLP
from scoresde.models import alignment as A
from scoresde.models.rewards import linear
from scoresde.sampling.grids import time_grid

NAME = "alignment"
SDE = VP()
MIX = GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2]]),
                      0.12 * torch.eye(2).expand(3, 2, 2))
C = torch.tensor([1.0, 0.5])


def evaluate(model, pre, n_steps: int, n: int, seed: int, c: torch.Tensor = C) -> tuple[torch.Tensor, float, float, float]:
    """Terminal samples of the model's EM chain on a uniform grid, their mean reward c^T x, path KL and its stderr."""
    gen = torch.Generator().manual_seed(seed)
    ro = A.rollout(SDE, model, pre, (n, 2), time_grid(SDE, n_steps, kind="uniform"), gen)
    kl = ro.cost().sum(0)
    x = ro.terminal.double()
    return x, float((x @ c.double()).mean()), float(kl.mean()), float(kl.std() / math.sqrt(n))


def mmd(x, target) -> float:
    return math.sqrt(max(float(mmd2(x, target).value), 0.0))


def tilted_case(args) -> dict:
    pre = MIX.score_fn(SDE)
    common = dict(batch_size=args.batch, n_time_steps=args.n_steps, lr=1e-2, lr_final=3e-4)
    net = lambda: MLP(2, hidden=64, depth=2)  # noqa: E731
    out = {"mine": {}, "ddpo": []}
    for beta in args.betas:
        gen = torch.Generator().manual_seed(1)
        tic = time.perf_counter()
        model, hist = A.finetune(SDE, pre, linear(C), A.FinetuneOptions(beta=beta, steps=args.iters, **common),
                                 shape=(2,), network=net(), generator=gen)
        x, r, kl, kl_se = evaluate(model, pre, args.n_steps, args.n_eval, 2)
        out["mine"][beta] = {"reward": r, "kl": kl, "kl_se": kl_se, "mmd": mmd(x, A.tilted_mixture(MIX, C, beta)),
                             "nfe": hist[-1]["nfe"], "seconds": time.perf_counter() - tic,
                             "curve": [(h["kl"], h["reward_mean"]) for h in hist], "samples": x[:1500].tolist()}
        print(f"finetune beta={beta}: reward {r:.3f} KL {kl:.3f}+-{kl_se:.3f} MMD {out['mine'][beta]['mmd']:.4f} "
              f"nfe {hist[-1]['nfe']} ({out['mine'][beta]['seconds']:.0f} s)", flush=True)

    def snapshot(it, model, record):
        if (it + 1) % max(1, args.iters // 10) == 0:
            x, r, kl, kl_se = evaluate(model, pre, args.n_steps, args.n_eval, 3)
            out["ddpo"].append({"iteration": it + 1, "nfe": record["nfe"], "reward": r, "kl": kl, "kl_se": kl_se,
                                "mmd": {b: mmd(x, A.tilted_mixture(MIX, C, b)) for b in args.betas},
                                "samples": x[:1500].tolist()})

    tic = time.perf_counter()
    A.ddpo(SDE, pre, linear(C), A.DDPOOptions(steps=args.iters, **common), shape=(2,), network=net(),
           generator=torch.Generator().manual_seed(1), callback=snapshot)
    print(f"ddpo: {time.perf_counter() - tic:.0f} s; curve (KL, reward): "
          + ", ".join(f"({d['kl']:.2f}, {d['reward']:.2f})" for d in out["ddpo"]), flush=True)
    return out


def interpolate_reward(curve: list[dict], kl: float) -> float:
    """DDPO's reward at a given KL, linear along its (KL-sorted) training curve; nan outside its range."""
    pts = sorted((d["kl"], d["reward"]) for d in curve)
    ks, rs = [p[0] for p in pts], [p[1] for p in pts]
    return float(np.interp(kl, ks, rs)) if ks[0] <= kl <= ks[-1] else float("nan")


def grid_study(args) -> dict:
    pre = MIX.score_fn(SDE)
    out = {}
    for method in ("finetune", "ddpo"):
        for n in args.grid_steps:
            gen = torch.Generator().manual_seed(1)
            common = dict(steps=args.iters, batch_size=args.batch, n_time_steps=n, lr=1e-2, lr_final=3e-4)
            inputs = dict(shape=(2,), network=MLP(2, hidden=64, depth=2), generator=gen)
            if method == "finetune":
                model, hist = A.finetune(SDE, pre, linear(C), A.FinetuneOptions(beta=1.0, **common), **inputs)
            else:
                model, hist = A.ddpo(SDE, pre, linear(C), A.DDPOOptions(**common), **inputs)
            own = evaluate(model, pre, n, args.n_eval, 2)
            fine = evaluate(model, pre, 100, args.n_eval, 2)
            out[f"{method}-{n}"] = {"method": method, "n": n, "reward": own[1], "kl": own[2], "kl_se": own[3],
                                    "reward_fine": fine[1], "kl_fine": fine[2], "nfe": hist[-1]["nfe"],
                                    "mmd_fine": mmd(fine[0], A.tilted_mixture(MIX, C, 1.0))}
            d = out[f"{method}-{n}"]
            print(f"grid {method} N={n}: own grid reward {d['reward']:.3f} KL {d['kl']:.3f}; N=100: reward "
                  f"{d['reward_fine']:.3f} KL {d['kl_fine']:.3f} MMD to beta=1 tilt {d['mmd_fine']:.4f}", flush=True)
    return out


def toy_case(args) -> dict:
    """A moons model trained by the library, fine-tuned as a network; reference tilt by importance resampling."""
    from scoresde.running.config import load_config
    from scoresde.running.runs import load_run
    from scoresde.running.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"out={tmp}", "name=moons", "data=moons", f"steps={args.toy_train_steps}",
                                 "eval_every=0", "progress=false", "lr_schedule=cosine", "checkpoint_every=100000"])
        tic = time.perf_counter()
        Trainer(cfg).run()
        net = load_run(cfg.run_dir).model
        print(f"toy: trained moons model in {time.perf_counter() - tic:.0f} s", flush=True)
    c = torch.tensor([0.0, 1.0])
    reward = linear(c)
    with torch.no_grad():
        base = A.rollout(SDE, net, net, (args.toy_ref, 2), time_grid(SDE, args.n_steps, kind="uniform"),
                         torch.Generator().manual_seed(5)).terminal.double()
    out = {"mine": {}, "ddpo": [], "pretrained_samples": base[:1500].tolist(), "ref": {}}
    for beta in args.toy_betas:
        w = torch.softmax(base @ c.double() / beta, 0)
        idx = torch.multinomial(w, args.n_eval, replacement=True, generator=torch.Generator().manual_seed(6))
        out["ref"][beta] = {"samples": base[idx], "ess": float(1 / w.pow(2).sum()), "reward": float(w @ (base @ c.double()))}
    common = dict(batch_size=args.batch, n_time_steps=args.n_steps, lr=1e-3, lr_final=1e-4)
    per_iter = {"finetune": 3, "ddpo": 2}
    for beta in args.toy_betas:
        tic = time.perf_counter()
        model, hist = A.finetune(SDE, net, reward, A.FinetuneOptions(beta=beta, steps=args.toy_iters, **common),
                                 shape=(2,), generator=torch.Generator().manual_seed(1))
        x, r, kl, kl_se = evaluate(model, net, args.n_steps, args.n_eval, 2, c)
        out["mine"][beta] = {"reward": r, "kl": kl, "kl_se": kl_se, "mmd": mmd(x, out["ref"][beta]["samples"]),
                             "nfe": hist[-1]["nfe"], "seconds": time.perf_counter() - tic, "samples": x[:1500].tolist()}
        print(f"toy finetune beta={beta}: reward {r:.3f} (tilt {out['ref'][beta]['reward']:.3f}) KL {kl:.3f}+-{kl_se:.3f} "
              f"MMD {out['mine'][beta]['mmd']:.4f} nfe {hist[-1]['nfe']}", flush=True)
    ddpo_iters = args.toy_iters * per_iter["finetune"] // per_iter["ddpo"]

    def snapshot(it, model, record):
        if (it + 1) % max(1, ddpo_iters // 10) == 0:
            x, r, kl, kl_se = evaluate(model, net, args.n_steps, args.n_eval, 3, c)
            out["ddpo"].append({"iteration": it + 1, "nfe": record["nfe"], "reward": r, "kl": kl, "kl_se": kl_se,
                                "mmd": {b: mmd(x, out["ref"][b]["samples"]) for b in args.toy_betas},
                                "samples": x[:1500].tolist()})

    A.ddpo(SDE, net, reward, A.DDPOOptions(steps=ddpo_iters, **common), shape=(2,),
           generator=torch.Generator().manual_seed(1), callback=snapshot)
    print("toy ddpo curve (nfe, KL, reward): " + ", ".join(f"({d['nfe']}, {d['kl']:.2f}, {d['reward']:.2f})"
                                                          for d in out["ddpo"]), flush=True)
    for beta in args.toy_betas:
        out["ref"][beta]["samples"] = out["ref"][beta]["samples"][:1500].tolist()
    return out


def summarise(name: str, res: dict) -> list[str]:
    lines = [f"### {name}", "", "| beta | finetune reward | KL (path) | DDPO reward at that KL | finetune MMD to tilt "
             "| DDPO best MMD (iteration) | DDPO final MMD | ratio finetune / DDPO best |", "|---|---|---|---|---|---|---|---|"]
    for beta, m in res["mine"].items():
        best = min(res["ddpo"], key=lambda d: d["mmd"][beta])
        lines.append(f"| {beta} | {m['reward']:.3f} | {m['kl']:.3f} +- {m['kl_se']:.3f} | "
                     f"{interpolate_reward(res['ddpo'], m['kl']):.3f} | {m['mmd']:.4f} | {best['mmd'][beta]:.4f} "
                     f"({best['iteration']}) | {res['ddpo'][-1]['mmd'][beta]:.4f} | {m['mmd'] / best['mmd'][beta]:.2f} |")
    return lines


def plot_reward_kl(res: dict) -> None:
    """Reward against path KL, zoomed to the finetune points (DDPO without a KL term runs far beyond them)."""
    plt = common.plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "tilt", "tilted mixture"), (axes[1], "toy", "moons model (trained)")):
        if key not in res:
            continue
        r = res[key]
        ax.plot([d["kl"] for d in r["ddpo"]], [d["reward"] for d in r["ddpo"]], "o-", label="DDPO (training curve)")
        ax.plot([m["kl"] for m in r["mine"].values()], [m["reward"] for m in r["mine"].values()], "s", ms=8,
                label="scoresde finetune (one beta each)")
        for beta, m in r["mine"].items():
            ax.annotate(f"beta={beta}", (m["kl"], m["reward"]), fontsize=8, textcoords="offset points", xytext=(4, -10))
        kl_max = 3 * max(m["kl"] for m in r["mine"].values())
        ax.set_xlim(0, kl_max), ax.set_ylim(-0.2, 1.5 * max(m["reward"] for m in r["mine"].values()))
        ax.set_xlabel("path KL to pretrained"), ax.set_ylabel("mean reward"), ax.set_title(title), ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, NAME, "alignment_reward_kl.png", dpi=120)


def plots(res: dict) -> None:
    plot_reward_kl(res)
    plt = common.plt()

    if "tilt" in res:
        r = res["tilt"]
        beta = 1.0 if 1.0 in r["mine"] else next(iter(r["mine"]))
        tilt = A.tilted_mixture(MIX, C, beta)
        best = min(r["ddpo"], key=lambda d: d["mmd"][beta])
        panels = [("pretrained (exact mixture)", MIX.sample(1500, torch.Generator().manual_seed(0))),
                  (f"exact tilt, beta={beta}", tilt.sample(1500, torch.Generator().manual_seed(0))),
                  (f"finetune beta={beta}", torch.tensor(r["mine"][beta]["samples"])),
                  (f"DDPO closest (it {best['iteration']})", torch.tensor(best["samples"])),
                  ("DDPO final", torch.tensor(r["ddpo"][-1]["samples"]))]
        fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
        for ax, (title, x) in zip(axes, panels):
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
            ax.set_title(title, fontsize=9)
            ax.set_xlim(-2.5, 3.5), ax.set_ylim(-2, 3)  # DDPO's final samples may lie far outside
        fig.tight_layout()
        common.save_figure(fig, NAME, "alignment_samples.png", dpi=110)

    if "grid" in res:
        plot_grid(res["grid"])


def plot_grid(grid: dict) -> None:
    """Reward and KL at N = 100 against the training grid's N; log-scale y (DDPO may diverge)."""
    plt = common.plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, style in (("finetune", "s-"), ("ddpo", "o-")):
        rows = [d for d in grid.values() if d["method"] == method]
        ns = [d["n"] for d in rows]
        axes[0].plot(ns, [d["reward_fine"] for d in rows], style, label=method)
        axes[1].plot(ns, [d["kl_fine"] for d in rows], style, label=method)
    for ax, lab in zip(axes, ("mean reward", "path KL")):
        ax.set_xscale("log"), ax.set_yscale("symlog", linthresh=1.0), ax.set_ylim(bottom=-0.2)
        ax.set_xlabel("training grid steps N"), ax.set_ylabel(lab + " (evaluated at N=100)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, NAME, "alignment_grid.png", dpi=120)


QUICK = dict(iters=4, batch=32, n_eval=200, betas=[1.0], grid_steps=[10], toy_train_steps=200, toy_iters=4,
             toy_betas=[1.0], toy_ref=2000)


def add_arguments(p) -> None:
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n-steps", type=int, default=20)
    p.add_argument("--n-eval", type=int, default=3000)
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--grid-steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--toy-train-steps", type=int, default=3000)
    p.add_argument("--toy-iters", type=int, default=150)
    p.add_argument("--toy-betas", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--toy-ref", type=int, default=200000)
    p.add_argument("--parts", nargs="+", default=["tilt", "grid", "toy"])


def run(args) -> None:
    res, tic = {}, time.perf_counter()
    if "tilt" in args.parts:
        res["tilt"] = tilted_case(args)
    if "grid" in args.parts:
        res["grid"] = grid_study(args)
    if "toy" in args.parts:
        res["toy"] = toy_case(args)
    plots(res)
    lines = []
    for key, name in (("tilt", "Tilted mixture (exact score, linear reward)"), ("toy", "Moons model (trained), r = x_2")):
        if key in res:
            lines += summarise(name, res[key]) + [""]
    if "grid" in res:
        lines += ["### Time grid (beta = 1, tilted mixture)", "", "| method | N | reward (own grid) | KL (own grid) | "
                  "reward (N=100) | KL (N=100) | MMD to tilt (N=100) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {d['method']} | {d['n']} | {d['reward']:.3f} | {d['kl']:.3f} | {d['reward_fine']:.3f} | "
                  f"{d['kl_fine']:.3f} | {d['mmd_fine']:.4f} |" for d in res["grid"].values()]
    print("\n".join(lines))
    print(f"total {time.perf_counter() - tic:.0f} s")
    slim = json.loads(json.dumps(res, default=float))
    for part in slim.values():
        for v in (part.get("mine", {}) or {}).values():
            v.pop("samples", None), v.pop("curve", None)
        for d in part.get("ddpo", []) if isinstance(part.get("ddpo"), list) else []:
            d.pop("samples", None)
        part.pop("pretrained_samples", None)
        for v in (part.get("ref", {}) or {}).values():
            v.pop("samples", None)
    common.write_json(NAME, slim, file="alignment.json")
