"""Sample error versus NFE: every scoresde sampler against diffusers' schedulers (issue 8).

Targets (exact scores, float64): (a) the 2-D ring, targets.ring(); (b) the 16-D mixture
random_mixture(16, 8, seed=0) with full covariances and unequal weights, both under VP
(beta 0.1 .. 20). scoresde samplers use the continuous VP score; diffusers' schedulers get
the exact eps model of the matching discrete schedule (1000 linear betas 1e-4 .. 0.02),
fractional timesteps resolved by diffusers' own log-sigma interpolation.

Metrics against the exact target: (i) the log-density gap E_gen log p - E_true log p;
(ii) the unbiased squared MMD of scoresde.metrics.mmd2 (kernel sum at bandwidths
{0.5, 1, 2} sqrt(tr Cov)), its pair term computed in blocks so large n fits in memory,
with the null spread from exact samples of the same size.

Stages: (1) a sweep over every config at n_sweep samples picks the best peers and the
time grid; (2) the headline re-measures the best configs, and the untuned default (unipc2), on fresh
samples at n = 20000 (--n);
(3) per-step overhead of each sampler with a free score model.
Run: `python -m benchmarks samplers` (make bench-samplers). Outputs in benchmarks/results/samplers/:
samplers_{sweep,headline,overhead}.json, samplers_report.md, samplers_{ring,mix16}.png; side runs
samplers_transfer.json (--stage transfer) and samplers_overhead_cuda.json (--stage overhead --device cuda).

Held-out discipline (issue 22): `--part heldout --targets ...` runs, on targets that played no part in any choice
(REPORTING: random_mixture seeds 100-102 in 2, 8, 16 and 32 dimensions, a mixture with very unequal weights, one
with near-singular covariances), the untuned default grid, the automatic schedule (unipc2 with cached_schedule's ts / denoise at NFE <= 10,
whose constants were set on SELECTION: ring, mix16 and seeds 0-9), the per-target best of a small unipc family
(an oracle), every diffusers configuration and the converged sampler (CONVERGED: the level of that x_T draw,
which its MMD^2's heavy tail can set well above the exact samples' floor), at NFE 5, 10, 20, 50 and
n = --n-heldout (4000) samples per cell;
`--part heldout-report` merges the runs into samplers_heldout.md and samplers_heldout.png (runs at another
--n-heldout: samplers_heldout-n{N}.{md,png}, from those runs alone; with --targets, of those targets alone:
samplers_heldout-report-TARGETS.{md,png}). `--part floor-check` sets the fixed grid at
NFE 20 and 50 beside a fresh exact sample (`floor_check`).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings

import numpy as np
import torch

from benchmarks import common
from scoresde.core.sde import VP
from scoresde.core.targets import GaussianMixture, random_mixture, ring
from scoresde.evaluation.metrics import _mixture_kernel_means, mmd2
from scoresde.sampling import fit_grid, sample
from scoresde.sampling.schedule import AUTO_MAX_NFE, SEARCH, auto_schedule

warnings.filterwarnings("ignore")
F64 = torch.float64
NFES = (5, 10, 20, 50, 100)
NAME = "samplers"
N_HELDOUT = 4000  # samples per cell of the held-out parts (--n-heldout)
NULL_REPEATS = 4  # exact-sample sets of size n behind a Scorer's null mean and sd
CONFIGS: list[str] | None = None  # --configs: run only these configuration names (None: all)
QUICK = dict(n_sweep=200, n=300, nfes=[5], overhead_steps=5, overhead_repeats=1,
             configs=["scoresde/unipc2", "scoresde/dpm3m", "scoresde/heun", "diffusers/DPM++3M/default",
                      "diffusers/UniPC/default"], n_heldout=300, targets=["d2s100", "unequal"])


# ---- exact models ---------------------------------------------------------------------

class MixtureScore:
    """Exact grad log p for a mixture pushed to (alpha, sigma) with one time per call: the same formula
    as targets.DiffusedMixture.score, written as two matrix products (checked against it below)."""

    def __init__(self, target: GaussianMixture):
        self.target = target
        evals, U = target._eig
        K, d = target.means.shape
        self.evals, self.logw, self.K, self.d = evals, target.weights.log(), K, d
        self.Uc = U.permute(1, 0, 2).reshape(d, K * d)  # columns: eigenvectors of every component
        self.mu_proj = torch.einsum("kd,kde->ke", target.means, U)

    def at(self, alpha: float, sigma: float, x: torch.Tensor) -> torch.Tensor:
        var = alpha**2 * self.evals + sigma**2
        z = (x @ self.Uc).view(-1, self.K, self.d) - alpha * self.mu_proj
        zv = z / var
        r = torch.softmax(self.logw - 0.5 * (z * zv).sum(-1) - 0.5 * var.log().sum(-1), -1)
        return -((r[:, :, None] * zv).reshape(-1, self.K * self.d) @ self.Uc.T)

    def continuous(self, sde: VP):
        def score(x, t):
            a, s = float(sde.alpha(t[0])), float(sde.sigma(t[0]))
            return self.at(a, s, x)
        return score


class DiscreteEps:
    """Exact eps(x, timestep) for the 1000-step linear-beta DDPM schedule; a fractional timestep means
    the noise level diffusers assigns it (log sigma interpolated linearly between integers)."""

    def __init__(self, score: MixtureScore):
        self.score = score
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
        abar = torch.cumprod(1 - betas, 0)
        self.log_sigmas = (0.5 * torch.log((1 - abar) / abar)).numpy()

    def __call__(self, x, timestep):
        t = float(timestep)
        log_s = np.interp(t, np.arange(1000), self.log_sigmas)
        abar = 1 / (1 + math.exp(2 * log_s))
        sigma = math.sqrt(1 - abar)
        return -sigma * self.score.at(math.sqrt(abar), sigma, x)


# ---- samplers -------------------------------------------------------------------------

OURS = {  # name: (method, options)
    "em": ("em", {}), "ei": ("ei", {}), "pc": ("pc", {}), "ald": ("ald", {}),
    "euler": ("euler", {}), "heun": ("heun", {}), "ddim": ("ddim", {}), "ddpm": ("ddpm", {}),
    "dpm2m": ("dpm2m", {}), "dpm3m": ("dpm3m", {}), "unipc2": ("unipc2", {}), "unipc3": ("unipc3", {}),
}
GRID_STUDY = {"uniform": {"grid": "uniform"}, "poly2": {"grid": "poly", "power": 2.0},
              "logsnr": {"grid": "logsnr"}, "edm7": {"grid": "edm", "rho": 7.0}}
T_ENDS = (1e-3, 1e-2, 0.05, 0.2)
UNIPC_GRIDS = {**GRID_STUDY, "poly3": {"grid": "poly", "power": 3.0}, "poly4": {"grid": "poly", "power": 4.0}}
UNIPC_T_ENDS = (None, 3e-3, 1e-2, 3e-2, 0.1)  # None: end_time_for_steps
FIT_T_ENDS, FIT_MAX_NFE, FIT_PROBES = (None, 3e-2, 0.1, 0.2), 10, 512  # grids fitted by samplers.fit_grid


def peers():
    import diffusers as D
    base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")
    sigma_knobs = [("karras", {"use_karras_sigmas": True}), ("exp", {"use_exponential_sigmas": True})]
    trailing = [("trailing", {"timestep_spacing": "trailing"})]
    table = {
        "DDIM": (D.DDIMScheduler, {"clip_sample": False}, trailing),
        "DPM++2M": (D.DPMSolverMultistepScheduler, {"solver_order": 2, "algorithm_type": "dpmsolver++"},
                    sigma_knobs + [("lu", {"use_lu_lambdas": True})] + trailing),
        "DPM++3M": (D.DPMSolverMultistepScheduler, {"solver_order": 3, "algorithm_type": "dpmsolver++"},
                    sigma_knobs + [("lu", {"use_lu_lambdas": True})] + trailing),
        "UniPC": (D.UniPCMultistepScheduler, {}, sigma_knobs + trailing),
        "DEIS": (D.DEISMultistepScheduler, {}, sigma_knobs + trailing),
        "LMS": (D.LMSDiscreteScheduler, {}, sigma_knobs + trailing),
        "Heun": (D.HeunDiscreteScheduler, {}, sigma_knobs + trailing),
        "Euler": (D.EulerDiscreteScheduler, {}, sigma_knobs + trailing),
    }
    out = {}
    for name, (cls, fixed, knobs) in table.items():
        for knob, kw in [("default", {})] + knobs:
            out[f"{name}/{knob}"] = (cls, {**base, **fixed, **kw})
    return out


def run_peer(cls, config, eps_model, x_T, nfe):
    """Drive a diffusers scheduler with the largest step count whose NFE fits `nfe`; returns (x, nfe used)."""
    sched = cls(**config)
    steps = (nfe + 1) // 2 if cls.__name__.startswith("Heun") else nfe
    sched.set_timesteps(steps, device=x_T.device)
    x, used = x_T * sched.init_noise_sigma, 0
    for t in sched.timesteps:
        eps = eps_model(sched.scale_model_input(x, t), t)
        used += 1
        x = sched.step(eps, t, x).prev_sample
    return x, used


def run_ours(sde, score_fn, method, options, x_T, nfe, gen):
    """sample() at this budget, and the probe-batch score evaluations spent fitting its grid (0 unless
    options has fit=True: fit_grid on FIT_PROBES prior draws of their own seed, apart from x_T); where the
    default denoise does not fit the budget (pc at even NFE), without it."""
    options, fit_evals = dict(options), 0
    if options.pop("fit", False):
        probe = sde.prior_sample((FIT_PROBES, x_T.shape[1]), torch.Generator().manual_seed(7), x_T.dtype)
        fit = fit_grid(sde, score_fn, probe, method=method, nfe=nfe, **options)
        options = {k: v for k, v in options.items() if k != "t_end"} | {"ts": fit.ts}
        fit_evals = fit.evaluations
    options["schedule"] = "default"  # the method's fixed grid, or the one given: the automatic schedule has its rows
    try:
        x = sample(sde, score_fn, None, method=method, nfe=nfe, x_T=x_T, generator=gen, **options)
    except ValueError:
        options = {**options, "denoise": not options.get("denoise", True)}
        x = sample(sde, score_fn, None, method=method, nfe=nfe, x_T=x_T, generator=gen, **options)
    return x, fit_evals


# ---- metrics --------------------------------------------------------------------------

def bandwidths(target: GaussianMixture) -> np.ndarray:
    """metrics.mmd2's defaults {0.5, 1, 2} sqrt(tr Cov) (the global shape), then the component scale
    min_k sqrt(tr Sigma_k) (resolves the modes; penalises over-sharp samples)."""
    fine = float(torch.diagonal(target.covariances, dim1=1, dim2=2).sum(1).sqrt().min())
    return np.array(list(math.sqrt(float(torch.trace(target.covariance()))) * np.array([0.5, 1.0, 2.0])) + [fine])


def kernel_sums(a: torch.Tensor, b: torch.Tensor, h: np.ndarray, dtype=torch.float32, block: int = 250) -> np.ndarray:
    """sum_{i, j} exp(-|a_i - b_j|^2 / (2 h^2)) for each h, in row blocks of a (kernels in `dtype`, sums in float64)
    so n = 20000 fits in memory; blocks of 250 rows keep each temporary under glibc's mmap threshold (1000-row
    blocks ran 5x slower, in page faults)."""
    a, b = a.to(dtype), b.to(dtype)
    sq_a, sq_b = (a**2).sum(1), (b**2).sum(1)
    sums = np.zeros(len(h))
    for i in range(0, len(a), block):
        d2 = (sq_a[i:i + block, None] + sq_b[None, :] - 2 * a[i:i + block] @ b.T).clamp_min_(0)
        for j, hh in enumerate(h):
            sums[j] += torch.exp(d2 * (-0.5 / hh**2)).sum(dtype=F64).item()
    return sums


def mmd2_blocked(x: torch.Tensor, target: GaussianMixture, block: int = 250) -> np.ndarray:
    """metrics.mmd2(x, target, [h]).value for each h in bandwidths(target): the generated-pairs U-statistic
    from `kernel_sums` (float32 kernels)."""
    h = bandwidths(target)
    n = len(x)
    pair_mean = (kernel_sums(x, x, h, block=block) - n) / (n * (n - 1))  # k(x, x) = 1 on the diagonal
    closed = [_mixture_kernel_means(x.to(F64).numpy(), target, np.array([hh])) for hh in h]
    return np.array([pair_mean[j] - 2 * mk.mean() + mkk for j, (mk, mkk) in enumerate(closed)])


def mmd2_paired_blocked(x: torch.Tensor, y: torch.Tensor, h: np.ndarray, yy: np.ndarray | None = None,
                        xx: np.ndarray | None = None) -> np.ndarray:
    """schedule.mmd2_paired(x, y, [h]) for each h, from `kernel_sums` in float64 (the terms nearly cancel): the
    unbiased MMD^2 between the laws of x and y whose pairs (x_i, y_i) are drawn jointly, here two samplers run from
    the same x_T, so its noise is that of the pairs' differences and not the draw's. `yy`: kernel_sums(y, y, h)
    in float64, the same for every x paired with y; `xx` likewise for x, the same for every y it is paired with."""
    n = len(x)
    yy = kernel_sums(y, y, h, F64) if yy is None else yy
    xx = kernel_sums(x, x, h, F64) if xx is None else xx
    d2 = ((x.to(F64) - y.to(F64)) ** 2).sum(1)
    own = np.array([float(torch.exp(d2 * (-0.5 / hh**2)).sum()) for hh in h])  # k(x_i, y_i), left out of the cross
    return (xx + yy - 2 * kernel_sums(x, y, h, F64) - 2 * n + 2 * own) / (n * (n - 1))


def paired_metrics(x: torch.Tensor | None, h: np.ndarray, references: dict[str, tuple]) -> dict:
    """The row fields of `references` (field: (y, kernel_sums(y, y, h) in float64)): mmd2_paired_blocked of x
    against each y summed over the bandwidths h (NaN for a failed run), x's own kernel sums computed once."""
    if x is None or not bool(torch.isfinite(x).all()):
        return {field: float("nan") for field in references}
    xx = kernel_sums(x, x, h, F64)
    return {field: float(mmd2_paired_blocked(x, y, h, yy, xx).sum()) for field, (y, yy) in references.items()}


