"""Stochastic samplers against diffusers' stochastic schedulers (issue 21).

(a) Exact scores (stage `choose`, then `exact`): the 2-D ring and the 16-D mixture of benchmarks/samplers.py
(same exact score, same discrete eps model for diffusers, same MMD^2 broad / fine and log-density gap, from
`benchmarks.samplers`) under VP, NFE 10, 20, 50, 100. Every scoresde method that `METHODS` marks stochastic at
its defaults (`stochastic({})`, less "consistency"), plus ddim at eta = 1, runs at its defaults and with a few
of its own knobs (KNOBS: grid, variance, snr, step ratio, churn, tau, noise, ...; an option a method refuses
is recorded and skipped); diffusers' stochastic schedulers (sde-dpmsolver++ orders 2 and 3, SA-Solver, Euler
ancestral, DPM-SDE, DDPM, DDIM eta = 1, KDPM2 ancestral) at their defaults and their tuning knobs.
Held-out protocol: `choose` runs every configuration on the choice set (ring and mix16 =
random_mixture(16, 8, seed=0), sample seed 0, n = --n-choose) and picks, per NFE, each method's knob and the
best scoresde and best diffusers configuration; `exact` re-runs the defaults and the picks on fresh
samples (seed 1, n = --n) of ring and mix16 and of the held-out HELD_OUT targets (mix16b = random_mixture(16, 8,
seed=1), mix16c = random_mixture(16, 8, seed=7), added after mix16b had been analysed, and `swiss`, the swiss roll
as a 128-component mixture with an exact score, sampled by scoresde under configs/swiss_roll.yaml's VE SDE, by
diffusers under its own discrete VP), targets no choice saw. The goal compares the two picks made on the choice
set. The automatic-schedule knobs run only where the library offers
`schedule="auto"` (for sa3, a stochastic method: nfe <= AUTO_STOCHASTIC_MAX_NFE; rows of the search before
session 22, which moved knots at every nfe, are not candidates above AUTO_MAX_NFE).
(b) Learned score (stage `learned`): the digits VP model of benchmarks/imaging.py (its bench budget, cached in
runs/stochastic_digits/VP), FID-style distance and KID (+- se) on the digits features, NFE 10-200; the best
stochastic and deterministic method per NFE chosen on sample seed 10, reported on seed 11; EDM churn sweep.
(c) Per-evaluation overhead (stage `overhead`) with a free score model, each method against its diffusers twin.

    python -m benchmarks stochastic --stage choose     # then --stage exact, --stage learned, --stage overhead
`refine` re-runs the configurations tied on the choice set with more samples (same targets and seed);
`refine --precise` re-runs those still tied at n in the 10^5s, scored by metrics.mmd2_fourier (O(n) in place of
the pairwise O(n^2)); `confirm --precise` re-scores the two picks that way on fresh seeds, where n = 20000 leaves
both within the null spread. `versus --configs A B ...` scores named configurations side by side that way at the
confirm seeds (stochastic_versus.{json,md}), also on FRESH targets that no choice or report saw.
Outputs in benchmarks/results/stochastic/: stochastic_{choose,exact,learned,overhead}.json,
stochastic_report.md, stochastic_{ring,mix16,mix16b,mix16c}.png, stochastic_learned.png.
"""
from __future__ import annotations

import inspect
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from benchmarks.samplers import DiscreteEps, MixtureScore, Scorer, bandwidths, null_row, run_ours, setup, value
from scoresde.core.sde import VE, VP
from scoresde.core.targets import GaussianMixture, random_mixture
from scoresde.evaluation.features import kid
from scoresde.evaluation.metrics import mmd2_fourier
from scoresde.sampling.methods import METHODS
from scoresde.sampling.schedule import AUTO_MAX_NFE, AUTO_STOCHASTIC_MAX_NFE, auto_schedule, search_options

warnings.filterwarnings("ignore")
F64 = torch.float64
NAME = "stochastic"
NFES = (10, 20, 50, 100)
CHOICE_TARGETS = ("ring", "mix16")
REFINE_FACTOR = 2.0  # stage refine: re-run the configurations within this factor of the best choice score
HELD_OUT = {"mix16b": 1, "mix16c": 7}  # random_mixture(16, 8, seed) that no choice saw
FRESH = {"mix16d": 13}  # random_mixture(16, 8, seed) for `versus` only, added in session 22
VE_TARGETS = {"swiss": VE(sigma_min=0.01, sigma_max=10.0)}  # under configs/swiss_roll.yaml's VE; the rest under VP
CONFIRM_FILES = {False: "stochastic_confirm.json", True: "stochastic_confirm_precise.json"}  # by the `precise` flag
REPORT_TARGETS = ("ring", "mix16", *HELD_OUT, *VE_TARGETS)
METRICS = ("mmd2", "mmd2_fine", "abs_gap")
LEARNED_NFES = (10, 20, 50, 100, 200)
DETERMINISTIC = ("dpm2m", "dpm3m", "unipc2", "heun")
CHURN = (0.0, 10.0, 40.0, 80.0)
QUICK = dict(n_choose=200, n_refine=400, n=300, nfes=[10], learned_nfes=[10], n_learned_choose=40, n_learned=60,
             churn_nfes=[20], overhead_steps=4, overhead_repeats=1, train_steps=20, n_confirm=300, n_precise=300,
             confirm_nfes=[10], confirm_seeds=[2])

# ---- configurations -------------------------------------------------------------------------------------

GRIDS = [("uniform", {"grid": "uniform"}), ("poly2", {"grid": "poly", "power": 2.0}), ("logsnr", {"grid": "logsnr"}),
         ("edm7", {"grid": "edm", "rho": 7.0})]
# each method's own knobs (beyond the time grids every fixed-grid method gets); a method not named here gets the
# grids and noise="brownian"; an option set the method refuses is recorded as an error row and skipped
KNOBS = {
    "pc": [("snr=0.08", {"snr": 0.08}), ("snr=0.3", {"snr": 0.3}), ("predictor=ei", {"predictor": "ei"})],
    "ald": [("ratio=0.5", {"step_ratio": 0.5}), ("ratio=2", {"step_ratio": 2.0})],
    "ddpm": [("variance=beta", {"variance": "beta"})],
    # edm_sde's default S_churn is 40; S_churn = 0 is heun (deterministic), left to the learned stage's sweep;
    # EDM's ImageNet setting: S_churn 40-80 inside the band 0.05 <= sigma/alpha <= 50, S_noise 1.003
    "edm_sde": [("S_churn=10", {"S_churn": 10.0}), ("S_churn=80", {"S_churn": 80.0}),
                ("S_noise=1.003", {"S_noise": 1.003}), ("band=0.05-50", {"S_tmin": 0.05, "S_tmax": 50.0})],
    # tau_band (0.7, 25): sigma/alpha of diffusers' timesteps 200 and 800, SA-Solver's default tau interval
    # auto: the automatic schedule (sampling.schedule.auto_schedule: that of tau = 0, searched from the score alone;
    # nfe <= AUTO_MAX_NFE, as the library's schedule="auto"), its search's score evaluations recorded beside the row
    "sa3": [("tau=0.5", {"tau": 0.5}), ("tau=0.25", {"tau": 0.25}), ("band=0.7-25", {"tau_band": (0.7, 25.0)}),
            ("auto", {"auto": True}), ("auto tau=0.5", {"auto": True, "tau": 0.5}),
            ("auto tau=0.25", {"auto": True, "tau": 0.25})],
    "dpm2m_sde": [("lof=0", {"lower_order_final": False})],
    "dpm3m_sde": [("lof=0", {"lower_order_final": False})],
    "adaptive_sde": [("rtol=0.02", {"rtol": 0.02}), ("rtol=0.1", {"rtol": 0.1}), ("rtol=0.2", {"rtol": 0.2})],
}
NOISE_KNOB = ("noise=brownian", {"noise": "brownian"})


