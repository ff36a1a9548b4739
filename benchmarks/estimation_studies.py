"""Statistics of score matching made executable (issue 10; DESIGN 11; T 7.1, 7.2).

(a) T 7.1: closed-form score-matching estimates for a Gaussian, a quartic and a bimodal (double-well)
    exponential family, n = 100 ... 100000, many repetitions (vectorised): error against n, the
    empirical covariance of sqrt(n)(theta_n - theta*) against the sandwich H^{-1} S H^{-1} by quadrature,
    a QQ plot against the normal;
(b) efficiency against maximum likelihood (Koehler, Heckett and Risteski, ICLR 2023) for three families
    through a symmetric double well as its modes separate, by quadrature, with a Monte Carlo check;
    fitted decay rates;
(c) T 7.2 for networks: MLPs trained by scoresde.train (denoising score matching, VP) on n points of a
    2-D and a 16-D mixture; exact L2 score error against n and width; sample and approximation parts;
(d) the same models' samples: W2 (with its floor), MMD^2, and the TV bound of T 5.2 fed with the
    measured score-error profile (and a histogram TV in 2-D).

Run: python -m benchmarks estimation [a] [b] [c] [d] [--reps R] [--data ring mixture16]
(default a b; make bench-estimation runs all). Figures and the JSON of (c), (d):
benchmarks/results/estimation/; markdown tables are printed (and kept in run-<studies>.log); (c), (d) keep
their run folders under runs/estimation.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from benchmarks import common
from scoresde.learning.estimation import (
    ExponentialFamily,
    mle_estimate,
    relative_efficiency,
    sandwich_covariance,
    score_matching_estimate,
)

NAME = "estimation"
plt = common.plt()
F64 = torch.float64
NS_A = [100, 316, 1000, 3162, 10000, 31623, 100000]  # sample sizes of (a) (--max-n caps them)
M_POINTS_B = 47  # separations m of (b) on [0.5, 12] (--b-points)


def double_well_theta(m: float, sigma: float = 1.0) -> torch.Tensor:
    """Natural parameters (x^2, x^4) of log p = -(x^2 - m^2)^2 / (8 m^2 sigma^2): modes at +-m whose
    curvature is 1/sigma^2; the barrier between them is m^2 / (8 sigma^2)."""
    return torch.tensor([1 / (4 * sigma**2), -1 / (8 * m**2 * sigma**2)], dtype=F64)


def poly_stat(powers: tuple[int, ...]):
    return lambda x: torch.cat([x**p for p in powers], -1)


FAMILIES = {
    "Gaussian": (ExponentialFamily(poly_stat((1, 2)), interval=(-12.0, 12.0)),
                 torch.tensor([0.5, -0.5], dtype=F64)),
    "quartic": (ExponentialFamily(poly_stat((1, 2, 3, 4)), interval=(-8.0, 8.0)),
                torch.tensor([0.5, -1.0, 0.3, -0.5], dtype=F64)),
    "bimodal": (ExponentialFamily(poly_stat((2, 4)), interval=(-9.0, 9.0)), double_well_theta(2.0, 0.5)),
}


def repeated_estimates(family: ExponentialFamily, theta: torch.Tensor, n: int, reps: int,
                       gen: torch.Generator, rows_per_batch: int = 500_000) -> torch.Tensor:
    """(reps, k) score-matching estimates from independent samples of size n, batched over repetitions."""
    chunk = max(1, rows_per_batch // n)
    out = [score_matching_estimate(family, family.sample(min(chunk, reps - r) * n, theta, gen).reshape(-1, n, 1))
           for r in range(0, reps, chunk)]
    return torch.cat(out)


def study_a(reps: int, max_n: int = NS_A[-1]) -> None:
    ns = [n for n in NS_A if n <= max_n]
    gen = torch.Generator().manual_seed(0)
    fig, (ax_err, ax_cov) = plt.subplots(1, 2, figsize=(11, 4.2))
    qq = {}
    print(f"\n### (a) T 7.1: {reps} repetitions per n\n")
    print("| family | n | RMSE |theta_n - theta*| | emp. var / sandwich var (per coordinate) | time [s] |")
    print("|---|---|---|---|---|")
    for name, (fam, theta) in FAMILIES.items():
        sand = sandwich_covariance(fam, theta)
        rmse, ratios = [], []
        for n in ns:
            t0 = time.perf_counter()
            est = repeated_estimates(fam, theta, n, reps, gen)
            z = math.sqrt(n) * (est - theta)
            rmse.append(((est - theta) ** 2).sum(-1).mean().sqrt().item())
            ratio = torch.cov(z.T).diagonal() / sand.diagonal()
            ratios.append(ratio.numpy())
            if name == "quartic" and n in (ns[0], ns[-1]):
                qq[n] = (z[:, -1] / sand[-1, -1].sqrt()).numpy()
            print(f"| {name} | {n} | {rmse[-1]:.4g} | {', '.join(f'{r:.3f}' for r in ratio.tolist())} "
                  f"| {time.perf_counter() - t0:.1f} |")
        slope, _ = np.polyfit(np.log(ns), np.log(rmse), 1)
        tr = math.sqrt(sand.trace().item())
        print(f"| {name} | fitted slope of log RMSE on log n | {slope:.3f} | sqrt(tr sandwich) = {tr:.3g} | |")
        line = ax_err.loglog(ns, rmse, "o-", label=f"{name} (slope {slope:.2f})")[0]
        ax_err.loglog(ns, [tr / math.sqrt(n) for n in ns], ":", color=line.get_color())
        r = np.array(ratios)
        for j in range(r.shape[1]):
            ax_cov.semilogx(ns, r[:, j], "o-" if j == 0 else ".-", color=line.get_color(), alpha=0.4 + 0.6 / (j + 1),
                            label=name if j == 0 else None)
    band = 3 * math.sqrt(2 / (reps - 1))
    ax_cov.axhspan(1 - band, 1 + band, color="grey", alpha=0.2, label="±3 s.e. (normal)")
    ax_cov.axhline(1, color="k", lw=0.8)
    ax_err.set(xlabel="n", ylabel="RMSE of theta_n", title="error (dotted: sqrt(tr H^-1 S H^-1 / n))")
    ax_cov.set(xlabel="n", ylabel="Var[sqrt(n)(theta_n - theta*)] / sandwich", title="covariance against T 7.1",
               ylim=(0, 3))
    ax_err.legend(fontsize=8)
    ax_cov.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, NAME, "estimation_consistency.png", dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, (n, z) in zip(axes, sorted(qq.items())):
        (osm, osr), (slope, icpt, r) = stats.probplot(z, dist="norm")
        ax.plot(osm, osr, ".", ms=3)
        ax.plot(osm, osm, "k-", lw=0.8, label="N(0, sandwich)")
        ks = stats.kstest(z, "norm")
        ax.set(title=f"quartic, x^4 coordinate, n={n}\nKS p={ks.pvalue:.2g}, skew={stats.skew(z):.2f}",
               xlabel="normal quantile", ylabel="standardised sqrt(n)(theta_n - theta*)")
        ax.legend()
        print(f"\nQQ quartic x^4 coordinate n={n}: KS statistic {ks.statistic:.3f} (p={ks.pvalue:.2g}), "
              f"skewness {stats.skew(z):.2f}")
    fig.tight_layout()
    common.save_figure(fig, NAME, "estimation_qq.png", dpi=120)


# Three exponential families through the same symmetric double well (modes +-m, unit curvature). Layouts
# index (0, x^2 coefficient, x^4 coefficient). "even" cannot move mass between the modes; "quartic" tilts by
# x and x^3, which also reshapes each mode; "weight" adds tanh(x), nearly constant on each mode, so it moves
# mass between the modes while hardly changing the score where the mass is.
B_FAMILIES = {
    "even (x^2, x^4)": ((1, 2), lambda x: torch.cat([x**2, x**4], -1)),
    "quartic (x, x^2, x^3, x^4)": ((0, 1, 0, 2), poly_stat((1, 2, 3, 4))),
    "weight (tanh x, x^2, x^4)": ((0, 1, 2), lambda x: torch.cat([torch.tanh(x), x**2, x**4], -1)),
}


def b_family(name: str, m: float) -> tuple[ExponentialFamily, torch.Tensor]:
    layout, stat = B_FAMILIES[name]
    dw = torch.cat([torch.zeros(1, dtype=F64), double_well_theta(m)])
    fam = ExponentialFamily(stat, interval=(-(m + 12.0), m + 12.0), n_panels=512)
    return fam, dw[list(layout)]  # layout: where (0, x^2 coef., x^4 coef.) go


def study_b(reps: int, points: int = M_POINTS_B) -> None:
    ms = np.linspace(0.5, 12.0, points)
    barrier = ms**2 / 8  # log p(+-m) - log p(0), unit curvature at the modes
    eff = {name: np.array([relative_efficiency(*b_family(name, m)).numpy() for m in ms]) for name in B_FAMILIES}
    names = list(B_FAMILIES)
    print("\n### (b) efficiency Var(MLE)/Var(score matching) per coordinate, double well with modes +-m\n")
    print("| m | barrier m^2/8 | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for i in range(0, len(ms), 4):
        cells = [", ".join(f"{v:.3g}" for v in eff[nm][i]) for nm in names]
        print(f"| {ms[i]:.2f} | {barrier[i]:.2f} | " + " | ".join(cells) + " |")
    # the claim: the efficiency degrades exponentially in the separation; fit log eff on the far range
    far = ms >= 4
    fits = {}
    for nm, coord in ((names[2], 0), (names[1], 0)):
        y = np.log(eff[nm][far, coord])
        for label, x in (("m", ms[far]), ("m^2/8", barrier[far]), ("log m", np.log(ms[far]))):
            coef, res, *_ = np.polyfit(x, y, 1, full=True)
            fits[nm, label] = coef
            print(f"fit {nm}, coordinate {coord}: log eff = {coef[1]:.3f} + {coef[0]:.3f} * {label} on m >= 4, "
                  f"rms residual {math.sqrt(res[0] / far.sum()):.3f}")

    # Monte Carlo check at a few separations: variance of score matching and of the MLE over repetitions
    gen = torch.Generator().manual_seed(1)
    n = 2000
    print(f"\nMonte Carlo check, weight family, tanh coordinate ({reps} repetitions, n={n}): n Var[theta_n]\n")
    print("| m | SM quadrature | SM Monte Carlo | MLE quadrature (I^-1) | MLE Monte Carlo | eff. quad | eff. MC |")
    print("|---|---|---|---|---|---|---|")
    mc_points = []
    for m in (1.0, 2.0, 3.0):
        fam, theta = b_family(names[2], m)
        x = fam.sample(reps * n, theta, gen).reshape(reps, n, 1)
        sm = score_matching_estimate(fam, x)
        mle = torch.stack([mle_estimate(fam, xr) for xr in x])
        v_sm, v_mle = n * sm[:, 0].var().item(), n * mle[:, 0].var().item()
        q_sm = sandwich_covariance(fam, theta)[0, 0].item()
        e = relative_efficiency(fam, theta)[0].item()
        mc_points.append((m, v_mle / v_sm))
        print(f"| {m:.1f} | {q_sm:.4g} | {v_sm:.4g} | {e * q_sm:.4g} | {v_mle:.4g} | {e:.3g} | {v_mle / v_sm:.3g} |")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {names[0]: "-", names[1]: "--", names[2]: "-"}
    for nm in names:
        ax1.semilogy(ms, eff[nm].min(1), styles[nm], label=f"{nm}: worst coordinate")
    ax1.semilogy(*zip(*mc_points), "ks", label="Monte Carlo (weight family, tanh)")
    c, a = fits[names[2], "m^2/8"]
    ax1.semilogy(ms[far], np.exp(a + c * barrier[far]), "k:", label=f"fit exp({a:.2f} {c:+.2f} m^2/8)")
    ax1.set(xlabel="mode position m (separation 2m, unit curvature)", ylabel="Var MLE / Var score matching",
            title="efficiency of score matching (quadrature)", ylim=(1e-9, 1.5))
    ax1.legend(fontsize=7)
    for nm in names[1:]:
        ax2.plot(barrier, np.log(eff[nm][:, 0]), styles[nm], label=f"{nm}: first coordinate")
    ax2.plot(barrier, -barrier, "k:", label="-barrier")
    ax2.set(xlabel="barrier m^2/8", ylabel="log efficiency", title="log efficiency against the barrier")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, NAME, "estimation_efficiency.png", dpi=120)


# ---- (c), (d): networks trained by the library's loop ----------------------------------------------------
N_INF = 500_000  # "infinite" data: with STEPS * batch = 768k draws each training point is seen about once
STEPS, BATCH, DEPTH, N_GEN = 3000, 256, 3, 2000
N_SWEEP = [100, 300, 1000, 3000, 10000, 30000, N_INF]
W_SWEEP = [16, 32, 64, 128, 256]
W_FIXED = 128


def train_network(data: str, n: int, width: int, out: Path):
    """An MLP trained by scoresde.train.Trainer with denoising score matching on n points of `data`."""
    from scoresde.running.config import Config
    from scoresde.running.train import Trainer

    cfg = Config(name=f"{data}_n{n}_w{width}", out=str(out), seed=0, data=data, n_train=n, n_test=200, sde="vp",
                 net="mlp", net_args={"hidden": width, "depth": DEPTH}, parametrization="eps", loss="denoising",
                 steps=STEPS, batch_size=BATCH, lr=1e-3, warmup=100, lr_schedule="cosine", ema_decay=0.999,
                 eval_every=0, checkpoint_every=STEPS, log_every=STEPS, progress=False, nfe=500)
    return Trainer(cfg, resume=False).run()


def score_error_profile(model, mixture, sde, ts: np.ndarray, m: int, gen: torch.Generator) -> np.ndarray:
    """E(t)^2 = E_{p_t} |s_theta(x, t) - grad log p_t(x)|^2 on the grid ts, m exact draws of p_t each."""
    out = []
    with torch.no_grad():
        for t in ts:
            pt = mixture.at_time(sde, float(t))
            x = pt.sample(m, gen)
            s = model(x.float(), torch.full((m,), float(t))).double()
            out.append(((s - pt.score(x)) ** 2).sum(-1).mean().item())
    return np.array(out)


def empirical_optimum_profile(x0: torch.Tensor, mixture, sde, ts: np.ndarray, m: int,
                              gen: torch.Generator) -> np.ndarray:
    """E(t)^2 of the exact minimiser of the DSM loss on the n points x0: the score of the smoothed empirical
    law (1/n) sum_i N(alpha_t x0_i, sigma_t^2 I), i.e. an infinitely flexible network trained to the end."""
    out = []
    for t in ts:
        tt = torch.tensor(float(t), dtype=F64)
        a, s2 = float(sde.alpha(tt)), float(sde.sigma(tt)) ** 2
        pt = mixture.at_time(sde, float(t))
        x = pt.sample(m, gen)
        centres = a * x0
        est = torch.cat([(torch.softmax(-torch.cdist(xc, centres) ** 2 / (2 * s2), -1) @ centres - xc) / s2
                         for xc in x.split(250)])
        out.append(((est - pt.score(x)) ** 2).sum(-1).mean().item())
    return np.array(out)


def add_empirical_optimum(result: dict) -> dict:
    """Adds the empirical DSM minimiser's error profile for every finite n of the sweep (no training)."""
    from scoresde.core.sde import VP
    from scoresde.running.data import load_dataset

    ts = np.array(result["ts"])
    emp = {}
    for n in [n for n in N_SWEEP if n != N_INF]:
        ds = load_dataset(result["data"], n_train=n, n_test=200, seed=0)  # the training points of (c)
        e2 = empirical_optimum_profile(ds.train.double(), ds.mixture, VP(), ts, 1000, torch.Generator().manual_seed(7))
        emp[str(n)] = e2.tolist()
        print(f"{result['data']} empirical DSM optimum n={n}: eps2={eps2_of(e2, ts):.4g}", flush=True)
    extra = {}
    if ds.mixture.dim == 2:  # the histogram TV of an exact sample: the floor of the TV column of (d)
        from scoresde.evaluation.metrics import tv_grid
        exact = ds.mixture.sample(N_GEN, torch.Generator().manual_seed(5))
        extra["tv_grid_exact"] = tv_grid(exact, ds.mixture.log_prob, bins=40).value
    return {**result, "empirical": emp, **extra}