def metrics_of(values: np.ndarray) -> dict:
    return {"mmd2": float(values[:3].sum()), "mmd2_fine": float(values[3])}


class Scorer:
    """Log-density gap and both MMD^2 columns; null mean and spread from exact samples of the same size."""

    def __init__(self, target, n, gen, null_repeats=NULL_REPEATS):
        self.target, self.n = target, n
        self.ref_logp = float(target.log_prob(target.sample(200000, gen)).mean())
        null = [metrics_of(mmd2_blocked(target.sample(n, gen), target)) for _ in range(null_repeats)]
        self.null = {k: (float(np.mean([v[k] for v in null])), float(np.std([v[k] for v in null], ddof=1)))
                     for k in null[0]}

    def __call__(self, x):
        if x is None or not torch.isfinite(x).all():
            return {"gap": float("nan"), "mmd2": float("nan"), "mmd2_fine": float("nan")}
        return {"gap": float(self.target.log_prob(x).mean()) - self.ref_logp, **metrics_of(mmd2_blocked(x, self.target))}


def null_row(scorer, **fields) -> dict:
    """The row of a scorer's null spread (mean and sd of each metric over exact samples), with `fields`."""
    return {**fields, "config": "null (exact samples)", "nfe": 0, **{k: v[0] for k, v in scorer.null.items()},
            **{f"{k}_sd": v[1] for k, v in scorer.null.items()}}


# ---- stages ---------------------------------------------------------------------------

def setup(name):
    target = ring() if name == "ring" else random_mixture(16, 8, seed=0)
    return target, MixtureScore(target)


def self_check():
    """The fast exact models agree with targets' scores and the blocked MMD with metrics.mmd2."""
    gen = torch.Generator().manual_seed(0)
    sde = VP()
    for name in ("ring", "mix16"):
        target, sc = setup(name)
        x = target.at_time(sde, 0.3).sample(500, gen)
        t = torch.full((500,), 0.3, dtype=F64)
        torch.testing.assert_close(sc.continuous(sde)(x, t), target.score_fn(sde)(x, t))
        ref = [mmd2(x, target, [h]).value for h in bandwidths(target)]
        np.testing.assert_allclose(mmd2_blocked(x, target, block=128), ref, rtol=1e-4, atol=1e-6)
        assert abs(metrics_of(mmd2_blocked(x, target))["mmd2"] - mmd2(x, target).value) < 1e-6