def ours_methods() -> dict[str, tuple[str, dict]]:
    """Every registered stochastic method at its defaults (ddim at eta = 1), as {label: (method, options)}."""
    out = {m: (m, {}) for m in METHODS.names() if METHODS[m].stochastic({}) and m != "consistency"}
    if "ddim" in METHODS:
        out["ddim(eta=1)"] = ("ddim", {"eta": 1.0})
    return out


def ours_knobs(label: str, method: str, base: dict) -> list[tuple[str, dict]]:
    spec = METHODS[method]
    knobs = [("default", {})] + list(KNOBS.get(method, []))
    if not spec.adaptive:
        default_grid = spec.grid if spec.grid != "poly" else f"poly{spec.power:g}"
        knobs += [(g, o) for g, o in GRIDS if g != default_grid and not spec.levels_are_points]
    knobs.append(NOISE_KNOB)
    return [(k, {**base, **o}) for k, o in knobs]


def peer_table():
    import diffusers as D

    karras, trailing = ("karras", {"use_karras_sigmas": True}), ("trailing", {"timestep_spacing": "trailing"})
    dpm = [karras, ("lof=0", {"lower_order_final": False}), ("final=sigma_min", {"final_sigmas_type": "sigma_min"}),
           ("midpoint->heun", {"solver_type": "heun"}), trailing]
    # (class, fixed config, step() keywords, knobs); clip_sample off: the samples are not images in [-1, 1]
    return {
        "SDE-DPM++2M": (D.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, {}, dpm),
        "SDE-DPM++3M": (D.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, {}, dpm),
        "SA-Solver": (D.SASolverScheduler, {}, {},
                      [("p3c3", {"predictor_order": 3, "corrector_order": 3}), ("p1c1", {"predictor_order": 1,
                       "corrector_order": 1}), ("tau=1", {"tau_func": lambda t: 1.0}), karras, trailing]),
        "EulerAncestral": (D.EulerAncestralDiscreteScheduler, {}, {}, [trailing]),
        "DPM-SDE": (D.DPMSolverSDEScheduler, {}, {}, [karras, trailing]),
        "DDPM": (D.DDPMScheduler, {"clip_sample": False}, {}, [("fixed_large", {"variance_type": "fixed_large"}), trailing]),
        "DDIM(eta=1)": (D.DDIMScheduler, {"clip_sample": False}, {"eta": 1.0}, [trailing]),
        "KDPM2-Ancestral": (D.KDPM2AncestralDiscreteScheduler, {}, {}, [karras, trailing]),
    }


def peer_configs():
    base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")
    out = {}
    for name, (cls, fixed, step_kw, knobs) in peer_table().items():
        for knob, kw in [("default", {})] + knobs:
            out[f"{name}/{knob}"] = (cls, {**base, **fixed, **kw}, step_kw)
    return out


MEMBERS: list[str] | None = None  # --members: only configurations of these members (merged into the JSON)


def all_configs() -> list[tuple[str, str, str, tuple]]:
    """(config name, member, kind, spec): member = the method or scheduler the knob belongs to."""
    out = []
    for label, (method, base) in ours_methods().items():
        for knob, options in ours_knobs(label, method, base):
            out.append((f"scoresde/{label}/{knob}", f"scoresde/{label}", "ours", (method, options)))
    for name, spec in peer_configs().items():
        out.append((f"diffusers/{name}", f"diffusers/{name.split('/')[0]}", "peer", spec))
    return out if MEMBERS is None else [c for c in out if c[1] in MEMBERS]


def merge(path, rows):
    """With --members: the rows of those members at the NFEs run replace theirs in the saved file (the null rows and
    their rows at other NFEs are kept)."""
    if MEMBERS is None or not path.exists():
        return rows
    run = {(r.get("member"), r["nfe"]) for r in rows if r["nfe"]}
    old = [r for r in common.read_json(path)["rows"] if (r.get("member"), r["nfe"]) not in run]
    known = {r["target"] for r in old if r["nfe"] == 0}
    return old + [r for r in rows if r["nfe"] != 0 or r["target"] not in known]


def seed_n(row) -> tuple[int, int]:
    """A row's sample seed and size (rows without a seed: stage exact's seed 1 or the refine's 0, one per file)."""
    return row.get("seed", 2), row["n"]


def keep_other_cells(path, rows):
    """The saved rows of the (target, NFE, seed) cells that `rows` does not hold stay beside them, each saved null
    row while a kept row of its (target, seed, n) does: a stage re-run on some NFEs, targets or seeds replaces only
    those, and seeds run at different sample sizes pool in one file. With --members only those members' rows of
    a re-run cell are replaced."""
    if not path.exists():
        return rows
    cell = lambda r: (r["target"], r["nfe"], r.get("seed", 2))
    null_of = lambda r: (r["target"], *seed_n(r))
    saved, new = common.read_json(path)["rows"], {cell(r) for r in rows if r["nfe"]}
    old = [r for r in saved if r["nfe"] and (cell(r) not in new or MEMBERS is not None and r.get("member") not in MEMBERS)]
    live = {null_of(r) for r in old} - {null_of(r) for r in rows if r["nfe"] == 0}
    return [r for r in saved if r["nfe"] == 0 and null_of(r) in live] + old + rows


def run_peer(cls, config, step_kw, eps_model, x_T, nfe, gen):
    """Drive a stochastic diffusers scheduler at the largest step count whose model calls fit `nfe`, its noise
    from `gen`; returns (x, model calls)."""
    config = dict(config)
    if "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        config["noise_sampler_seed"] = int(torch.randint(2**31, (1,), generator=gen))
    sched = cls(**config)
    steps = nfe if getattr(cls, "order", 1) == 1 else (nfe + 1) // 2
    while True:
        sched.set_timesteps(steps, device=x_T.device)
        if len(sched.timesteps) <= nfe or steps == 1:
            break
        steps -= 1
    kw = dict(step_kw)
    if "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = gen
    x, used = x_T * sched.init_noise_sigma, 0
    for t in sched.timesteps:
        eps = eps_model(sched.scale_model_input(x, t), t)
        used += 1
        x = sched.step(eps, t, x, **kw).prev_sample
    return x, used


def counted(fn):
    calls = [0]

    def wrapped(x, t):
        calls[0] += 1
        return fn(x, t)
    return wrapped, calls


_AUTO: dict = {}  # automatic schedules of the current target (evaluate clears it)


def offered(row: dict) -> bool:
    """Whether the library offers the row's configuration at its nfe: an automatic-schedule knob (sa3's, a
    stochastic method) only at nfe <= AUTO_STOCHASTIC_MAX_NFE, where `schedule="auto"` applies, and above
    AUTO_MAX_NFE only in rows of the current search (`auto_choice` recorded: rows of the search that moved knots at
    every nfe are not candidates)."""
    nfe = row["nfe"]
    return (not row["config"].split("/")[-1].startswith("auto") or nfe <= AUTO_MAX_NFE
            or nfe <= AUTO_STOCHASTIC_MAX_NFE and "auto_choice" in row)