def eps2_of(e2: np.ndarray, ts: np.ndarray) -> float:
    """sigma_t^2-weighted time average of E(t)^2 on [t_min, T] (the eps-prediction error; DSM weighting)."""
    from scoresde.core.sde import VP

    sig2 = np.array([float(VP().sigma(torch.tensor(t, dtype=F64))) ** 2 for t in ts])
    return float(np.trapezoid(sig2 * np.asarray(e2), ts) / (ts[-1] - ts[0]))


def study_cd(data: str, with_samples: bool, out: Path) -> dict:
    from scoresde.core.sde import VP
    from scoresde.evaluation.bounds import tv_bound, tv_bound_vp
    from scoresde.evaluation.metrics import mmd2, tv_grid, w2, w2_floor

    sde = VP()
    ts = sde.t_min + (sde.T - sde.t_min) * np.linspace(0, 1, 25) ** 2  # dense near t_min where errors grow
    runs = sorted({(n, W_FIXED) for n in N_SWEEP} | {(N_INF, w) for w in W_SWEEP})
    gen = torch.Generator().manual_seed(7)
    rows, extra = {}, {}
    for n, w in runs:
        t0 = time.perf_counter()
        trainer = train_network(data, n, w, out)
        mixture = trainer.data.mixture
        model = trainer.ema.copy().eval()
        e2 = score_error_profile(model, mixture, sde, ts, 4000, torch.Generator().manual_seed(7))  # common draws
        eps2 = eps2_of(e2, ts)
        row = {"n": n, "width": w, "E2": e2.tolist(), "eps2": eps2, "train_s": time.perf_counter() - t0}
        if with_samples:
            x = trainer.sample(N_GEN, torch.Generator().manual_seed(11)).double()
            ref = mixture.sample(N_GEN, gen)
            row["w2"] = w2(x, ref)
            row["mmd2"] = mmd2(x, mixture).value
            if not extra:  # KL(p_0 || N(0, I)) by Monte Carlo feeds the prior term of T 5.3
                kl = float((mixture.log_prob(ref) - sde.prior_logp(ref)).mean())
                extra = {"data_kl": kl, "prior_tv": tv_bound_vp(sde, score_error=0.0, data_kl=kl).prior_term,
                         "w2_floor": w2_floor(lambda k: mixture.sample(k, gen), N_GEN, repeats=3).value}
            e_fn = lambda t, e2=e2: float(np.sqrt(np.interp(t, ts, e2)))  # noqa: E731
            row["tv_bound"] = tv_bound(sde, score_error=e_fn, prior_tv=extra["prior_tv"], t_end=float(ts[0])).value
            if mixture.dim == 2:
                row["tv_grid"] = tv_grid(x, mixture.log_prob, bins=40).value
        rows[n, w] = row
        print(f"{data} n={n} width={w}: eps2={eps2:.4g}" + (f", W2={row['w2']:.3f}, MMD2={row['mmd2']:.2e}, "
              f"TV bound={row['tv_bound']:.3f}" if with_samples else "") + f" ({row['train_s']:.0f} s)", flush=True)
    result = {"data": data, "ts": ts.tolist(), "rows": list(rows.values()), **extra}
    common.write_json(NAME, result, file=f"estimation_networks_{data}.json", indent=None)
    return result