def configs():
    """(name, kind, spec): scoresde methods at sample()'s defaults, the time-grid study, every peer."""
    out = [(f"scoresde/{k}", "ours", v) for k, v in OURS.items()]
    out += [(f"scoresde/dpm3m@{g},t_end={te:g}{',lof=0' * (not lof)}", "ours",
             ("dpm3m", {**o, "t_end": te, "lower_order_final": lof}))
            for g, o in GRID_STUDY.items() for te in T_ENDS for lof in (True, False)]
    out += [(f"scoresde/{m}@{g}" + (f",t_end={te:g}" if te else ""), "ours",
             (m, {**o, **({"t_end": te} if te else {})}))
            for m in ("unipc2", "unipc3") for g, o in UNIPC_GRIDS.items() for te in UNIPC_T_ENDS
            if (g, te) != ("poly3", None)]  # that one is the method's default row
    out += [(f"scoresde/{m}@fit" + (f",t_end={te:g}" if te else "") + ",lof=0" * (not lof), "ours",
             (m, {"fit": True, "lower_order_final": lof, **({"t_end": te} if te else {})}))
            for m in ("unipc2", "unipc3") for te in FIT_T_ENDS for lof in (True, False)]
    out += [(f"diffusers/{k}", "peer", v) for k, v in peers().items()]
    return out if CONFIGS is None else [c for c in out if c[0] in CONFIGS]