def auto_for(sde, score_fn, shape, method, nfe, dtype, options):
    """sampling.schedule.auto_schedule (as cached_schedule, which keys on the score object), once per method, nfe
    and search options (sa3 at any tau shares one) on the current target."""
    if nfe > AUTO_STOCHASTIC_MAX_NFE:
        raise ValueError(f"auto: the library offers schedule='auto' at nfe <= {AUTO_STOCHASTIC_MAX_NFE}")
    key = (method, nfe, repr(sorted(search_options(method, options).items())))
    if key not in _AUTO:
        small = dict(n_probe=64, max_iter=4) if common.quick() else {}  # --quick: a smoke-sized search
        _AUTO[key] = auto_schedule(sde, score_fn, shape, method=method, nfe=nfe, dtype=dtype, **small, **options)
    return _AUTO[key]


def run_config(kind, spec, sde, score_fn, eps, x_T, nfe, gen):
    """(x, evaluations used, error message or None, {} or the automatic schedule's search: its score evaluations,
    the candidate chosen, its times and denoise)."""
    try:
        if kind == "ours":
            method, options = spec
            options, search = dict(options), {}
            if options.pop("auto", False):
                auto = auto_for(sde, score_fn, tuple(x_T.shape[1:]), method, nfe, x_T.dtype, options)
                options = {**options, **auto.options}
                search = {"search_evals": auto.evaluations, "auto_choice": auto.choice,
                          "auto_ts": [round(float(t), 5) for t in auto.ts], "auto_denoise": auto.denoise,
                          "auto_first": auto.analytic_first}
            fn, calls = counted(score_fn)
            x, _ = run_ours(sde, fn, method, options, x_T, nfe, gen)
            return x, calls[0], None, search
        x, used = run_peer(*spec, eps, x_T, nfe, gen)
        return x, used, None, {}
    except Exception as err:  # an option the method refuses, or a budget it cannot meet
        return None, 0, f"{type(err).__name__}: {str(err)[:160]}", {}


# ---- exact-score targets --------------------------------------------------------------------------------

def swiss_mixture(n_components: int = 128, std: float = 0.05) -> GaussianMixture:
    """`targets.swiss_roll` with an exact score: equal isotropic Gaussians of the roll's noise sd at evenly spaced
    angles of its spiral (the roll draws its angle uniformly)."""
    u = 1.5 * math.pi * (1 + 2 * (torch.arange(n_components, dtype=F64) + 0.5) / n_components)
    means = torch.stack([u * u.cos(), u * u.sin()], 1) / 9.0
    return GaussianMixture(torch.full((n_components,), 1 / n_components, dtype=F64), means,
                           std**2 * torch.eye(2, dtype=F64).expand(n_components, 2, 2))


def target_of(name):
    """(mixture, its exact score, the SDE scoresde samples it under: VE for VE_TARGETS, else VP)."""
    seeds = {**HELD_OUT, **FRESH}
    if name in seeds or name in VE_TARGETS:
        t = random_mixture(16, 8, seed=seeds[name]) if name in seeds else swiss_mixture()
        return t, MixtureScore(t), VE_TARGETS.get(name, VP())
    return (*setup(name), VP())


class FourierScorer:
    """Scorer's columns for n in the 10^5s: both MMD^2 columns by metrics.mmd2_fourier, each with its standard error
    (`<metric>_se`), on one draw of frequencies per target (seed `freqs`) that every configuration shares. The null row
    is one exact sample; its standard error stands for the null sd."""

    def __init__(self, target, n, gen, freqs=0):
        self.target, self.h, self.freqs = target, bandwidths(target), freqs
        self.ref_logp = float(target.log_prob(target.sample(200000, gen)).mean())
        null = self.mmd(target.sample(n, gen))
        self.null = {k: (null[k], null[f"{k}_se"]) for k in ("mmd2", "mmd2_fine")}

    def mmd(self, x):
        out = {}
        for k, h in (("mmd2", self.h[:3]), ("mmd2_fine", self.h[3:])):
            e = mmd2_fourier(x, self.target, h, generator=torch.Generator().manual_seed(self.freqs))
            out[k], out[f"{k}_se"] = e.value, e.stderr
        return out

    def __call__(self, x):
        if x is None or not torch.isfinite(x).all():
            return {"gap": float("nan"), "mmd2": float("nan"), "mmd2_fine": float("nan")}
        return {"gap": float(self.target.log_prob(x).mean()) - self.ref_logp, **self.mmd(x)}


def same_law(kind, spec):
    """`spec` with noise="brownian" replaced by the default i.i.d. noise: the increments of one Brownian path over
    disjoint steps are independent N(0, 1) draws, so the sampler's law is the same, at a fraction of the cost
    (torchsde's Brownian tree draws about 85 bridge values of the state's size per step)."""
    if kind != "ours" or spec[1].get("noise") != "brownian":
        return spec
    return spec[0], {k: v for k, v in spec[1].items() if k != "noise"}


def evaluate(tname, n, nfes, seed, wanted=None, null_repeats=4, precise=False):
    """Every configuration (or the `wanted` (config, nfe) pairs) on target `tname`: n samples of sample seed `seed`.
    precise: FourierScorer instead of the pairwise Scorer, and Brownian noise by its i.i.d. twin (`same_law`)."""
    target, sc, sde = target_of(tname)
    gen = torch.Generator().manual_seed(seed)
    scorer = FourierScorer(target, n, gen) if precise else Scorer(target, n, gen, null_repeats=null_repeats)
    rows = [null_row(scorer, target=tname, n=n)]
    print(json.dumps(rows[0]), flush=True)
    x_T = sde.prior_sample((n, target.dim), gen, F64)
    score_fn, eps = sc.continuous(sde), DiscreteEps(sc)
    _AUTO.clear()  # the schedules of the previous target
    refused = set()
    for name, member, kind, spec in all_configs():
        for nfe in nfes:
            if (wanted is not None and (name, nfe) not in wanted) or name in refused:
                continue
            t0 = time.perf_counter()
            x, used, err, search = run_config(kind, same_law(kind, spec) if precise else spec, sde, score_fn, eps,
                                              x_T, nfe, gen)
            if err and ("unexpected keyword" in err or "must be one of" in err):
                refused.add(name)
            row = {"target": tname, "config": name, "member": member, "nfe": nfe, "used": used, "n": n,
                   **scorer(x), "error": err, "seconds": round(time.perf_counter() - t0, 2), **search}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def null_sd(rows, tname, metric="mmd2", n=None):
    """The null sd on target `tname` (of the null row of sample size `n` where given: rows of two sizes may mix)."""
    null = [r for r in rows if r["target"] == tname and r["nfe"] == 0 and n in (None, r["n"])][0]
    return null[f"{metric}_sd"] if metric != "abs_gap" else 0.0


def choice_score(rows, config, nfe, metric="mmd2"):
    """Geometric mean over the choice targets of max(|metric|, null sd): the choice criterion."""
    vals = []
    for t in CHOICE_TARGETS:
        r = [r for r in rows if r["target"] == t and r["config"] == config and r["nfe"] == nfe]
        if not r:
            return float("inf")
        vals.append(max(value(r[0], metric), null_sd(rows, t, metric, r[0]["n"]), 1e-12))
    return float(np.exp(np.mean(np.log(vals))))


def tied(rows, nfe, factor=REFINE_FACTOR):
    """Per family (scoresde, diffusers), the configurations whose choice score at `nfe` is within `factor` of
    that family's best: at this n they cannot be told apart (at the floor, within `factor` null sd)."""
    out = set()
    for fam in ("scoresde", "diffusers"):
        scores = {c: choice_score(rows, c, nfe) for c in {r["config"] for r in rows if r["nfe"] == nfe
                                                          and r.get("member", "").startswith(fam)
                                                          and offered(r)}}
        best = min((v for v in scores.values() if math.isfinite(v)), default=math.inf)
        out |= {c for c, v in scores.items() if v <= factor * best}
    return out