def report_cd(results: list[dict]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for res in results:
        data, rows = res["data"], {(r["n"], r["width"]): r for r in res["rows"]}
        print(f"\n### (c) {data}: sigma^2-weighted L2 score error eps^2 (eps units), {STEPS} steps, depth {DEPTH}\n")
        print("| n | width | eps^2 | sample part eps^2(n) - eps^2(inf) | train+eval [s] |")
        print("|---|---|---|---|---|")
        approx = {w: rows[N_INF, w]["eps2"] for w in W_SWEEP}
        for (n, w), r in sorted(rows.items()):
            part = r["eps2"] - approx[w] if n != N_INF else float("nan")
            print(f"| {'inf (' + str(n) + ')' if n == N_INF else n} | {w} | {r['eps2']:.4g} | {part:.3g} | "
                  f"{r['train_s']:.0f} |")
        ns = np.array([n for n in N_SWEEP if n != N_INF])
        sample = np.array([rows[n, W_FIXED]["eps2"] - approx[W_FIXED] for n in ns])
        ok = sample > 0
        a = np.polyfit(np.log(ns[ok]), np.log(sample[ok]), 1)[0] if ok.sum() >= 2 else float("nan")
        ws = np.array(W_SWEEP)
        b = np.polyfit(np.log(ws), np.log([approx[w] for w in ws]), 1)[0]
        print(f"\nfits ({data}): sample part ~ n^{a:.2f} (width {W_FIXED}); approximation part ~ width^{b:.2f} "
              f"(n = {N_INF})")
        ts = np.array(res["ts"])
        emp = np.array([eps2_of(res["empirical"][str(n)], ts) for n in ns])
        c = np.polyfit(np.log(ns), np.log(emp), 1)[0]
        print(f"\nempirical DSM minimiser (score of the smoothed training set), eps^2 against n: "
              + ", ".join(f"{n}: {e:.4g}" for n, e in zip(ns, emp)) + f"; fitted slope {c:.2f}")
        net = np.array([rows[n, W_FIXED]["eps2"] for n in ns])
        line = axes[0].loglog(ns, net, "o-", label=f"{data}: network, width {W_FIXED}")[0]
        axes[0].loglog(ns, emp, "s--", color=line.get_color(), label=f"{data}: empirical DSM minimiser (slope {c:.2f})")
        axes[0].axhline(approx[W_FIXED], ls=":", color=line.get_color(), label=f"{data}: network at n = inf")
        axes[1].loglog(ws, [approx[w] for w in ws], "o-", label=f"{data} (slope {b:.2f})")
        if "w2" in res["rows"][0]:
            tv0 = f"; histogram TV of an exact sample {res['tv_grid_exact']:.3f}" if "tv_grid_exact" in res else ""
            print(f"\n### (d) {data}: sample quality against the score error (W2 floor {res['w2_floor']:.3f} at "
                  f"{N_GEN} points; prior TV term {res['prior_tv']:.2e}{tv0})\n")
            print("| n | width | eps^2 | W2 | W2 - floor | MMD^2 | TV bound (T 5.2) | TV histogram |")
            print("|---|---|---|---|---|---|---|---|")
            for (n, w), r in sorted(rows.items()):
                print(f"| {n} | {w} | {r['eps2']:.4g} | {r['w2']:.3f} | {r['w2'] - res['w2_floor']:.3f} | "
                      f"{r['mmd2']:.2e} | {r['tv_bound']:.3f} | {r.get('tv_grid', float('nan')):.3f} |")
            eps = [r["eps2"] for r in rows.values()]
            axes[2].loglog(eps, [max(r["w2"] - res["w2_floor"], 1e-3) for r in rows.values()], "o",
                           label=f"{data}: W2 - floor")
            axes[2].loglog(eps, [r["tv_bound"] for r in rows.values()], "^", label=f"{data}: TV bound")
            if "tv_grid" in res["rows"][0]:
                axes[2].loglog(eps, [r["tv_grid"] for r in rows.values()], "s", label=f"{data}: TV histogram")
                axes[2].axhline(res["tv_grid_exact"], ls=":", color="k", label=f"{data}: TV histogram, exact sample")
    axes[0].set(xlabel="training samples n", ylabel="eps^2", title="score error against n")
    axes[1].set(xlabel="width", ylabel="eps^2 at n = inf", title="approximation (+ optimisation) error")
    axes[2].set(xlabel="eps^2 (sigma^2-weighted L2 score error)", ylabel="sample error",
                title="from score error to samples")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, NAME, "estimation_networks.png", dpi=120)