def evaluate(tname, n, nfes, seed, wanted=None):
    """Run configs (all, or the {(name, nfe)} in `wanted`) on one target with n samples; rows of dicts."""
    sde = VP()
    target, sc = setup(tname)
    gen = torch.Generator().manual_seed(seed)
    scorer = Scorer(target, n, gen)
    rows = [null_row(scorer, target=tname, n=n)]
    x_T = sde.prior_sample((n, target.dim), gen, F64)
    score_fn, eps = sc.continuous(sde), DiscreteEps(sc)
    for name, kind, spec in configs():
        for nfe in nfes:
            if (wanted is not None and (name, nfe) not in wanted) or ("@fit" in name and nfe > FIT_MAX_NFE):
                continue
            t0 = time.perf_counter()
            if kind == "ours":
                (x, fit_evals), used = run_ours(sde, score_fn, *spec, x_T, nfe, gen), nfe
            else:
                (x, used), fit_evals = run_peer(*spec, eps, x_T, nfe), 0
            row = {"target": tname, "config": name, "nfe": nfe, "used": used, "n": n, **scorer(x),
                   "fit_evals": fit_evals, "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


METRICS = ("mmd2", "mmd2_fine", "abs_gap")
DEFAULT = "scoresde/unipc2"  # the fixed grid, a user's default above NFE 10 (at NFE <= 10: the automatic schedule)


def value(row, metric):
    """|metric|: the unbiased MMD^2 scatters around 0 at the floor, so closest to 0 is best."""
    v = abs(row["gap"] if metric == "abs_gap" else row[metric])
    return v if v == v else float("inf")


def best(rows, tname, nfe, metric, family):
    cands = [r for r in rows if r["target"] == tname and r["nfe"] == nfe and r["config"].startswith(family)]
    return min(cands, key=lambda r: value(r, metric)) if cands else None


def overhead(shape=(64, 3, 32, 32), steps=50, repeats=3, device="cpu"):
    """Seconds per step of each sampler with a free model (a cached tensor), scoresde vs diffusers; on a GPU
    the clock stops after the device has finished (the first repeat also warms the kernels up)."""
    sde, out = VP(), {}
    cached = torch.zeros(shape, device=device)
    free_score = lambda x, t: cached
    free_eps = lambda x, t: cached
    x_T = torch.randn(shape, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    for name, kind, spec in configs():
        if "@" in name or name in ("scoresde/pc", "scoresde/ald"):
            continue
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            if kind == "ours":
                method, options = spec
                nfe = 2 * steps if method == "heun" else steps + 1
                sample(sde, free_score, None, method=method, nfe=nfe, x_T=x_T, **options)
                n_steps = steps
            else:
                _, n_steps = run_peer(*spec, free_eps, x_T, steps if "Heun" not in name else 2 * steps - 1)
                n_steps = steps if "Heun" in name else n_steps
            sync()
            times.append((time.perf_counter() - t0) / n_steps)
        out[name] = min(times)
    return out


def grid_transfer(n=10000, cells=((5, 0.1, False), (5, None, True), (10, 0.03, False))):
    """Side study: is the fitted grid's gain the grid's alone? The grid fit_grid gives unipc2 (t_end, lof) is
    handed to diffusers' DPM++3M as custom integer timesteps (its noise levels rounded to the discrete
    schedule; DPM++3M default and lower_order_final=False), both run from the same x_T."""
    import diffusers as D
    sde, rows = VP(), []
    for tname in ("ring", "mix16"):
        target, sc = setup(tname)
        score, eps = sc.continuous(sde), DiscreteEps(sc)
        gen = torch.Generator().manual_seed(1)
        scorer = Scorer(target, n, gen, null_repeats=2)
        x_T = sde.prior_sample((n, target.dim), gen, F64)
        for nfe, t_end, lof in cells:
            options = {"lower_order_final": lof, **({"t_end": t_end} if t_end else {})}
            probe = sde.prior_sample((FIT_PROBES, target.dim), torch.Generator().manual_seed(7), F64)
            ts = fit_grid(sde, score, probe, method="unipc2", nfe=nfe, **options).ts
            x = sample(sde, score, None, method="unipc2", nfe=nfe, x_T=x_T, ts=ts, lower_order_final=lof)
            steps = [int(round(float(np.interp(v, eps.log_sigmas, np.arange(1000))))) for v in -sde.log_snr(ts)]
            row = {"target": tname, "nfe": nfe, "t_end": t_end, "lof": lof, "timesteps": steps, "scoresde/unipc2": scorer(x)}
            for knob, kw in (("default", {}), ("lof=0", {"lower_order_final": False})):
                sched = D.DPMSolverMultistepScheduler(**{**peers()["DPM++3M/default"][1], **kw})
                sched.set_timesteps(timesteps=steps)
                y = x_T * sched.init_noise_sigma
                for t in sched.timesteps:
                    y = sched.step(eps(sched.scale_model_input(y, t), t), t, y).prev_sample
                row[f"diffusers/DPM++3M/{knob}"] = scorer(y)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ---- held-out targets (issue 22) -----------------------------------------------------------

HELDOUT_NFES = (5, 10, 20, 50)
# the constants of sampling.schedule (bandwidths, families, end ratios, probe size) were set on SELECTION alone
SELECTION = ["ring", "mix16"] + [f"d{d}s{k}" for d in (8, 16) for k in range(10)] + ["sing16s301", "sing8s302"]
REPORTING = ([f"d{d}s{k}" for d in (2, 8, 16, 32) for k in (100, 101, 102)] + ["unequal", "singular"]
             + ["sing16s401", "sing32s402", "sing8s403"]  # added with the near-singular selection (session 13)
             + ["sing16s501", "sing32s502", "sing8s503"]  # fresh for ipndm's second report (session 33)
             + ["d8s600", "d32s601", "sing16s601", "sing32s602", "sing8s603"]  # fresh for session 36's report
             + ["d16s700", "sing16s701", "sing16s702", "sing32s703", "sing8s704"]  # fresh for session 37's first
             + ["d8s800", "sing16s801", "sing16s802", "sing32s803", "sing8s804"]  # and second report
             + ["d8s1000", "sing16s1001", "sing16s1002", "sing32s1003", "sing8s1004"]  # fresh for search 6 (session 39)
             + ["d8s1100", "sing16s1101", "sing16s1102", "sing32s1103", "sing8s1104"]  # and for search 7 (session 40)
             + ["d8s1200", "sing16s1201", "sing16s1202", "sing32s1203", "sing8s1204"]  # for session 41's rule
             + ["d8s1300", "sing16s1301", "sing16s1302", "sing32s1303", "sing8s1304"]  # for search 8 (session 42)
             + ["d8s1400", "sing16s1401", "sing16s1402", "sing32s1403", "sing8s1404"]  # for search 9 (session 43)
             + ["d8s1500", "sing16s1501", "sing16s1502", "sing32s1503", "sing8s1504"]  # and search 10
             + ["d8s1600", "sing16s1601", "sing16s1602", "sing32s1603", "sing8s1604"]  # for search 11 (session 44)
             + ["d8s1700", "sing16s1701", "sing16s1702", "sing32s1703", "sing8s1704"])  # for search 12 (session 45)
# per-target best (an oracle: chosen on the target it reports on): the automatic schedule, the untuned default
# and these unipc variants
ORACLE = {f"{m}@{g}" + (f",t_end={te:g}" if te else ""): (m, {**o, **({"t_end": te} if te else {})})
          for m in ("unipc2", "unipc3") for g, o in (("poly3", {"grid": "poly", "power": 3.0}),
                                                     ("logsnr", {"grid": "logsnr"}), ("edm7", {"grid": "edm"}))
          for te in (None, 0.03, 0.1)}


def heldout_target(name: str) -> GaussianMixture:
    """ring, mix16 (`setup`); dDsK: random_mixture(D, 8, seed=K); unequal: 8-D, 8 components with weights
    falling geometrically (0.5^k: the largest 128 times the smallest); singDsK: D-dimensional, 5 components whose
    covariances have rank 3 plus 1e-4 I (condition number about 1e4), seed K; singular: sing16s201."""
    if name in ("ring", "mix16"):
        return setup(name)[0]
    if name == "unequal":
        base = random_mixture(8, 8, seed=200)
        w = 0.5 ** torch.arange(8, dtype=F64)
        return GaussianMixture(w / w.sum(), base.means, base.covariances)
    if name == "singular":
        name = "sing16s201"
    if name.startswith("sing"):
        dim, seed = (int(v) for v in name[4:].split("s"))
        g = torch.Generator().manual_seed(seed)
        means = 1.5 * torch.randn(5, dim, generator=g, dtype=F64)
        A = torch.randn(5, dim, 3, generator=g, dtype=F64) / math.sqrt(3)
        return GaussianMixture(torch.rand(5, generator=g, dtype=F64) + 0.2, means,
                               0.3 * A @ A.transpose(1, 2) + 1e-4 * torch.eye(dim, dtype=F64))
    dim, seed = (int(v) for v in name[1:].split("s"))
    return random_mixture(dim, 8, seed=seed)


AUTO_ROWS = {"scoresde/auto": "unipc2", "scoresde/auto-ipndm": "ipndm"}  # the automatic schedule of each method
# the automatic schedule's search, recorded in its rows: 1 (no field) until session 35; 2 also chooses the analytic
# first step (session 36); 3 checks the best grid family of each first-step setting, 4 trims the fine-scale statistic
# (both session 37), 6 keeps the default unless the check's gain is beyond 2 standard errors, on a check set of 2048
# draws (session 39; 5, the margin on 512, was reverted: its rows are in results/samplers/search5/), 7 the reference
# from the prior's corrected mean (session 40), 8 the samples too (session 42), 9 2048 probe draws above NFE 5, 10 and
# 8192 check draws (both session 43), 11 two knot moves above NFE 5 (session 44), 12 both at every NFE (session 45).
# A report keeps, per cell and x_T seed, the rows of the latest search only (`pool_seeds`). The number is SEARCH
FIXED_ROWS = {"scoresde/auto": "scoresde/default", "scoresde/auto-ipndm": "scoresde/ipndm"}  # its fixed grid
# ipndm at 101 evaluations on its fixed grid from the cell's x_T: the draw's own level, which no sampler run from that
# x_T leaves (at 301 evaluations within 5e-10 of it in mmd2_paired, session 41). Not a candidate
# for "best scoresde" (its name is outside both families); one run per target and seed, a row per NFE
CONVERGED, CONVERGED_NFE = "converged/ipndm-101", 101
# the goal's reading at NFE <= AUTO_MAX_NFE from session 42 (pre-registered in RESULTS.md): MMD^2 to the converged
# sampler from x_T + alpha_T E[X_0] (p_T's exact mean, which N(0, I) lacks: the data's law up to O(alpha_T^2)), paired
# by x_T; both samplers within RESOLUTION of it read as equal (NFE-50 peers came within 3e-8 to 5e-7 of the converged
# law in mmd2_paired, session 41)
EXACT_MEAN, RESOLUTION = "mmd2_paired_exact", 1e-6


def heldout(names: list[str], n: int, nfes: list[int], seed: int = 1, only: list[str] | None = None,
            searched: dict | None = None) -> list[dict]:
    """On each target: the fixed grids of unipc2 ("scoresde/default", sample()'s default before session 24) and
    ipndm, the automatic schedule of each (AUTO_ROWS: auto_schedule's ts / denoise at nfe <= AUTO_MAX_NFE, its cost
    recorded), the ORACLE variants, every diffusers configuration and the converged sampler (CONVERGED), from the
    same x_T (drawn from `seed`); n samples, null spread from NULL_REPEATS exact samples of size n. Each row also
    carries `mmd2_paired`, its MMD^2 to the converged sampler's law paired by x_T (`paired_metrics`), and EXACT_MEAN,
    the same to the converged sampler from x_T moved by p_T's exact mean alpha_T E[X_0]. `only`: just
    these configurations and no null row (cells added to a run whose files hold it). `searched`: schedules (with
    their cost) of earlier calls, by target, method and NFE, filled here: the search does not depend on the x_T
    seed."""
    searched = {} if searched is None else searched
    sde, rows = VP(), []
    for tname in names:
        target = heldout_target(tname)
        sc = MixtureScore(target)
        score_fn, eps = sc.continuous(sde), DiscreteEps(sc)
        gen = torch.Generator().manual_seed(seed)
        scorer = Scorer(target, n, gen)
        if only is None:
            rows.append(null_row(scorer, target=tname, n=n, dim=target.dim, seed=seed))
        x_T = sde.prior_sample((n, target.dim), gen, F64)
        t0 = time.perf_counter()
        y = sample(sde, score_fn, None, method="ipndm", nfe=CONVERGED_NFE, x_T=x_T, schedule="default")
        h = bandwidths(target)[:3]
        y_exact = sample(sde, score_fn, None, method="ipndm", nfe=CONVERGED_NFE, x_T=x_T + exact_shift(sde, target),
                         schedule="default")
        references = {"mmd2_paired": (y, kernel_sums(y, y, h, F64)),
                      EXACT_MEAN: (y_exact, kernel_sums(y_exact, y_exact, h, F64))}

        def paired(x):
            return paired_metrics(x, h, references)

        converged = None
        if only is None or CONVERGED in only:
            converged = {"config": CONVERGED, "used": CONVERGED_NFE, **scorer(y), **paired(y),
                         "seconds": round(time.perf_counter() - t0, 2)}
        for nfe in nfes:
            if converged is not None:
                rows.append({"target": tname, "nfe": nfe, "n": n, "seed": seed, **converged})
            cells, cost = [("scoresde/default", "unipc2", {}), ("scoresde/ipndm", "ipndm", {})], {}
            if nfe > AUTO_MAX_NFE:  # no schedule: unipc2's "auto" row is its fixed grid, as in the earlier sessions
                cells.append(("scoresde/auto", "unipc2", {}))
            for name, method in AUTO_ROWS.items() if nfe <= AUTO_MAX_NFE else ():
                if only is not None and name not in only:
                    continue
                if (tname, method, nfe) not in searched:
                    t0 = time.perf_counter()
                    auto = auto_schedule(sde, score_fn, (target.dim,), method=method, nfe=nfe, dtype=F64)
                    searched[(tname, method, nfe)] = auto, {
                        "auto_seconds": round(time.perf_counter() - t0, 2), "auto_evals": auto.evaluations,
                        "auto_choice": auto.choice, "auto_denoise": auto.denoise, "auto_first": auto.analytic_first,
                        "auto_ts": [round(float(t), 5) for t in auto.ts], "search": SEARCH,
                        "auto_prior_mean_norm": None if auto.prior_mean is None else float(auto.prior_mean.norm())}
                auto, cost[name] = searched[(tname, method, nfe)]
                cells.append((name, method, auto.options))
            cells += [(f"scoresde/{k}", *v) for k, v in ORACLE.items()]
            cells += [(f"diffusers/{k}", "peer", v) for k, v in peers().items()]
            cells = [c for c in cells if only is None or c[0] in only]
            for name, method, spec in cells:
                t0 = time.perf_counter()
                if method == "peer":
                    x, used = run_peer(*spec, eps, x_T, nfe)
                else:
                    x, used = sample(sde, score_fn, None, method=method, nfe=nfe, x_T=x_T, check_finite=False,
                                     schedule="default", **spec), nfe
                row = {"target": tname, "config": name, "nfe": nfe, "used": used, "n": n, "seed": seed, **scorer(x),
                       **paired(x), "seconds": round(time.perf_counter() - t0, 2),
                       **cost.get(name, {})}
                rows.append(row)
                if name in AUTO_ROWS or name in FIXED_ROWS.values():
                    print(json.dumps(row), flush=True)
    return rows


def exact_shift(sde: VP, target: GaussianMixture) -> torch.Tensor:
    """alpha_T E[X_0]: the mean of p_T, from the mixture's weights and means."""
    return sde.alpha(torch.tensor(float(sde.T), dtype=F64)) * target.mean()


def latest_search(rows: list[dict]) -> list[dict]:
    """One row for each cell and x_T seed: of the latest search of the automatic schedule (SEARCH), and of those the
    fields of all, the last given first (a cell run twice on one seed has drawn the same x_T; a later run may add a
    field, as mmd2_paired)."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        key = (r["target"], r["nfe"], r["config"], r.get("seed", 1))
        prev = latest.get(key, {})
        if r.get("search", 1) > prev.get("search", 1):
            latest[key] = r
        elif r.get("search", 1) == prev.get("search", 1):
            latest[key] = prev | r
    return list(latest.values())


def paired_lines(rows: list[dict], full: set[tuple]) -> list[str]:
    """Each automatic schedule against its fixed grid on the x_T seeds where both ran: the mean over seeds of the
    paired MMD^2 difference (auto - fixed, the same x_T), its standard error (sd of the differences / sqrt(seeds))
    and "worse" where the mean exceeds 2 of them; for cells run on seeds beyond `full`, the (target, seed) pairs
    with a null row."""
    by = {(r["target"], r["nfe"], r["config"], r.get("seed", 1)): r["mmd2"] for r in latest_search(rows)}
    lines = []
    for name, fixed in FIXED_ROWS.items():
        cells = sorted({(t, nfe) for (t, nfe, c, seed) in by if c == name and (t, seed) not in full})
        for t, nfe in cells:
            d = np.array([v - by[(t, nfe, fixed, seed)] for (tt, f, c, seed), v in sorted(by.items())
                          if (tt, f, c) == (t, nfe, name) and (t, nfe, fixed, seed) in by])
            if len(d) < 2:
                continue
            se = d.std(ddof=1) / math.sqrt(len(d))
            if se == 0 and d.mean() == 0:
                lines.append(f"- {name[9:]} - {fixed[9:]}, {t}, NFE {nfe}, {len(d)} seeds: 0 (the same samples)")
                continue
            lines.append(f"- {name[9:]} - {fixed[9:]}, {t}, NFE {nfe}, {len(d)} seeds: {d.mean():+.2e} (se {se:.1e}, "
                         f"{d.mean() / se:+.1f} se){' worse' if d.mean() > 2 * se else ''}")
    return lines


def pool_seeds(rows: list[dict]) -> list[dict]:
    """Rows of several x_T seeds (`--heldout-seed`) as one row per (target, NFE, configuration): MMD^2 and gap
    averaged over the seeds present (`seeds`: how many), and the null's mean and sd pooled over all its exact
    draws (NULL_REPEATS per seed), so the floor of a mean over k seeds is 2 sd / sqrt(k). Where a cell and seed
    has rows of several searches of the automatic schedule (SEARCH), only the latest search's count."""
    groups: dict[tuple, list[dict]] = {}
    for r in latest_search(rows):
        groups.setdefault((r["target"], r["nfe"], r["config"]), []).append(r)
    out = []
    for (_, nfe, _), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.get("seed", 1))  # seed-1 rows (written before `seed` was) first
        row = {**rs[0], "seeds": len(rs)}
        if nfe == 0:
            for k in ("mmd2", "mmd2_fine"):
                m, s = np.array([r[k] for r in rs]), np.array([r[f"{k}_sd"] for r in rs])
                mean, count = m.mean(), NULL_REPEATS * len(rs)
                ss = ((NULL_REPEATS - 1) * s**2 + NULL_REPEATS * (m - mean) ** 2).sum()
                row |= {k: float(mean), f"{k}_sd": float(np.sqrt(ss / (count - 1)))}
        else:
            for k in ("mmd2", "mmd2_fine", "gap", "mmd2_paired", EXACT_MEAN):
                if all(k in r for r in rs):
                    row[k] = float(np.mean([r[k] for r in rs]))
                else:  # a field some seeds lack (mmd2_paired, before session 41): no mean of it
                    row.pop(k, None)
        out.append(row)
    return out


def default_path(names: list[str], n: int, nfes: list[int], seed: int = 1) -> list[dict]:
    """sample(..., method="unipc2", nfe=nfe) without options (the automatic schedule, searched by the first call
    and cached): the seconds of a first and a second call, the search's score evaluations, and whether its samples
    are those of the heldout part's "scoresde/auto" row (auto_schedule's ts / denoise) from the same x_T."""
    sde, rows = VP(), []
    for tname in names:
        target = heldout_target(tname)
        score_fn = MixtureScore(target).continuous(sde)
        for nfe in nfes:
            x_T = sde.prior_sample((n, target.dim), torch.Generator().manual_seed(seed), F64)
            runs = []
            for _ in range(2):
                t0 = time.perf_counter()
                runs.append((sample(sde, score_fn, None, method="unipc2", nfe=nfe, x_T=x_T), time.perf_counter() - t0))
            (first, t1), (second, t2) = runs
            auto = auto_schedule(sde, score_fn, (target.dim,), method="unipc2", nfe=nfe, dtype=F64)
            row = sample(sde, score_fn, None, method="unipc2", nfe=nfe, x_T=x_T, **auto.options)
            rows.append({"target": tname, "nfe": nfe, "n": n, "first_seconds": round(t1, 2),
                         "second_seconds": round(t2, 2), "search_evals": auto.evaluations, "sample_evals": n * nfe,
                         "equal_to_auto_row": bool(torch.equal(first, row) and torch.equal(second, row))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def floor_check(names: list[str], n: int, nfes: list[int], seeds: list[int]) -> tuple[list[dict], str]:
    """The goal "at NFE 20 and 50 at the floor" beside a perfect sampler. Per target and seed the draws of `heldout`
    (the null's exact samples, then x_T: seeds 1-3 repeat its cells) and then one more exact sample of size n;
    unipc2 on its fixed grid from x_T at each of `nfes`, and the exact sample, scored alike. Each MMD^2 is averaged
    over the seeds against 2 null sd of that mean (`pool_seeds`); the exact sample's misses are the criterion's
    own (|MMD^2| against 2 sd, as `heldout_report`'s floor: about 5 % of targets for a Gaussian mean, more for a
    heavy tail or an sd from few exact sets)."""
    sde, rows = VP(), []
    for tname in names:
        target = heldout_target(tname)
        score_fn = MixtureScore(target).continuous(sde)
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            scorer = Scorer(target, n, gen)
            base = {"target": tname, "n": n, "seed": seed}
            rows.append(null_row(scorer, **base))
            x_T = sde.prior_sample((n, target.dim), gen, F64)
            rows.append({**base, "config": "exact sample", "nfe": -1, **scorer(target.sample(n, gen))})
            for nfe in nfes:
                x = sample(sde, score_fn, None, method="unipc2", nfe=nfe, x_T=x_T, schedule="default")
                rows.append({**base, "config": "scoresde/default", "nfe": nfe, **scorer(x)})
            print(json.dumps(rows[-1]), flush=True)
    pooled = pool_seeds(rows)
    cols = [-1] + list(nfes)
    lines = [f"unipc2 on its fixed grid from N(0, I), and a fresh exact sample (a perfect sampler), n = {n}, x_T seeds "
             f"{seeds}; MMD^2 averaged over the seeds, '*': above 2 null sd of that mean (not at the floor)\n",
             "| target | 2 null sd | exact sample | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|" + "---|" * (3 + len(nfes))]
    above = {c: [] for c in cols}
    for tname in names:
        get = {r["nfe"]: r for r in pooled if r["target"] == tname}
        floor = 2 * get[0]["mmd2_sd"] / get[0]["seeds"] ** 0.5
        cells = []
        for c in cols:
            v = get[c]["mmd2"]
            cells.append(f"{v:.2e}" + ("*" if abs(v) >= floor else ""))
            if abs(v) >= floor:
                above[c].append(tname)
        lines.append(f"| {tname} | {floor:.1e} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in cols:
        what = "the exact sample" if c < 0 else f"unipc2, NFE {c}"
        lines.append(f"- {what}: at the floor on {len(names) - len(above[c])} of {len(names)} targets; above it: "
                     f"{', '.join(above[c]) or 'none'}")
    return rows, "\n".join(lines)


def coupled_lines(pooled: list[dict], names: list[str], nfes: list[int], field: str = "mmd2_paired",
                  ratios: dict | None = None) -> list[str]:
    """Cells whose rows all carry `field` (mmd2_paired: each configuration's MMD^2 to the converged sampler's law,
    paired by x_T, so without the draw's level; EXACT_MEAN: the same from x_T moved by p_T's exact mean): the
    automatic schedules and fixed grids beside the diffusers configuration closest to that law by this measure, and
    their ratios to it. For EXACT_MEAN, the goal's reading from session 42: a schedule meets it at most 0.5x that
    configuration and at most its own fixed grid, each unless both are within RESOLUTION. `ratios`, where given,
    gets each schedule's ratio to that configuration, by (name, target, NFE)."""
    configs = list(AUTO_ROWS) + list(FIXED_ROWS.values())
    lines, met = [], {}
    for t in names:
        for nfe in nfes:
            cell = [r for r in pooled if r["target"] == t and r["nfe"] == nfe]
            k = max((r["seeds"] for r in cell), default=0)
            cell = {r["config"]: r for r in cell if r["seeds"] == k and field in r}
            peer = [r for c, r in cell.items() if c.startswith("diffusers/") and math.isfinite(r[field])]
            if not peer or not all(c in cell for c in configs):
                continue
            p = min(peer, key=lambda r: abs(r[field]))
            ours = [abs(cell[c][field]) for c in configs]
            peer_value = abs(p[field])
            for name, v in zip(AUTO_ROWS, ours):
                fixed = abs(cell[FIXED_ROWS[name]][field])
                ok = ((v <= 0.5 * peer_value or max(v, peer_value) <= RESOLUTION)
                      and (v <= fixed or max(v, fixed) <= RESOLUTION))
                met.setdefault((name, nfe), []).append((t, ok))
                if ratios is not None:
                    ratios[(name, t, nfe)] = v / peer_value
            lines.append(f"| {t} | {nfe} | {k} | " + " | ".join(f"{v:.2e}" for v in ours)
                         + f" | {p['config'][10:]} {peer_value:.2e} | "
                         + " | ".join(f"{v / peer_value:.2f}" for v in ours[:len(AUTO_ROWS)]) + " |")
    if not lines:
        return []
    names_ = [c.removeprefix("scoresde/") for c in configs]
    what = ("MMD^2 to the converged sampler's law, paired by x_T (`mmd2_paired`: the draw's own level drops out; "
            "beside the goals, not part of them), seed means:\n" if field == "mmd2_paired" else
            f"MMD^2 to the converged sampler's law from x_T moved by p_T's exact mean alpha_T E[X_0], paired by x_T "
            f"(`{field}`: the goal's reading at NFE <= {AUTO_MAX_NFE} from session 42), seed means:\n")
    out = ["\n" + what, f"| target | NFE | seeds | {' | '.join(names_)} | closest diffusers configuration | "
           + " | ".join(f"{c} / it" for c in names_[:len(AUTO_ROWS)]) + " |",
           "|" + "---|" * (4 + len(configs) + len(AUTO_ROWS)), *lines]
    if field == EXACT_MEAN:
        out.append(f"\nGoals (issue 22) by `{field}`: <= 0.5x the closest diffusers configuration and <= its fixed "
                   f"grid (or both within {RESOLUTION:g}):")
        out += [f"- {name[9:]}, NFE {nfe}: {sum(ok for _, ok in cells)}/{len(cells)}; missed: "
                f"{', '.join(t for t, ok in cells if not ok) or 'none'}" for (name, nfe), cells in met.items()]
    return out


def heldout_report(rows: list[dict], part: str) -> str:
    """Per target and NFE: the untuned default, the automatic schedule of each method present (AUTO_ROWS), the
    per-target best of scoresde (oracle) and of diffusers, MMD^2 (and |gap|) averaged over the x_T seeds run
    (`pool_seeds`) with the null's 2 sd for that many; the goals of issue 22 checked cell by cell for each
    automatic schedule (against its own method's fixed grid), with and without the converged level (`verdict`) where
    the cell has the CONVERGED row; a figure. x_T seeds without a null row (runs of a few configurations only, for
    precision) are left out of the cells and read by `paired_lines`."""
    full = {(r["target"], r.get("seed", 1)) for r in rows if r["nfe"] == 0}
    paired = paired_lines(rows, full)
    rows = pool_seeds([r for r in rows if (r["target"], r.get("seed", 1)) in full])
    names = sorted(dict.fromkeys(r["target"] for r in rows),  # REPORTING's order, then the others as read
                   key=lambda t: REPORTING.index(t) if t in REPORTING else len(REPORTING))
    nfes = sorted({r["nfe"] for r in rows if r["nfe"]})
    autos = [a for a in AUTO_ROWS if any(r["config"] == a for r in rows)]
    head = " | ".join(f"{a[9:]} | {a[9:]} cost (evals, s) | {a[9:]} / best diffusers | {a[9:]} / its default"
                      for a in autos)
    lines = [f"held-out part {part!r}: n = {rows[0]['n']} samples per cell and x_T seed, exact scores, VP; MMD^2 "
             "(sum over the bandwidths {0.5, 1, 2} sqrt(tr Cov)) averaged over the seeds of the cell; 'floor': both "
             "below 2 null sd of that average; 'converged': both within 2 null sd of the converged sampler's average "
             f"({CONVERGED}, from the same x_T); 'auto' is unipc2's automatic schedule, 'auto-ipndm' ipndm's; "
             "each is compared with its own method's fixed grid ('default' is unipc2's)\n",
             f"| target | NFE | seeds | 2 null sd | converged | default | {head} | best scoresde (oracle) "
             f"| best diffusers | |gap| default / {' / '.join(a[9:] for a in autos)} / peer |",
             "|" + "---|" * (9 + 4 * len(autos))]
    verdicts, ratios = [], {}
    for t in names:
        null = [r for r in rows if r["target"] == t and r["nfe"] == 0][0]
        for nfe in nfes:
            cell = [r for r in rows if r["target"] == t and r["nfe"] == nfe]
            get = {r["config"]: r for r in cell}
            d = get["scoresde/default"]
            k = d["seeds"]
            cell = [r for r in cell if r["seeds"] == k]  # a configuration missing from a seed does not compete
            get = {r["config"]: r for r in cell}
            floor = {"mmd2": 2 * null["mmd2_sd"] / k**0.5, "mmd2_fine": 2 * null["mmd2_fine_sd"] / k**0.5,
                     "abs_gap": float("inf")}
            o, p = best(cell, t, nfe, "mmd2", "scoresde"), best(cell, t, nfe, "mmd2", "diffusers")
            level = get[CONVERGED]["mmd2"] if CONVERGED in get else None
            cols, gaps = [], []
            for name in autos:
                a, own = get.get(name), get.get(FIXED_ROWS[name])
                if a is None or own is None:
                    cols.append("- | - | - | -")
                    gaps.append("-")
                    continue
                vs_peer, vs_default = (verdict(a, b, "mmd2", floor, level) for b in (p, own))
                ratios[(name, t, nfe)] = value(a, "mmd2") / value(p, "mmd2"), is_noise(vs_peer)
                verdicts.append((name, t, nfe, {rule: goals(a, p, own, floor, lvl)
                                                for rule, lvl in ((WITH_LEVEL, level), (WITHOUT_LEVEL, None))}))
                cost = f"{a['auto_evals']:.2e}, {a['auto_seconds']:.0f}" if "auto_evals" in a else "-"
                cols.append(f"{value(a, 'mmd2'):.2e} | {cost} | {vs_peer} | {vs_default}")
                gaps.append(f"{abs(a['gap']):.2f}")
            ratios[("default", t, nfe)] = (value(d, "mmd2") / value(p, "mmd2"),
                                           is_noise(verdict(d, p, "mmd2", floor, level)))
            conv = "-" if level is None else f"{level:.2e}"
            lines.append(f"| {t} | {nfe} | {k} | {floor['mmd2']:.1e} | {conv} | {value(d, 'mmd2'):.2e} | "
                         f"{' | '.join(cols)} | "
                         f"{o['config'][9:]} {value(o, 'mmd2'):.2e} | {p['config'][10:]} {value(p, 'mmd2'):.2e} "
                         f"| {abs(d['gap']):.2f} / {' / '.join(gaps)} / {abs(p['gap']):.2f} |")
    lines.append("\nGoals (issue 22), cells meeting each:")
    with_level = any(r["config"] == CONVERGED for r in rows)
    for name in autos:
        for nfe in nfes:
            cells = [v for v in verdicts if v[0] == name and v[2] == nfe]
            if not cells:
                continue
            for rule in (WITH_LEVEL, WITHOUT_LEVEL) if with_level else (WITHOUT_LEVEL,):
                what = " Without the converged level:" if with_level and rule == WITHOUT_LEVEL else ""
                met = [(v[1], *v[3][rule]) for v in cells]  # (target, <= 0.5x peer, <= fixed grid, at the floor)
                if nfe <= AUTO_MAX_NFE:
                    lines.append(f"-{what} {name[9:]}, NFE {nfe}: <= 0.5x best diffusers (or both at the floor"
                                 f"{', or at the converged level' if rule == WITH_LEVEL else ''}) in "
                                 f"{sum(m[1] for m in met)}/{len(met)}; never worse than its fixed grid in "
                                 f"{sum(m[2] for m in met)}/{len(met)}; missed: "
                                 f"{', '.join(m[0] for m in met if not (m[1] and m[2])) or 'none'}")
                else:
                    lines.append(f"-{what} {name[9:]}, NFE {nfe}: (= the fixed grid) at the floor"
                                 f"{' (or the converged level)' if rule == WITH_LEVEL else ''} in "
                                 f"{sum(m[3] for m in met)}/{len(met)}; not at the floor: "
                                 f"{', '.join(m[0] for m in met if not m[3]) or 'none'}")
    if paired:
        lines += ["\nPaired differences from the fixed grid over every x_T seed run (each the same x_T):", *paired]
    few, exact = [v for v in nfes if v <= AUTO_MAX_NFE], {}
    lines += coupled_lines(rows, names, few, EXACT_MEAN, exact) + coupled_lines(rows, names, few)
    plt = common.plt()
    fig, axes = plt.subplots(1 + bool(exact), len(nfes), figsize=(4 * len(nfes), 4 * (1 + bool(exact))),
                             squeeze=False)
    for ax, nfe in zip(axes[0], nfes):
        xs = np.arange(len(names))
        for (name, style), color in zip(zip(["default"] + autos, "xos"), ("C0", "C1", "C2")):
            for floor_too in (False, True):  # both at the floor or the converged level: a ratio of noise, drawn faint
                cells = [(x, ratios[(name, t, nfe)][0]) for x, t in zip(xs, names)
                         if ratios.get((name, t, nfe), (0, not floor_too))[1] == floor_too]
                ax.scatter([c[0] for c in cells], [max(c[1], 1e-3) for c in cells], marker=style, color=color,
                           alpha=0.25 if floor_too else 1.0,
                           label=None if floor_too else f"{name.removeprefix('scoresde/')} / best diffusers")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(yscale="log", title=f"NFE {nfe}: MMD^2 ratio\n(faint: both at the floor / converged level)", xticks=xs)
        ax.set_xticklabels(names, rotation=90, fontsize=7)
    axes[0][0].legend(fontsize=7)
    for ax, nfe in zip(axes[1] if exact else (), nfes):
        if not any(k[2] == nfe for k in exact):
            ax.set_visible(False)
            continue
        xs = np.arange(len(names))
        for (name, style), color in zip(zip(autos, "os"), ("C1", "C2")):
            cells = [(x, exact[(name, t, nfe)]) for x, t in zip(xs, names) if (name, t, nfe) in exact]
            ax.plot([c[0] for c in cells], [max(c[1], 1e-3) for c in cells], marker=style, color=color, ls="none",
                    label=f"{name.removeprefix('scoresde/')} / closest diffusers")  # lines: the legend avoids them
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.axhline(1.0, color="grey", lw=0.8)
        top = 5 * max([1.0] + [v for k, v in exact.items() if k[2] == nfe])  # headroom for the legend
        ax.set(yscale="log", title=f"NFE {nfe}: ratio of {EXACT_MEAN}\n(paired, to the exact-mean converged law)",
               xticks=xs, ylim=(None, top))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, NAME, f"samplers_{part}.png", dpi=110)
    return "\n".join(lines)


def add_arguments(ap) -> None:
    ap.add_argument("--n-sweep", type=int, default=3000)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--nfes", type=int, nargs="*", default=list(NFES))
    ap.add_argument("--stage", choices=("sweep", "headline", "overhead", "report", "transfer", "all"), default="all")
    ap.add_argument("--device", default="cpu", help="overhead stage only: cuda writes samplers_overhead_cuda.json")
    ap.add_argument("--overhead-steps", type=int, default=50, help="steps per timed overhead run")
    ap.add_argument("--overhead-repeats", type=int, default=3, help="timed overhead runs (the best counts)")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="only these configuration names (default all); --part heldout / select: and no null row")
    ap.add_argument("--part", choices=("main", "heldout", "select", "heldout-report", "default-path", "floor-check"),
                    default="main",
                    help="heldout / select: the default, the automatic schedule and the per-target best against "
                         "diffusers on the reporting / selection targets (issue 22); heldout-report: one report "
                         "of every samplers_heldout*.json written by --part heldout runs (--targets: of these "
                         "targets only, as samplers_heldout-report-TARGETS.md); "
                         "default-path: sample() without options against the heldout 'auto' row's sampler; "
                         "floor-check: unipc2's fixed grid at --nfes beside a fresh exact sample, each against the "
                         "floor (--n-heldout samples, --heldout-seed)")
    ap.add_argument("--n-heldout", type=int, default=N_HELDOUT, help="samples per cell of --part heldout / select")
    ap.add_argument("--targets", nargs="+", default=None, help="--part heldout / select / heldout-report: only these targets")
    ap.add_argument("--heldout-seed", type=int, nargs="+", default=[1],
                    help="--part heldout / select: the seeds of x_T and of the null's exact samples, one file each "
                         "(the automatic schedule searched once); heldout-report averages each cell over the seeds run")


def run_tag(args, seed: int | None = None) -> str:
    """The name of a run's log, and with `seed` of its output files (one per seed); more targets or configurations
    than fit in a file name are named by the first, their count and a hash of all (`_short`); NFEs other than the
    default are named, so that a run at fewer NFEs does not overwrite the rows of one at more."""
    if args.part != "main":
        seeds = [seed] if seed is not None else args.heldout_seed
        targets = _short(args.targets or [])
        return (args.part + ("-" + targets if targets else "")
                + (f"-n{args.n_heldout}" if args.n_heldout != N_HELDOUT else "")
                + ("-nfe" + "-".join(map(str, args.nfes)) if list(args.nfes) != list(NFES) else "")
                + ("-seed" + "-".join(map(str, seeds)) if seeds != [1] else "")
                + ("-only-" + _short([c.split("/")[-1] for c in args.configs]) if args.configs else ""))
    return "" if args.stage == "all" else args.stage + ("-" + args.device if args.device != "cpu" else "")


def _short(names: list[str]) -> str:
    """names joined by "-", or where that is longer than 80 characters the first, their count and a hash of all."""
    joined = "-".join(names)
    if len(joined) <= 80:
        return joined
    return f"{names[0]}-and-{len(names) - 1}-more-{hashlib.sha256(joined.encode()).hexdigest()[:8]}"


def run(args):
    global CONFIGS
    CONFIGS = args.configs
    timing = dict(steps=args.overhead_steps, repeats=args.overhead_repeats)
    out = common.out_dir(NAME)
    if args.part == "heldout-report":
        part = (run_tag(args) if args.targets
                else "heldout" + (f"-n{args.n_heldout}" if args.n_heldout != N_HELDOUT else ""))
        rows = [r for f in sorted(out.glob("samplers_heldout-*.json")) for r in common.read_json(f)
                if r["n"] == args.n_heldout and r["target"] in (args.targets or [r["target"]])]
        text = heldout_report(rows, part)
        common.write_text(NAME, f"samplers_{part}.md", text)
        print(text)
        return
    if args.part == "floor-check":
        nfes = [v for v in args.nfes if v > AUTO_MAX_NFE and v in HELDOUT_NFES] or [20, 50]
        rows, text = floor_check(args.targets or REPORTING, args.n_heldout, nfes, args.heldout_seed)
        common.write_json(NAME, rows, file=f"samplers_{run_tag(args)}.json", indent=None)
        common.write_text(NAME, f"samplers_{run_tag(args)}.md", text)
        print(text)
        return
    if args.part == "default-path":
        rows = default_path(args.targets or ["d2s100", "d16s100"], args.n_heldout,
                            [v for v in args.nfes if v <= AUTO_MAX_NFE] or [5, 10], seed=args.heldout_seed[0])
        common.write_json(NAME, rows, file="samplers_default_path.json", indent=None)
        return
    if args.part != "main":
        names = args.targets or (REPORTING if args.part == "heldout" else SELECTION)
        nfes = [v for v in args.nfes if v in HELDOUT_NFES] or list(HELDOUT_NFES)
        searched = {}
        for seed in args.heldout_seed:
            tag = run_tag(args, seed)
            rows = heldout(names, args.n_heldout, nfes, seed=seed, only=args.configs, searched=searched)
            common.write_json(NAME, rows, file=f"samplers_{tag}.json", indent=None)
            if not args.configs:  # else cells added to the runs that hold the null rows: heldout-report merges them
                text = heldout_report(rows, tag)
                common.write_text(NAME, f"samplers_{tag}.md", text)
                print(text)
        return
    if args.device != "cpu":
        assert args.stage == "overhead", "--device applies to the overhead stage"
        common.write_json(NAME, {
            f"image (64,3,32,32), {torch.cuda.get_device_name()}": overhead(device=args.device, **timing),
            f"image (256,3,64,64), {torch.cuda.get_device_name()}": overhead((256, 3, 64, 64), device=args.device,
                                                                              **timing)},
            file="samplers_overhead_cuda.json", indent=None)
        return
    if args.stage == "transfer":  # side study, not part of "all"
        common.write_json(NAME, grid_transfer(), file="samplers_transfer.json", indent=None)
        return
    sweep_file, head_file, over_file = (out / f"samplers_{k}.json" for k in ("sweep", "headline", "overhead"))
    if args.stage in ("sweep", "all"):
        self_check()
        rows = [r for t in ("ring", "mix16") for r in evaluate(t, args.n_sweep, args.nfes, seed=0)]
        common.write_json(NAME, rows, file=sweep_file.name, indent=None)
    if args.stage in ("headline", "all"):
        rows = common.read_json(sweep_file)
        head = []
        for t in ("ring", "mix16"):
            wanted = {(best(rows, t, nfe, m, fam)["config"], nfe)
                      for nfe in args.nfes for m in METRICS for fam in ("scoresde", "diffusers")}
            wanted |= {(c, nfe) for c in (DEFAULT, "scoresde/dpm3m", "diffusers/DPM++3M/default")
                       for nfe in args.nfes}
            head += evaluate(t, args.n, args.nfes, seed=1, wanted=wanted)
        common.write_json(NAME, head, file=head_file.name, indent=None)
    if args.stage in ("overhead", "all"):
        common.write_json(NAME, {"image (64,3,32,32)": overhead(**timing), "toy (1,2)": overhead((1, 2), **timing)},
                          file=over_file.name, indent=None)
    report(common.read_json(sweep_file), common.read_json(head_file),
           {k: v for f in (over_file, out / "samplers_overhead_cuda.json") if f.exists()
            for k, v in common.read_json(f).items()}, args.nfes)


def floor_of(tname, null_row):
    """Twice the null spread of each metric at the headline's n: the MMD^2 sd over exact samples, and for the
    gap the standard error of E_gen log p - E_true log p (the variance of log p under the target)."""
    target, _ = setup(tname)
    var = float(target.log_prob(target.sample(200000, torch.Generator().manual_seed(5))).var())
    gap_se = math.sqrt(var / null_row["n"] + var / 200000)
    return {"mmd2": 2 * null_row["mmd2_sd"], "mmd2_fine": 2 * null_row["mmd2_fine_sd"], "abs_gap": 2 * gap_se}


def verdict(ours, peer, m, floor, level=None):
    """The ratio ours / peer; "floor" when both lie within the null spread, "converged" when both lie within it of
    `level`, the converged sampler's value from the same x_T (a level the draw holds every sampler at): either way
    their ratio is noise."""
    a, b = value(ours, m), value(peer, m)
    if a < floor[m] and b < floor[m]:
        return f"floor ({a / b:.2f})"
    if level is not None and abs(ours[m] - level) < floor[m] and abs(peer[m] - level) < floor[m]:
        return f"converged ({a / b:.2f})"
    return f"{a / b:.2f}"


def is_noise(verdict_text: str) -> bool:
    """A `verdict` of two samplers both at the floor or both at the converged level."""
    return verdict_text.startswith(("floor", "converged"))


def meets(verdict_text: str, bound: float) -> bool:
    """A `verdict` at most `bound`, or noise."""
    return is_noise(verdict_text) or float(verdict_text) <= bound


WITH_LEVEL, WITHOUT_LEVEL = "with the converged level", "without it"  # the two readings of `heldout_report`


def goals(auto, peer, fixed, floor, level) -> tuple[bool, bool, bool]:
    """An automatic schedule's row against the best peer's and its fixed grid's, with the converged `level` (None:
    without it): at most 0.5x the peer, at most its fixed grid (each or noise), its MMD^2 at the floor (or within
    it of the level)."""
    near = level is not None and abs(auto["mmd2"] - level) < floor["mmd2"]
    return (meets(verdict(auto, peer, "mmd2", floor, level), 0.5),
            meets(verdict(auto, fixed, "mmd2", floor, level), 1.0), value(auto, "mmd2") < floor["mmd2"] or near)


def report(sweep_rows, head_rows, over, nfes):
    plt = common.plt()
    lines = []
    for t in ("ring", "mix16"):
        null = [r for r in head_rows if r["target"] == t and r["nfe"] == 0][0]
        floor = floor_of(t, null)
        lines.append(f"\n{t} (n = {null['n']}; null mean +- sd: MMD^2 {null['mmd2']:.1e} +- {null['mmd2_sd']:.1e}, "
                     f"fine {null['mmd2_fine']:.1e} +- {null['mmd2_fine_sd']:.1e}; standard error of the gap "
                     f"{floor['abs_gap'] / 2:.1e}; 'floor': both values below 2 sd)\n")
        lines.append("| metric | NFE | best scoresde | value | best diffusers | value | ratio |")
        lines.append("|---|---|---|---|---|---|---|")
        for m in METRICS:
            for nfe in nfes:
                o, p = best(head_rows, t, nfe, m, "scoresde"), best(head_rows, t, nfe, m, "diffusers")
                lines.append(f"| {m} | {nfe} | {o['config'][9:]} | {value(o, m):.2e} | {p['config'][10:]} "
                             f"(NFE {p['used']}) | {value(p, m):.2e} | {verdict(o, p, m, floor)} |")
        lines.append(f"\n{t}: the untuned default `{DEFAULT[9:]}` against the best diffusers configuration "
                     "of each cell\n")
        lines.append("| NFE | " + " | ".join(f"{m} default / best peer (ratio)" for m in METRICS) + " |")
        lines.append("|---|" + "---|" * len(METRICS))
        for nfe in nfes:
            d = [r for r in head_rows if r["target"] == t and r["nfe"] == nfe and r["config"] == DEFAULT][0]
            cells = []
            for m in METRICS:
                p = best(head_rows, t, nfe, m, "diffusers")
                cells.append(f"{value(d, m):.2e} / {value(p, m):.2e} ({verdict(d, p, m, floor)})")
            lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, m in zip(axes, METRICS):
            # headline (n = 20000, fresh samples): best of each family per cell and the untuned default
            for fam, style in (("scoresde", "-o"), ("diffusers", "--s")):
                ys = [value(best(head_rows, t, nfe, m, fam), m) for nfe in nfes]
                ax.plot(nfes, np.maximum(ys, 1e-9), style, lw=2, label=f"best {fam} (headline, n={null['n']})")
            ys = [value(r, m) for nfe in nfes for r in head_rows
                  if r["target"] == t and r["config"] == DEFAULT and r["nfe"] == nfe]
            ax.plot(nfes[:len(ys)], np.maximum(ys, 1e-9), "-^", label=f"{DEFAULT} default (headline)")
            for c in ("scoresde/dpm3m", "scoresde/heun", "scoresde/em", "diffusers/DPM++3M/default",
                      "diffusers/UniPC/default", "diffusers/DDIM/default"):
                ys = [value(r, m) for nfe in nfes for r in sweep_rows
                      if r["target"] == t and r["config"] == c and r["nfe"] == nfe]
                ax.plot(nfes[:len(ys)], np.maximum(ys, 1e-9), ":", alpha=0.6,
                        label=f"{c} (sweep, n={sweep_rows[0]['n']})")
            ax.axhline(floor[m] / 2, color="grey", lw=0.8,
                       label="null sd (gap: standard error), headline n" if m == "mmd2" else None)
            ax.set(xscale="log", yscale="log", xlabel="NFE", title=f"{t}: |{m}|")
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        common.save_figure(fig, NAME, f"samplers_{t}.png", dpi=110)
    if over:
        lines.append("\n| sampler | " + " | ".join(f"s/step {c}" for c in over) + " |\n|---|" + "---|" * len(over))
        for k in over["image (64,3,32,32)"]:
            lines.append(f"| {k} | " + " | ".join(f"{col[k]:.2e}" for col in over.values()) + " |")
    text = "\n".join(lines)
    common.write_text(NAME, "samplers_report.md", text)
    print(text)