def choose(rows, nfes, refined=()):
    """Per NFE: each member's best knob, and the best scoresde and best diffusers configuration (choice set):
    the lowest `choice_score` of the broad MMD^2, ties broken by the fine one. Where `refined` (stage
    `refine`: the `tied` configurations re-run on the choice targets with more samples) holds rows at an NFE,
    the members it holds and both families' best are chosen on those rows."""
    members = sorted({r["member"] for r in rows if r.get("member")})
    picks = {}
    for nfe in nfes:
        more = [r for r in refined if r["nfe"] in (0, nfe)]
        more = more if any(r["nfe"] == nfe for r in more) else []
        key = lambda rs, c: (choice_score(rs, c, nfe), choice_score(rs, c, nfe, "mmd2_fine"), c)
        cell, scored_on = {}, {}
        for m in members:
            rs = more if any(r.get("member") == m for r in more) else rows
            cands = sorted({r["config"] for r in rs if r.get("member") == m and r["nfe"] == nfe
                            and offered(r)})
            scored = [s for s in (key(rs, c) for c in cands) if math.isfinite(s[0])]
            if scored:
                cell[m], scored_on[m] = min(scored)[2], rs
        best = {}
        for fam in ("scoresde", "diffusers"):
            mine = [m for m in cell if m.startswith(fam)]
            pool = [m for m in mine if scored_on[m] is more] or mine
            best[fam] = min((key(scored_on[m], cell[m]) for m in pool), default=(0, 0, None))[2]
        refined_n = {"refined_n": next(r["n"] for r in more if r["nfe"])} if more else {}
        picks[str(nfe)] = {"member": cell, "best": best, **refined_n}
    return picks


def refined_rows(files) -> list[dict]:
    """The rows of stage `refine` and, at the NFEs where `refine --precise` ran, its rows in their place."""
    rows = common.read_json(files["refine"])["rows"] if files["refine"].exists() else []
    if files["refine_precise"].exists():
        precise = common.read_json(files["refine_precise"])["rows"]
        done = {r["nfe"] for r in precise if r["nfe"]}
        rows = [r for r in rows if r["nfe"] not in done] + precise
    return rows


def saved_picks(files, nfes):
    """`choose` on the saved choice rows and, where stage `refine` ran, its rows (`refined_rows`)."""
    if not files["choose"].exists():
        raise SystemExit(f"stochastic: {files['choose']} is missing: run --stage choose (same --out) first")
    return choose(common.read_json(files["choose"])["rows"], nfes, refined_rows(files))


def default_of(member):
    return f"{member}/default"


# ---- learned score: the digits VP model -----------------------------------------------------------------