QUICK = dict(studies=["a", "b", "c", "d"], reps=20, max_n=1000, b_points=6, data=["ring"], steps=30,
             n_sweep=[100, 1000], n_inf=5000, widths=[16, 32], w_fixed=32)


def add_arguments(p) -> None:
    p.add_argument("studies", nargs="*", default=["a", "b"], type=common.choice("abcd"), help="of a, b, c, d")
    p.add_argument("--reps", type=int, default=500, help="repetitions per n in (a); (b) uses min(reps, 300)")
    p.add_argument("--max-n", type=int, default=NS_A[-1], help="(a): largest sample size")
    p.add_argument("--b-points", type=int, default=M_POINTS_B, help="(b): separations m on [0.5, 12]")
    p.add_argument("--data", nargs="+", default=["ring", "mixture16"], help="data sets of (c), (d)")
    p.add_argument("--reuse", action="store_true", help="(c), (d): reuse the saved JSON of a previous run")
    p.add_argument("--runs", type=Path, default=Path("runs/estimation"), help="run folders of (c), (d)")
    p.add_argument("--steps", type=int, default=STEPS, help="(c), (d): training steps per network")
    p.add_argument("--n-sweep", type=int, nargs="+", default=[n for n in N_SWEEP if n != N_INF],
                   help="(c), (d): finite training-set sizes")
    p.add_argument("--n-inf", type=int, default=N_INF, help='(c), (d): the "infinite" training set')
    p.add_argument("--widths", type=int, nargs="+", default=W_SWEEP, help="(c), (d): widths at n = inf")
    p.add_argument("--w-fixed", type=int, default=W_FIXED, help="(c), (d): the width of the n sweep")


def run_tag(args) -> str:
    return "-".join(args.studies + (args.data if {"c", "d"} & set(args.studies) else []) + ["reuse"] * args.reuse)


def run(args) -> None:
    global STEPS, N_INF, N_SWEEP, W_SWEEP, W_FIXED
    STEPS, N_INF, W_SWEEP, W_FIXED = args.steps, args.n_inf, args.widths, args.w_fixed
    N_SWEEP = args.n_sweep + [N_INF]
    runs = common.scratch_dir(NAME, args.runs)
    t0 = time.perf_counter()
    for s in [s for s in args.studies if s in "ab"]:
        if s == "a":
            study_a(args.reps, args.max_n)
        else:
            study_b(min(args.reps, 300), args.b_points)
    if {"c", "d"} & set(args.studies):
        results = []
        for data in args.data:
            file = f"estimation_networks_{data}.json"
            saved = next((f for f in (common.out_dir(NAME) / file, runs / file) if f.exists()), None)
            res = common.read_json(saved) if args.reuse and saved else study_cd(data, "d" in args.studies, runs)
            if "empirical" not in res:
                res = add_empirical_optimum(res)
                common.write_json(NAME, res, file=file, indent=None)
            results.append(res)
        report_cd(results)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