def real_split_spread(splits: int = 20) -> dict:
    """FID-style distance and KID between the two halves of random splits of the real digits (n = 898 / 899):
    how far apart two real sets of this size lie, i.e. the resolution of both metrics at n ~ 900-1000."""
    from scoresde.evaluation.features import image_features
    from scoresde.evaluation.metrics import frechet_distance
    from scoresde.running.data import load_digits
    from scoresde.running.feature_net import digits_feature_net

    net, _ = digits_feature_net(common.REPO / "runs" / "features")
    x, _ = load_digits()
    f = image_features(x, net)
    g = torch.Generator().manual_seed(321)
    fids, kids = [], []
    for _ in range(splits):
        perm = torch.randperm(len(f), generator=g)
        a, b = f[perm[:len(f) // 2]], f[perm[len(f) // 2:]]
        fids.append(frechet_distance(a, b))
        kids.append(kid(a, b)[0])
    return {"splits": splits, "fid_mean": float(np.mean(fids)), "fid_sd": float(np.std(fids, ddof=1)),
            "kid_mean": float(np.mean(kids)), "kid_sd": float(np.std(kids, ddof=1))}


def digits_run(args):
    """The digits VP model as benchmarks/imaging.py trains it (bench budget), cached under runs/stochastic_digits."""
    from types import SimpleNamespace

    from benchmarks import imaging
    from scoresde.running.runs import load_run

    root = common.scratch_dir(NAME, "runs/stochastic_digits")
    folder = root / "VP"
    try:
        run = load_run(folder)
        print(f"reusing {folder} (step {run.step})", flush=True)
        return run.sde, run.model, run.data.sample_shape, 0.0
    except ValueError:
        pass
    ns = SimpleNamespace(runs=root, steps=args.train_steps, threads=1)
    tr, sec = imaging.train(ns, "VP", imaging.FAMILIES["VP"])
    model = tr.ema.copy().eval().requires_grad_(False)
    return tr.sde, model, tr.data.sample_shape, sec


def learned(args):
    from scoresde.evaluation.features import image_features
    from scoresde.evaluation.metrics import frechet_distance
    from scoresde.running.feature_net import FeatureEvaluator, real_sets

    if args.learned_run:  # a trained image run (digits or mnist data), e.g. the MNIST demo's VP model
        from scoresde.running.runs import load_run

        r = load_run(args.learned_run)
        sde, model, shape, train_s, data = r.sde, r.model, r.sample_shape, None, r.cfg.data
    else:
        (sde, model, shape, train_s), data = digits_run(args), "digits"
    ev = FeatureEvaluator(data, 10**6, common.REPO / "runs" / "features")  # n = all the other real images for the floor
    f_other = image_features(real_sets(data)[1], ev.net)
    floor = {"fid": ev.floor, "kid": kid(ev.ref, f_other), "n": f_other.shape[0]}
    print(f"feature net accuracy {ev.acc:.3f}; floor (real half B, n={floor['n']}): FID-style {ev.floor:.3f}, "
          f"KID {floor['kid'][0]:.2e} +- {floor['kid'][1]:.1e}", flush=True)
    stoch = {k: v for k, v in ours_methods().items() if k != "ald"}
    det = {m: (m, {}) for m in DETERMINISTIC if m in METHODS}
    rows = []

    @torch.no_grad()
    def one(label, kind, method, options, nfe, n, seed, stage):
        g = torch.Generator().manual_seed(seed)
        x_T = sde.prior_sample((n,) + tuple(shape), g, torch.float32)
        t0 = time.perf_counter()
        x, used, err, _ = run_config("ours", (method, options), sde, model, None, x_T, nfe, g)
        row = {"stage": stage, "label": label, "kind": kind, "nfe": nfe, "used": used, "n": n, "seed": seed,
               "error": err, "seconds": round(time.perf_counter() - t0, 2)}
        if x is not None and torch.isfinite(x).all():
            f = image_features(x.float().clamp(-1, 1), ev.net)
            kv, kse = kid(ev.ref, f)
            row.update(fid=frechet_distance(ev.ref, f), kid=kv, kid_se=kse)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    # choice: every candidate at every NFE on seed 10
    for nfe in args.learned_nfes:
        for kind, table in (("stochastic", stoch), ("deterministic", det)):
            for label, (method, options) in table.items():
                one(label, kind, method, options, nfe, args.n_learned_choose, 10, "choose")
    picks = {}
    for nfe in args.learned_nfes:
        for kind in ("stochastic", "deterministic"):
            c = [r for r in rows if r["stage"] == "choose" and r["nfe"] == nfe and r["kind"] == kind and "kid" in r]
            picks[f"{kind}/{nfe}"] = min(c, key=lambda r: r["kid"])["label"] if c else None
    print("learned picks (seed 10):", json.dumps(picks), flush=True)
    # report: the picks on seed 11
    every = {**stoch, **det}
    for nfe in args.learned_nfes:
        for kind in ("stochastic", "deterministic"):
            label = picks[f"{kind}/{nfe}"]
            if label:
                one(label, kind, *every[label], nfe, args.n_learned, 11, "report")
    # EDM churn sweep on seed 11
    if "edm_sde" in METHODS:
        for nfe in args.churn_nfes:
            for c in CHURN:
                one(f"edm_sde(S_churn={c:g})", "churn", "edm_sde", {"S_churn": c}, nfe, args.n_learned, 11, "churn")
    return {"data": data, "floor": floor, "split_spread": real_split_spread() if data == "digits" else None,
            "feature_accuracy": ev.acc, "train_s": train_s, "picks": picks, "rows": rows}


# ---- overhead -------------------------------------------------------------------------------------------

TWINS = {"ddpm": "DDPM", "ddim(eta=1)": "DDIM(eta=1)", "em": "EulerAncestral", "ei": "EulerAncestral",
         "dpm2m_sde": "SDE-DPM++2M", "dpm3m_sde": "SDE-DPM++3M", "sa3": "SA-Solver", "edm_sde": "KDPM2-Ancestral"}


def overhead(shape, steps, repeats):
    """Seconds per score evaluation of each sampler at its defaults with a free model (a cached tensor)."""
    sde, out = VP(), {}
    cached = torch.zeros(shape)
    free = lambda x, t: cached
    x_T = torch.randn(shape)
    gen = torch.Generator().manual_seed(0)
    entries = [(f"scoresde/{k}", "ours", v) for k, v in ours_methods().items() if k not in ("pc", "ald")]
    entries += [(f"diffusers/{k}", "peer", v) for k, v in peer_configs().items() if k.endswith("/default")]
    for name, kind, spec in entries:
        times = []
        for _ in range(repeats):
            if kind == "ours":
                per = METHODS[spec[0]].evals_per_step(spec[1])
                nfe = steps * per + 1
            else:
                nfe = steps * getattr(spec[0], "order", 1)
            t0 = time.perf_counter()
            x, used, err, _ = run_config(kind, spec, sde, free, free, x_T, nfe, gen)
            if err:
                break
            times.append((time.perf_counter() - t0) / used)
        if times:
            out[name] = min(times)
    return out


# ---- report ---------------------------------------------------------------------------------------------

def fmt_ratio(a, b, floor):
    if a < floor and b < floor:
        return f"floor ({a / b:.2f})"
    return f"{a / b:.2f}"


def out_file(file):
    path = common.out_dir(NAME) / file
    return common.read_json(path) if path.exists() else None


def report(choice_rows, picks, exact_rows, learned_res, over, nfes):
    plt = common.plt()
    lines = ["## (a) exact scores\n"]
    if exact_rows:
        lines.append("Picks made on the choice set (ring, mix16; sample seed 0), reported on fresh samples (seed 1) "
                     "and on mix16b, mix16c (never seen by a choice). ratio = |MMD^2| of the scoresde pick / the diffusers "
                     "pick; 'floor': both below 2 null sd.\n")
        for t in REPORT_TARGETS:
            trows = [r for r in exact_rows if r["target"] == t]
            if not trows:
                continue
            null = [r for r in trows if r["nfe"] == 0][0]
            fl = {m: 2 * null[f"{m}_sd"] for m in ("mmd2", "mmd2_fine")}
            lines.append(f"\n{t} (n = {null['n']}; null MMD^2 {null['mmd2']:.1e} +- {null['mmd2_sd']:.1e}, "
                         f"fine {null['mmd2_fine']:.1e} +- {null['mmd2_fine_sd']:.1e})\n")
            lines.append("| NFE | scoresde pick | MMD^2 | fine | gap | diffusers pick | MMD^2 | fine | gap | "
                         "ratio MMD^2 | ratio fine | best scoresde here (post hoc) | best diffusers here |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for nfe in nfes:
                b = picks[str(nfe)]["best"]
                o = [r for r in trows if r["config"] == b["scoresde"] and r["nfe"] == nfe]
                p = [r for r in trows if r["config"] == b["diffusers"] and r["nfe"] == nfe]
                if not o or not p:
                    continue
                o, p = o[0], p[0]
                post = {fam: min((r for r in trows if r["nfe"] == nfe and r["config"].startswith(fam)),
                                 key=lambda r: value(r, "mmd2")) for fam in ("scoresde", "diffusers")}
                lines.append(
                    f"| {nfe} | {o['config'][9:]} | {value(o, 'mmd2'):.2e} | {value(o, 'mmd2_fine'):.2e} | "
                    f"{o['gap']:+.3f} | {p['config'][10:]} (NFE {p['used']}) | {value(p, 'mmd2'):.2e} | "
                    f"{value(p, 'mmd2_fine'):.2e} | {p['gap']:+.3f} | "
                    f"{fmt_ratio(value(o, 'mmd2'), value(p, 'mmd2'), fl['mmd2'])} | "
                    f"{fmt_ratio(value(o, 'mmd2_fine'), value(p, 'mmd2_fine'), fl['mmd2_fine'])} | "
                    f"{post['scoresde']['config'][9:]} {value(post['scoresde'], 'mmd2'):.2e} | "
                    f"{post['diffusers']['config'][10:]} {value(post['diffusers'], 'mmd2'):.2e} |")
            lines.append(f"\n{t}: every method / scheduler, |MMD^2| at its default -> at its pick (NFE "
                         f"{', '.join(map(str, nfes))})\n")
            lines.append("| member | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
            lines.append("|---|" + "---|" * len(nfes))
            members = sorted({r["member"] for r in trows if r.get("member")})
            for m in members:
                cells = []
                for nfe in nfes:
                    d = [r for r in trows if r["config"] == default_of(m) and r["nfe"] == nfe]
                    pk = picks[str(nfe)]["member"].get(m)
                    c = [r for r in trows if r["config"] == pk and r["nfe"] == nfe]
                    dv = f"{value(d[0], 'mmd2'):.1e}" if d else "-"
                    cv = f"{value(c[0], 'mmd2'):.1e} ({pk.split('/')[-1]})" if c else "-"
                    cells.append(f"{dv} -> {cv}")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            fig, axes = plt.subplots(1, 3, figsize=(17, 5))
            colours = plt.get_cmap("tab20")
            for ax, metric in zip(axes, METRICS):
                for i, m in enumerate(members):
                    ys = []
                    for nfe in nfes:
                        pk = picks[str(nfe)]["member"].get(m)
                        c = [r for r in trows if r["config"] == pk and r["nfe"] == nfe]
                        ys.append(value(c[0], metric) if c else np.nan)
                    ours = m.startswith("scoresde")
                    ax.plot(nfes, np.maximum(ys, 1e-9), "-o" if ours else "--s", lw=1.0, ms=3, alpha=0.7,
                            color=colours(i % 20), label=m)
                for fam, colour in (("scoresde", "k"), ("diffusers", "r")):  # the picks made on the choice set
                    ys = []
                    for nfe in nfes:
                        c = [r for r in trows if r["config"] == picks[str(nfe)]["best"][fam] and r["nfe"] == nfe]
                        ys.append(value(c[0], metric) if c else np.nan)
                    ax.plot(nfes, np.maximum(ys, 1e-9), color=colour, lw=3, alpha=0.5,
                            label=f"best {fam} (picked on the choice set)")
                if metric != "abs_gap":
                    ax.axhspan(1e-9, 2 * null[f"{metric}_sd"], color="grey", alpha=0.25,
                               label="2 null sd (exact samples)")
                    ax.set_ylim(bottom=0.3 * null[f"{metric}_sd"])
                ax.set(xscale="log", yscale="log", xlabel="NFE", title=f"{t}: |{metric}| (each method at its pick)")
            axes[0].legend(fontsize=6, ncol=2)
            fig.tight_layout()
            common.save_figure(fig, NAME, f"stochastic_{t}.png")

    def stats(rows, metric):
        """Mean over the seeds +- its standard error; where each estimate carries its own, the inverse-variance
        weighted mean (seeds of different sample sizes pool) and its standard error."""
        v = np.array([value(r, metric) for r in rows])
        if f"{metric}_se" in rows[0]:
            w = np.array([r[f"{metric}_se"] ** -2 for r in rows])
            return float((w * v).sum() / w.sum()), float(w.sum() ** -0.5)
        return v.mean(), (v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan"))

    for precise, file in CONFIRM_FILES.items():
        confirm = out_file(file)
        if not confirm:
            continue
        seeds = sorted({r.get("seed", 2) for r in confirm["rows"]})
        lines.append(f"\nconfirm{' (precise)' if precise else ''}: the two picks again on fresh samples (seeds "
                     f"{', '.join(map(str, seeds))}): MMD^2 mean +- standard error over the seeds, ratio of the means; "
                     + ("metrics.mmd2_fourier; the mean weighted by each estimate's inverse variance (seeds of several "
                        "sample sizes pool), null sd = the standard error of one exact sample per seed, pooled the same "
                        "way; 'floor': both means below 2 pooled null sd" if precise else
                        "'floor': both means below 2 null sd (of one seed's estimate)") + "\n")
        lines.append("| target | n | null sd MMD^2 / fine | NFE | scoresde pick | MMD^2 | fine | diffusers pick | MMD^2 | fine "
                     "| ratio MMD^2 | ratio fine |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for t in REPORT_TARGETS:
            trows = [r for r in confirm["rows"] if r["target"] == t]
            nulls = [r for r in trows if r["nfe"] == 0]
            if not nulls:
                continue
            for nfe in sorted({r["nfe"] for r in trows if r["nfe"]}):
                b = confirm["picks"][str(nfe)]["best"]
                cells, here = [], set()
                for fam in ("scoresde", "diffusers"):
                    rs = [r for r in trows if r["config"] == b[fam] and r["nfe"] == nfe]
                    if not rs:  # rows of an earlier pick only
                        break
                    cells.append((rs[0]["config"].split("/", 1)[1], stats(rs, "mmd2"), stats(rs, "mmd2_fine")))
                    here |= {seed_n(r) for r in rs}
                if len(cells) < 2:
                    continue
                (on, om, of), (pn, pm, pf) = cells
                ns = sorted((r for r in nulls if seed_n(r) in here), key=seed_n)
                # precise: the null sd of the pooled mean (inverse-variance over the seeds, as `stats`)
                sd = {m: (sum(r[f"{m}_sd"] ** -2 for r in ns) ** -0.5 if precise else ns[0][f"{m}_sd"])
                      for m in ("mmd2", "mmd2_fine")}
                lines.append(
                    f"| {t} | {'/'.join(str(r['n']) for r in ns)} | {sd['mmd2']:.1e} / {sd['mmd2_fine']:.1e} | {nfe} | "
                    f"{on} | {om[0]:.2e} +- {om[1]:.1e} | {of[0]:.2e} +- {of[1]:.1e} | {pn} | {pm[0]:.2e} +- {pm[1]:.1e} "
                    f"| {pf[0]:.2e} +- {pf[1]:.1e} | {fmt_ratio(om[0], pm[0], 2 * sd['mmd2'])} | "
                    f"{fmt_ratio(of[0], pf[0], 2 * sd['mmd2_fine'])} |")
    if learned_res:
        fl = learned_res["floor"]
        lines.append("\n## (b) learned score: digits VP model\n")
        lines.append(f"floor (real half B against half A, n = {fl['n']}): FID-style {fl['fid']:.2f}, KID "
                     f"{fl['kid'][0]:.2e} +- {fl['kid'][1]:.1e}. Picks (lowest KID, seed 10, n = "
                     f"{next((r['n'] for r in learned_res['rows'] if r['stage'] == 'choose'), 0)}): "
                     f"{json.dumps(learned_res['picks'])}\n")
        if "split_spread" in learned_res:
            sp = learned_res["split_spread"]
            lines.append(f"Two halves of the real digits ({sp['splits']} random splits): FID-style {sp['fid_mean']:.2f} "
                         f"+- {sp['fid_sd']:.2f}, KID {sp['kid_mean']:.2e} +- {sp['kid_sd']:.1e} (sd over splits).\n")
        lines.append("| NFE | stochastic pick | FID-style | KID +- se | deterministic pick | FID-style | KID +- se | "
                     "KID difference / combined se |")
        lines.append("|---|---|---|---|---|---|---|---|")
        rep = [r for r in learned_res["rows"] if r["stage"] == "report" and "kid" in r]
        lnfes = sorted({r["nfe"] for r in rep})
        for nfe in lnfes:
            s = [r for r in rep if r["nfe"] == nfe and r["kind"] == "stochastic"]
            d = [r for r in rep if r["nfe"] == nfe and r["kind"] == "deterministic"]
            if s and d:
                s, d = s[0], d[0]
                z = (s["kid"] - d["kid"]) / math.hypot(s["kid_se"], d["kid_se"])
                lines.append(f"| {nfe} | {s['label']} | {s['fid']:.2f} | {s['kid']:.2e} +- {s['kid_se']:.1e} | "
                             f"{d['label']} | {d['fid']:.2f} | {d['kid']:.2e} +- {d['kid_se']:.1e} | {z:+.1f} |")
        ch = [r for r in learned_res["rows"] if r["stage"] == "churn" and "kid" in r]
        if ch:
            lines.append("\nEDM churn sweep (edm_sde, seed 11)\n")
            lines.append("| NFE | S_churn | FID-style | KID +- se |")
            lines.append("|---|---|---|---|")
            for r in ch:
                lines.append(f"| {r['nfe']} | {r['label'].split('=')[1][:-1]} | {r['fid']:.2f} | "
                             f"{r['kid']:.2e} +- {r['kid_se']:.1e} |")
        lines.append("\nchoice runs (seed 10): KID per method and NFE\n")
        cho = [r for r in learned_res["rows"] if r["stage"] == "choose"]
        lab = list(dict.fromkeys(r["label"] for r in cho))
        cn = sorted({r["nfe"] for r in cho})
        lines.append("| method | kind | " + " | ".join(f"NFE {n}" for n in cn) + " |")
        lines.append("|---|---|" + "---|" * len(cn))
        for lb in lab:
            rr = {r["nfe"]: r for r in cho if r["label"] == lb}
            kind = next(iter(rr.values()))["kind"]
            lines.append(f"| {lb} | {kind} | " + " | ".join(
                f"{rr[n]['kid']:.1e}" if n in rr and "kid" in rr[n] else "-" for n in cn) + " |")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key in zip(axes, ("kid", "fid")):
            for lb in lab:
                rr = sorted((r for r in cho if r["label"] == lb and key in r), key=lambda r: r["nfe"])
                st = rr[0]["kind"] == "stochastic" if rr else True
                ax.plot([r["nfe"] for r in rr], [r[key] for r in rr], "-o" if st else "--s", ms=3,
                        label=f"{lb} (seed 10)")
            for kind, c in (("stochastic", "k"), ("deterministic", "r")):
                rr = sorted((r for r in rep if r["kind"] == kind), key=lambda r: r["nfe"])
                if key == "kid":
                    ax.errorbar([r["nfe"] for r in rr], [r["kid"] for r in rr], [r["kid_se"] for r in rr], color=c,
                                lw=2.5, label=f"{kind} pick (seed 11)")
                else:
                    ax.plot([r["nfe"] for r in rr], [r["fid"] for r in rr], color=c, lw=2.5, label=f"{kind} pick (seed 11)")
            ax.axhline(fl["kid"][0] if key == "kid" else fl["fid"], color="grey", ls=":", label="real-data floor")
            ax.set(xscale="log", xlabel="NFE", title=f"digits VP: {key}" + (" (symlog)" if key == "kid" else ""))
            if key == "kid":  # unbiased: scatters around 0 at the floor
                ax.set_yscale("symlog", linthresh=max(fl["kid"][1], 1e-9))
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        common.save_figure(fig, NAME, "stochastic_learned.png")
    if over:
        lines.append("\n## (c) overhead: seconds per score evaluation, free model\n")
        cols = list(over)
        lines.append("| scoresde | " + " | ".join(f"{c}" for c in cols) + " | diffusers twin | " +
                     " | ".join(cols) + " | ratio " + " | ratio ".join(cols) + " |")
        lines.append("|---|" + "---|" * (3 * len(cols) + 1))
        for k in [k for k in over[cols[0]] if k.startswith("scoresde/")]:
            twin = TWINS.get(k[9:])
            tk = f"diffusers/{twin}/default" if twin else None
            ours = [f"{over[c].get(k, float('nan')):.2e}" for c in cols]
            if tk and tk in over[cols[0]]:
                th = [f"{over[c][tk]:.2e}" for c in cols]
                ra = [f"{over[c][k] / over[c][tk]:.2f}" for c in cols]
            else:
                th, ra = ["-"] * len(cols), ["-"] * len(cols)
            lines.append(f"| {k[9:]} | " + " | ".join(ours) + f" | {twin or '-'} | " + " | ".join(th) + " | " +
                         " | ".join(ra) + " |")
        others = [k for k in over[cols[0]] if k.startswith("diffusers/")]
        lines.append("\nall diffusers defaults: " + "; ".join(
            f"{k[10:-8]} " + "/".join(f"{over[c][k]:.2e}" for c in cols) for k in others))
    text = "\n".join(lines)
    common.write_text(NAME, "stochastic_report.md", text)
    print(text)


# ---- harness --------------------------------------------------------------------------------------------

def largest_n(rows: list[dict]) -> list[dict]:
    """One row per (target, NFE, configuration, seed): the one of the largest n. Rows of one seed at several n are
    not independent estimates (their x_T and noise come from one generator), so only the most precise is pooled."""
    best: dict = {}
    for r in rows:
        key = (r["target"], r["nfe"], r["config"], r["seed"])
        if key not in best or r["n"] > best[key]["n"]:
            best[key] = r
    return list(best.values())


def versus(args, path) -> None:
    """Stage versus: `--configs` side by side on `--targets` at each of `--confirm-seeds` and `--confirm-nfes`,
    n = --n-precise, scored by metrics.mmd2_fourier, in place of the saved rows of the same target, NFE, seed, n and
    configuration in `path` (no --configs: nothing run); then a table and a figure of each configuration's estimates
    and their inverse-variance mean over the seeds, each seed at its largest n (`largest_n`;
    stochastic_versus.{md,png})."""
    known = {c[0] for c in all_configs()}
    if set(args.configs) - known:
        raise SystemExit(f"--configs: give configuration names of this benchmark; unknown: "
                         f"{sorted(set(args.configs) - known)}")
    if args.configs:
        wanted = {(c, nfe) for c in args.configs for nfe in args.confirm_nfes}
        rows = [{**r, "seed": seed} for seed in args.confirm_seeds for t in args.targets
                for r in evaluate(t, args.n_precise, args.confirm_nfes, seed, wanted, precise=True)]
        key = lambda r: (r["target"], r["nfe"], r["seed"], r["n"], r["config"])  # a null row: nfe 0, its own name
        new = {key(r) for r in rows}
        saved = common.read_json(path)["rows"] if path.exists() else []
        common.write_json(NAME, {"rows": [r for r in saved if key(r) not in new] + rows}, file=path.name, indent=None)
    if not path.exists():
        raise SystemExit(f"{path.name}: nothing saved yet; run --stage versus with --configs first")
    every = common.read_json(path)["rows"]
    rows = largest_n(every)
    lines = ["| target | NFE | configuration | seed: MMD^2 +- se (n) | pooled MMD^2 | fine (pooled) | gap (mean) "
             "| null se (its seeds) |",
             "|---|---|---|---|---|---|---|---|"]
    cells = sorted({(r["target"], r["nfe"], r["config"]) for r in rows if r["nfe"]})
    points = []
    for (t, nfe, c) in cells:
        rs = sorted((r for r in rows if (r["target"], r["nfe"], r["config"]) == (t, nfe, c)), key=seed_n)
        nulls = [r for r in every if r["target"] == t and r["nfe"] == 0 and seed_n(r) in map(seed_n, rs)]
        pooled = {k: np.average([r[k] for r in rs], weights=[r[f"{k}_se"] ** -2 for r in rs])
                  for k in ("mmd2", "mmd2_fine")}
        se = sum(r["mmd2_se"] ** -2 for r in rs) ** -0.5
        null_se = sum(r["mmd2_sd"] ** -2 for r in nulls) ** -0.5
        per_seed = "; ".join(f"{r['seed']}: {r['mmd2']:.2e} +- {r['mmd2_se']:.1e} ({r['n']:.0e})" for r in rs)
        lines.append(f"| {t} | {nfe} | {c} | {per_seed} | {pooled['mmd2']:.2e} +- {se:.1e} | {pooled['mmd2_fine']:.1e} "
                     f"| {np.mean([r['gap'] for r in rs]):+.3f} | {null_se:.1e} |")
        points.append((f"{t}, NFE {nfe}", c, pooled["mmd2"], se, 2 * null_se))
    common.write_text(NAME, "stochastic_versus.md", "\n".join(lines))
    print("\n".join(lines))
    plt = common.plt()
    groups, configs = list(dict.fromkeys(p[0] for p in points)), sorted({p[1] for p in points})
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 3, 4))
    for j, c in enumerate(configs):
        mine = [(groups.index(g), v, e) for g, cc, v, e, _ in points if cc == c]
        ax.errorbar([i + 0.8 * (j + 0.5) / len(configs) - 0.4 for i, _, _ in mine], [v for _, v, _ in mine],
                    [2 * e for _, _, e in mine], fmt="o", capsize=3, label=c)
    for i, g in enumerate(groups):
        ax.hlines(max(p[4] for p in points if p[0] == g), i - 0.45, i + 0.45, colors="grey", linestyles="--")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_yscale("symlog", linthresh=1e-6)  # estimates near 0 (of either sign) beside ones 100x larger
    ax.set_ylim(top=2 * max(v + 2 * e for _, _, v, e, _ in points))
    ax.set(xticks=range(len(groups)), ylabel="MMD^2 (+- 2 se; dashed: 2 null se)",
           title="named configurations side by side (inverse-variance mean over seeds)")
    ax.set_xticklabels(groups, rotation=30, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, NAME, "stochastic_versus.png", dpi=110)


def add_arguments(ap) -> None:
    ap.add_argument("--stage", choices=("choose", "refine", "exact", "confirm", "versus", "learned", "split-spread",
                                        "overhead", "report", "all"),
                    default="all", help="split-spread: add real_split_spread() to a saved stochastic_learned.json")
    ap.add_argument("--n-choose", type=int, default=3000, help="samples per configuration on the choice set")
    ap.add_argument("--n-refine", type=int, default=20000, help="refine: samples per tied configuration")
    ap.add_argument("--n", type=int, default=6000, help="samples per configuration on the report set")
    ap.add_argument("--nfes", type=int, nargs="+", default=list(NFES))
    ap.add_argument("--learned-nfes", type=int, nargs="+", default=list(LEARNED_NFES))
    ap.add_argument("--churn-nfes", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--n-learned-choose", type=int, default=300)
    ap.add_argument("--n-learned", type=int, default=1000)
    ap.add_argument("--train-steps", type=int, default=1500, help="digits VP model (imaging's bench budget)")
    ap.add_argument("--learned-run", type=Path, default=None,
                    help="learned stage on this run folder (an image score model on digits or mnist) instead of the "
                         "digits VP model; results in stochastic_learned_<data>_<folder>.json")
    ap.add_argument("--overhead-steps", type=int, default=50)
    ap.add_argument("--overhead-repeats", type=int, default=3)
    ap.add_argument("--n-confirm", type=int, default=20000, help="confirm: samples for the two picks (seed 2)")
    ap.add_argument("--confirm-nfes", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--confirm-seeds", type=int, nargs="+", default=[2, 3, 4, 5, 6],
                    help="confirm: sample seeds (the report gives the mean over them +- its standard error)")
    ap.add_argument("--precise", action="store_true",
                    help="refine, confirm: score by metrics.mmd2_fourier at --n-precise samples, Brownian noise by its "
                         "i.i.d. twin; refine: the configurations still tied after the refinement (a pick made on these "
                         "rows where present), results in stochastic_refine_precise.json; confirm: results in "
                         "stochastic_confirm_precise.json, beside the saved rows of other NFEs and seeds")
    ap.add_argument("--n-precise", type=int, default=200000, help="--precise: samples per configuration and seed")
    ap.add_argument("--targets", nargs="+", choices=REPORT_TARGETS + tuple(FRESH), default=list(REPORT_TARGETS),
                    help="exact, confirm, versus: only these targets (the saved rows of the others are kept); "
                         f"{', '.join(FRESH)}: versus only")
    ap.add_argument("--configs", nargs="+", default=[], help="versus: the configurations (full names, e.g. "
                    "'scoresde/sa3/auto tau=0.5' 'diffusers/SA-Solver/p3c3')")
    ap.add_argument("--members", nargs="+", default=None,
                    help="choose/refine/exact/confirm: only these members (e.g. scoresde/sa3), merged into the saved rows")


def run_tag(args) -> str:
    tag = ("" if args.stage == "all" else args.stage) + ("-precise" if args.precise else "")
    if args.precise or args.stage == "versus" and args.configs:  # one record per precise run
        nfes, seeds = (args.nfes, []) if args.stage == "refine" else (args.confirm_nfes, args.confirm_seeds)
        tag += f"-n{args.n_precise}-nfe{'+'.join(map(str, nfes))}"
        tag += f"-seed{'+'.join(map(str, seeds))}" if seeds else ""
    tag += "-" + "+".join(args.targets) if list(args.targets) != list(REPORT_TARGETS) else ""
    tag += "-" + "+".join(c.replace("/", "_").replace(" ", "") for c in args.configs) if args.configs else ""
    return tag + ("-" + "+".join(m.split("/")[-1] for m in args.members) if args.members else "")


def run(args):
    global MEMBERS
    MEMBERS = args.members
    out = common.out_dir(NAME)
    files = {k: out / f"stochastic_{k}.json" for k in ("choose", "refine", "refine_precise", "exact", "learned",
                                                         "overhead")}
    print("stochastic methods registered:", ", ".join(ours_methods()), flush=True)
    if args.stage in ("choose", "all"):
        rows = [r for t in CHOICE_TARGETS for r in evaluate(t, args.n_choose, args.nfes, seed=0, null_repeats=3)]
        rows = merge(files["choose"], rows)
        common.write_json(NAME, {"rows": rows, "picks": choose(rows, args.nfes)}, file=files["choose"].name, indent=None)
    if args.stage in ("refine", "all"):  # the ties of the choice set again, more samples, same choice targets and seed 0
        # --precise: the configurations still tied after the refinement, at n_precise by metrics.mmd2_fourier
        source = common.read_json(files["refine" if args.precise and files["refine"].exists() else "choose"])["rows"]
        wanted = {(c, nfe) for nfe in args.nfes for c in tied(source, nfe)}
        n, path = (args.n_precise, files["refine_precise"]) if args.precise else (args.n_refine, files["refine"])
        print(f"refining {len(wanted)} tied configurations at n = {n}", flush=True)
        rows = [r for t in CHOICE_TARGETS for r in evaluate(t, n, args.nfes, seed=0, wanted=wanted, precise=args.precise)]
        rows = merge(path, rows) if MEMBERS else keep_other_cells(path, rows)
        common.write_json(NAME, {"rows": rows}, file=path.name, indent=None)
    if args.stage in ("exact", "all"):
        picks = saved_picks(files, args.nfes)  # from the choice rows (the rule may have changed since)
        wanted = set()
        for nfe in args.nfes:
            p = picks[str(nfe)]
            wanted |= {(c, nfe) for c in p["member"].values()}
            wanted |= {(default_of(m), nfe) for m in p["member"]}
        rows = [r for t in args.targets for r in evaluate(t, args.n, args.nfes, seed=1, wanted=wanted)]
        rows = merge(files["exact"], rows) if MEMBERS else keep_other_cells(files["exact"], rows)
        picks = saved_picks(files, sorted({r["nfe"] for r in rows if r["nfe"]}))
        common.write_json(NAME, {"rows": rows, "picks": picks}, file=files["exact"].name, indent=None)
    if args.stage == "learned" and args.learned_run:  # another model: its own file, outside the digits report
        res = learned(args)
        name = f"stochastic_learned_{res['data']}_{Path(args.learned_run).name.lower()}.json"
        common.write_json(NAME, res, file=name, indent=None)
        return
    if args.stage in ("learned", "all"):
        common.write_json(NAME, learned(args), file=files["learned"].name, indent=None)
    if args.stage in ("confirm", "all"):  # the goal's two picks again, more samples, fresh seed
        picks = saved_picks(files, args.confirm_nfes)
        wanted = {(picks[str(nfe)]["best"][fam], nfe) for nfe in args.confirm_nfes for fam in ("scoresde", "diffusers")}
        rows = [{**r, "seed": seed} for k, seed in enumerate(args.confirm_seeds) for t in args.targets
                for r in evaluate(t, args.n_precise if args.precise else args.n_confirm, args.confirm_nfes, seed, wanted,
                                  null_repeats=4 if k == 0 else 1, precise=args.precise)]
        path = out / CONFIRM_FILES[args.precise]
        rows = keep_other_cells(path, rows)  # the picks of kept rows are re-derived with the same rule
        nfes = sorted({r["nfe"] for r in rows if r["nfe"]})
        common.write_json(NAME, {"rows": rows, "picks": saved_picks(files, nfes)}, file=path.name, indent=None)
    if args.stage == "versus":
        versus(args, out / "stochastic_versus.json")
        return
    if args.stage == "split-spread":
        res = common.read_json(files["learned"])
        res["split_spread"] = real_split_spread()
        common.write_json(NAME, res, file=files["learned"].name, indent=None)
    if args.stage in ("overhead", "all"):
        steps, reps = args.overhead_steps, args.overhead_repeats
        common.write_json(NAME, {"image (64,3,32,32)": overhead((64, 3, 32, 32), steps, reps),
                                 "toy (1,2)": overhead((1, 2), steps, reps)}, file=files["overhead"].name, indent=None)
    ch = common.read_json(files["choose"]) if files["choose"].exists() else None
    ex = common.read_json(files["exact"]) if files["exact"].exists() else None
    report(ch and ch["rows"], (ex or ch or {}).get("picks"), ex and ex["rows"],
           common.read_json(files["learned"]) if files["learned"].exists() else None,
           common.read_json(files["overhead"]) if files["overhead"].exists() else None, args.nfes)
