"""Section 5 of the tutorial made executable (issue 9; DESIGN 7.2): bounds against exact distances.

(a) TV (T 5.2, 5.3) and W2 (T 5.5-5.7) bounds against the exact distances for Gaussian data, five SDEs,
    d = 2 and 16, score errors eps in {0, 0.01, 0.1, 0.5}, a grid of horizons T;
(b) VP against contractive VP: W2 of the output against T at a fixed score error, for strongly
    log-concave (Gaussian, exact) and bimodal data (simulated, exact score plus a constant error);
(c) discretisation: weak error of Euler-Maruyama and of the exponential integrator against the number of
    steps (exact recursions for Gaussians, Monte Carlo for a mixture) and the fitted order;
(d) TV of probability-flow ODE samplers against the TV bound of T 5.2 fed with the measured L2 score error:
    exact for Gaussian data, from the sampler's own log-density (scoresde.likelihood) for a 2-D mixture.

Run: python -m benchmarks bounds [a] [b] [c] [d] [d2]   (default all; make bench-bounds;
d is the Gaussian part of (d), d2 the mixture part).
Figures go to benchmarks/results/bounds/bounds_*.png; markdown tables are printed (and kept in run.log).
"""
from __future__ import annotations

import dataclasses
import math
import time

import matplotlib.ticker
import numpy as np
import torch

from benchmarks import common

from scoresde.core.gaussian import (
    backward_sde_law,
    constant_error,
    euler_maruyama_law,
    exponential_integrator_law,
    forward_law,
    probability_flow_law,
    random_gaussian,
    scaled_error,
    score_error_l2,
    step_coefficients,
)
from scoresde.core.sde import OU, VP, ContractiveOU, ContractiveVP, SubVP
from scoresde.core.targets import GaussianMixture
from scoresde.evaluation.bounds import tv_bound, tv_bound_vp, w2_bound_log_concave
from scoresde.evaluation.metrics import Estimate, kl_gaussian, tv, tv_grid, w2, w2_floor, w2_gaussian
from scoresde.sampling import dopri5, exponential_integrator
from scoresde.sampling.likelihood import log_likelihood

NAME = "bounds"
plt = common.plt()
MC = 100_000  # Monte Carlo sample size of the TV estimates and of (c)'s mixture paths (--mc)
GRIDS = {
    "VP": (VP(), [0.1, 0.25, 0.5, 0.75, 1.0]),
    "sub-VP": (SubVP(), [0.1, 0.25, 0.5, 0.75, 1.0]),
    "OU": (OU(), [0.25, 0.5, 1.0, 2.0, 4.0]),
    "contractive OU": (ContractiveOU(), [0.1, 0.25, 0.5, 1.0, 2.0]),
    "contractive VP": (ContractiveVP(), [0.1, 0.25, 0.5, 0.75, 1.0]),
}
EPS = [0.0, 0.01, 0.1, 0.5]
COLORS = {0.0: "k", 0.01: "tab:blue", 0.1: "tab:orange", 0.5: "tab:red"}


def gaussian_tv(p: tuple, q: tuple, n: int | None = None, seed: int = 0) -> Estimate:
    """Monte Carlo TV between two Gaussians (MC samples from the first), by scoresde.metrics.tv."""
    n = n or MC
    P = torch.distributions.MultivariateNormal(torch.from_numpy(p[0]), torch.from_numpy(p[1]))
    Q = torch.distributions.MultivariateNormal(torch.from_numpy(q[0]), torch.from_numpy(q[1]))
    torch.manual_seed(seed)
    return tv(P.log_prob, Q.log_prob, P.sample((n,)))


def bimodal() -> GaussianMixture:
    return GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.5, 0.0], [1.5, 0.0]]),
                           0.1 * torch.eye(2).expand(2, 2, 2).clone())


def shifted_score(target: GaussianMixture, sde, error: np.ndarray):
    """Exact mixture score plus a constant error vector."""
    exact = target.score_fn(sde)
    e = torch.from_numpy(error)
    return lambda x, t: exact(x, t) + e.to(x.dtype)


def coupled_paths(sde, score_fn, x_T: torch.Tensor, n_steps: int, exponential: bool, gen: torch.Generator):
    """Backward EM or exponential-integrator paths with n_steps and 2 n_steps uniform steps (T to 0) from the
    same x_T, coupled through the Brownian motion: a coarse step's normal is (z_1 + z_2) / sqrt 2 of the two
    fine ones. Coefficients from scoresde.gaussian.step_coefficients."""
    def coefs(n):
        ts = np.linspace(sde.T, 0.0, n + 1)
        lin, sw, nv = step_coefficients(sde, ts, exponential=exponential)
        return ts, lin, sw, np.sqrt(nv)

    (tc, lc, swc, nc), (tf, lf, swf, nf) = coefs(n_steps), coefs(2 * n_steps)
    xc, xf = x_T.clone(), x_T.clone()
    batch = torch.ones(x_T.shape[0], dtype=x_T.dtype)

    def step(x, t, lin, sw, nz, z):
        return lin * x + sw * score_fn(x, t * batch) + nz * z

    for i in range(n_steps):
        z1 = torch.randn(x_T.shape, generator=gen, dtype=x_T.dtype)
        z2 = torch.randn(x_T.shape, generator=gen, dtype=x_T.dtype)
        xf = step(xf, tf[2 * i], lf[2 * i], swf[2 * i], nf[2 * i], z1)
        xf = step(xf, tf[2 * i + 1], lf[2 * i + 1], swf[2 * i + 1], nf[2 * i + 1], z2)
        xc = step(xc, tc[i], lc[i], swc[i], nc[i], (z1 + z2) / math.sqrt(2))
    return xc, xf


def fit_order(ns: np.ndarray, errs: np.ndarray) -> float:
    """Least-squares slope of -log err against log N."""
    ok = errs > 0
    return float(-np.polyfit(np.log(ns[ok]), np.log(errs[ok]), 1)[0])


# ----------------------------------------------------------------------------------------------- (a)
def study_a() -> None:
    print("\n### (a) bounds against exact distances\n")
    table = []
    for dim in (2, 16):
        m, C = random_gaussian(dim, seed=0)
        kappa, m2 = 1 / np.linalg.eigvalsh(C).max(), float(m @ m + np.trace(C))
        u = np.ones(dim) / math.sqrt(dim)
        fig, axes = plt.subplots(2, len(GRIDS), figsize=(4 * len(GRIDS), 7.5))
        for col, (name, (sde0, Ts)) in enumerate(GRIDS.items()):
            rec = {eps: {k: [] for k in ("tv", "tv_se", "tvb", "w2", "w2b", "vpb", "tv_lin", "w2_lin")} for eps in EPS}
            viol_tv = viol_w2 = viol_lin = viol_l2fed = 0
            ratios_tv, ratios_w2 = [], []
            for T in Ts:
                sde = dataclasses.replace(sde0, T=T)
                pT = forward_law(sde, m, C, T)
                prior = (np.zeros(dim), sde.prior_std**2 * np.eye(dim))
                ptv = gaussian_tv(pT, prior, seed=1)
                for eps in EPS:
                    out = backward_sde_law(sde, m, C, error=constant_error(eps * u))
                    e_tv, e_w2 = gaussian_tv((m, C), out, seed=2), w2_gaussian(m, C, *out)
                    tvb = tv_bound(sde, score_error=eps, prior_tv=ptv.value)
                    w2b = w2_bound_log_concave(sde, kappa=kappa, score_error_sup=eps, data_mean=m, data_second_moment=m2)
                    vpb = (tv_bound_vp(sde, score_error=eps, data_kl=kl_gaussian(m, C, *prior)).value
                           if isinstance(sde, (VP, OU)) else np.nan)
                    lin = scaled_error(sde, m, C, eps)
                    out_l = backward_sde_law(sde, m, C, error=lin)
                    l_tv, l_w2 = gaussian_tv((m, C), out_l, seed=3), w2_gaussian(m, C, *out_l)
                    l_tvb = tv_bound(sde, score_error=lambda t: score_error_l2(sde, m, C, lin, t), prior_tv=ptv.value)
                    slack = 4 * (e_tv.stderr + ptv.stderr)
                    viol_tv += tvb.value < e_tv.value - slack or vpb < e_tv.value - slack
                    viol_w2 += w2b.value < e_w2 * (1 - 1e-9)
                    viol_lin += l_tvb.value < l_tv.value - 4 * (l_tv.stderr + ptv.stderr)
                    viol_l2fed += w2b.value < l_w2  # W2 bound fed the L2 error of a linear field: not its hypothesis
                    if e_tv.value > 10 * e_tv.stderr:
                        ratios_tv.append(tvb.value / e_tv.value)
                    if e_w2 > 1e-6:
                        ratios_w2.append(w2b.value / e_w2)
                    r = rec[eps]
                    for k, v in (("tv", e_tv.value), ("tv_se", e_tv.stderr), ("tvb", tvb.value), ("w2", e_w2),
                                 ("w2b", w2b.value), ("vpb", vpb), ("tv_lin", l_tv.value), ("w2_lin", l_w2)):
                        r[k].append(v)
            for eps in EPS:
                r = rec[eps]
                axes[0, col].plot(Ts, np.maximum(r["tv"], 1e-5), "o-", color=COLORS[eps], label=f"exact, eps={eps}")
                axes[0, col].plot(Ts, r["tvb"], "--", color=COLORS[eps], label=f"T 5.2 bound, eps={eps}")
                if isinstance(sde0, (VP, OU)):
                    axes[0, col].plot(Ts, r["vpb"], ":", color=COLORS[eps])
                axes[1, col].plot(Ts, np.maximum(r["w2"], 1e-5), "o-", color=COLORS[eps], label=f"exact, eps={eps}")
                axes[1, col].plot(Ts, r["w2b"], "--", color=COLORS[eps], label=f"T 5.5-5.7 bound, eps={eps}")
            for row, what in enumerate(("TV", "W2")):
                ax = axes[row, col]
                ax.set_yscale("log")
                ax.set_xscale("log")
                ax.set_title(f"{name}: {what}, d={dim}")
                ax.set_xticks(Ts, [f"{T:g}" for T in Ts])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xlabel("T")
                ax.grid(alpha=0.3, which="both")
            axes[0, 0].legend(fontsize=6)
            i_last = -1
            table.append((dim, name, Ts[i_last], rec[0.1]["tv"][i_last], rec[0.1]["tvb"][i_last], rec[0.1]["w2"][i_last],
                          rec[0.1]["w2b"][i_last], rec[0.0]["w2"][i_last], rec[0.0]["w2b"][i_last],
                          min(ratios_tv), min(ratios_w2), viol_tv, viol_w2, viol_lin, viol_l2fed))
        fig.suptitle(f"(a) exact distance (solid) vs bound (dashed; dotted: T 5.3) against T, Gaussian data, d={dim}")
        fig.tight_layout()
        common.save_figure(fig, NAME, f"bounds_a_d{dim}.png", dpi=90)
    print("| d | SDE | T | TV exact (eps=0.1) | TV bound | W2 exact (eps=0.1) | W2 bound | W2 exact (eps=0) | W2 bound (eps=0) "
          "| min TV bound/exact | min W2 bound/exact | TV violations | W2 violations | TV viol. (linear error) "
          "| W2 bound fed L2 error < exact |")
    print("|" + "---|" * 15)
    for row in table:
        d, name, T, *vals, vt, vw, vl, vf = row
        n_cases = len(GRIDS[name][1]) * len(EPS)
        print(f"| {d} | {name} | {T} | " + " | ".join(f"{v:.3g}" for v in vals)
              + f" | {vt}/{n_cases} | {vw}/{n_cases} | {vl}/{n_cases} | {vf}/{n_cases} |")


# ----------------------------------------------------------------------------------------------- (b)
def study_b() -> None:
    print("\n### (b) VP against contractive VP\n")
    Ts = np.linspace(0.1, 1.0, 10)
    eps = 0.1
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = []
    for ax, kappa in zip(axes[:2], (4.0, 0.25)):
        m, C = np.array([1.0, 0.0]), np.eye(2) / kappa
        u = np.array([1.0, 1.0]) / math.sqrt(2)
        for name, sde0, color in (("VP", VP(), "tab:blue"), ("contractive VP", ContractiveVP(), "tab:red")):
            ex0, ex, shift, bd = [], [], [], []
            for T in Ts:
                sde = dataclasses.replace(sde0, T=float(T))
                out0 = backward_sde_law(sde, m, C)
                out = backward_sde_law(sde, m, C, error=constant_error(eps * u))
                ex0.append(w2_gaussian(m, C, *out0))
                ex.append(w2_gaussian(m, C, *out))
                shift.append(w2_gaussian(*out, *out0))
                bd.append(w2_bound_log_concave(sde, kappa=kappa, score_error_sup=eps, data_mean=m,
                                               data_second_moment=float(m @ m + np.trace(C))).value)
            ax.plot(Ts, ex, "o-", color=color, label=f"{name}, eps={eps}")
            ax.plot(Ts, ex0, "s:", color=color, label=f"{name}, eps=0 (noise-approximation bias)")
            ax.plot(Ts, shift, "^-.", color=color, alpha=0.7, label=f"{name}, W2(out_eps, out_0)")
            ax.plot(Ts, bd, "--", color=color, alpha=0.5, label=f"{name}, bound (T 5.6/5.7)")
            rows.append((f"Gaussian, kappa={kappa}", name, f"{ex0[-1]:.3g}", f"{ex[-1]:.3g}", f"{shift[-1]:.3g}",
                         f"{bd[-1]:.3g}", f"{min(ex):.3g} at T={Ts[int(np.argmin(ex))]:.1f}"))
        ax.set_title(f"N(m, I/{kappa:g}) (kappa={kappa:g}), exact W2")
    # bimodal mixture: exact score + constant error, exponential integrator with 500 steps; the runs with and
    # without the error share x_T and the Brownian increments (synchronous coupling, as in the proof of T 5.5)
    target, n, reps = bimodal(), 1000, 3
    gen = torch.Generator().manual_seed(0)
    floor = w2_floor(lambda k: target.sample(k, gen), n, repeats=reps)
    u = np.array([1.0, 1.0]) / math.sqrt(2)
    ax = axes[2]
    Tm = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    for name, sde0, color in (("VP", VP(), "tab:blue"), ("contractive VP", ContractiveVP(), "tab:red")):
        res = {0.0: [], eps: [], "disp": []}
        for T in Tm:
            sde = dataclasses.replace(sde0, T=float(T))
            ts = torch.linspace(float(T), 0.0, 501, dtype=torch.float64)
            vals = {0.0: [], eps: [], "disp": []}
            for r in range(reps):
                x_T = sde.prior_sample((n, 2), generator=gen, dtype=torch.float64)
                outs = {}
                for e in (0.0, eps):
                    g = torch.Generator().manual_seed(100 + r)
                    outs[e] = exponential_integrator(sde, shifted_score(target, sde, e * u), x_T, ts, generator=g,
                                                     denoise=False)
                    vals[e].append(w2(outs[e], target.sample(n, gen)))
                vals["disp"].append(float(((outs[eps] - outs[0.0]) ** 2).sum(1).mean().sqrt()))
            for k in res:
                res[k].append((np.mean(vals[k]), np.std(vals[k], ddof=1) / math.sqrt(reps)))
        for k, style, lab in ((eps, "o-", f"eps={eps}"), (0.0, "s:", "eps=0"), ("disp", "^-.", "coupled |Y_eps - Y_0|")):
            mean, se = np.array(res[k]).T
            ax.errorbar(Tm, mean, yerr=2 * se, fmt=style, color=color, capsize=2, label=f"{name}, {lab}")
        fmt = lambda v: f"{v[0]:.3f} +- {v[1]:.3f}"  # noqa: E731
        best = int(np.argmin([v[0] for v in res[eps]]))
        rows.append(("bimodal mixture", name, fmt(res[0.0][-1]), fmt(res[eps][-1]), fmt(res["disp"][-1]), "-",
                     f"{res[eps][best][0]:.3f} at T={Tm[best]:.1f}"))
    ax.axhline(floor.value, color="gray", lw=1, label=f"W2 floor (n={n})")
    ax.set_title(f"bimodal mixture, W2 of {n} samples (EI, 500 steps, {reps} reps)")
    for ax in axes:
        ax.set_xlabel("T")
        ax.set_ylabel("W2")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    common.save_figure(fig, NAME, "bounds_b_vp_vs_cvp.png", dpi=90)
    print(f"W2 floor of the mixture at n={n}: {floor.value:.3f} +- {floor.stderr:.3f}\n")
    print("| data | SDE | W2(out, data) at T=1, eps=0 | at T=1, eps=0.1 | W2(out_eps, out_0) at T=1 (mixture: coupled "
          "upper bound) | W2 bound at T=1 | min over T of W2 (eps=0.1) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ----------------------------------------------------------------------------------------------- (c)
def study_c() -> None:
    print("\n### (c) discretisation\n")
    m, C = random_gaussian(2, seed=0)
    ns = 2 ** np.arange(2, 11)
    schemes = {
        "EM (SDE)": lambda sde, n, pT: euler_maruyama_law(sde, m, C, n, start=pT),
        "EI (SDE)": lambda sde, n, pT: exponential_integrator_law(sde, m, C, n, start=pT),
        "Euler (ODE)": lambda sde, n, pT: euler_maruyama_law(sde, m, C, n, start=pT, probability_flow=True),
        "EI (ODE)": lambda sde, n, pT: exponential_integrator_law(sde, m, C, n, start=pT, probability_flow=True),
    }
    sdes = {"VP": VP(), "sub-VP": SubVP(), "OU": OU(), "contractive OU": ContractiveOU(T=1.0),
            "contractive VP": ContractiveVP()}
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    axes = axes.ravel()
    orders = {}
    m2_exact = float(m @ m + np.trace(C))
    for ax, (name, sde) in zip(axes, sdes.items()):
        pT = forward_law(sde, m, C, sde.T)
        for scheme, law in schemes.items():
            laws = [law(sde, int(n), pT) for n in ns]
            w = np.array([w2_gaussian(m, C, *lw) for lw in laws])
            weak = np.array([abs(float(lw[0] @ lw[0] + np.trace(lw[1])) - m2_exact) for lw in laws])
            tail = ns >= 64
            orders[(name, scheme)] = (fit_order(ns[tail], w[tail]), fit_order(ns[tail], weak[tail]), w[ns == 64][0])
            ax.loglog(ns, w, "o-", label=scheme)
        ax.loglog(ns, 1.0 / ns, "k:", label="1/N")
        ax.set_title(f"{name} (T={sde.T:g}): W2(N-step law, p_0)")
        ax.set_xlabel("steps N")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    # mixture: weak error of E|Y|^2 by Monte Carlo, started from exact samples of p_T; N and 2N steps coupled
    target = bimodal()
    m2_mix = float(torch.trace(target.covariance()) + target.mean() @ target.mean())
    gen = torch.Generator().manual_seed(1)
    nm, n_mc = np.array([8, 16, 32, 64, 128, 256]), MC
    ax = axes[-1]
    mix_rows = []
    for name, sde in (("VP", VP()), ("contractive VP", ContractiveVP())):
        for scheme in ("EM", "EI"):
            errs, ses, diffs, dses = [], [], [], []
            for n_steps in nm:
                x_T = target.at_time(sde, sde.T).sample(n_mc, gen)
                coarse, fine = coupled_paths(sde, target.score_fn(sde), x_T, int(n_steps), scheme == "EI", gen)
                phi_c, phi_f = (coarse**2).sum(1), (fine**2).sum(1)
                errs.append(float(phi_c.mean()) - m2_mix)
                ses.append(float(phi_c.std()) / math.sqrt(n_mc))
                diffs.append(float((phi_c - phi_f).mean()))
                dses.append(float((phi_c - phi_f).std()) / math.sqrt(n_mc))
            errs, ses, diffs, dses = map(np.array, (errs, ses, diffs, dses))
            ax.errorbar(nm, np.abs(errs), yerr=2 * ses, fmt="o-", capsize=2, label=f"{name}, {scheme}: |e_N|")
            ax.errorbar(nm, np.abs(diffs), yerr=2 * dses, fmt="s--", capsize=2, label=f"{name}, {scheme}: |e_N - e_2N|")
            tail = nm >= 32
            mix_rows.append((name, scheme, errs, ses, diffs, dses, fit_order(nm[tail], np.abs(diffs[tail]))))
    ax.loglog(nm, 1.0 / nm, "k:", label="1/N")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("bimodal mixture: weak error of E|Y|^2 (MC, 2 s.e.)")
    ax.set_xlabel("steps N")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, NAME, "bounds_c_discretisation.png", dpi=90)
    print("Gaussian data, d = 2, started from the exact p_T (discretisation error only); order fitted on N = 64..1024.\n")
    print("| SDE | " + " | ".join(f"{s}: order W2 / order E|Y|^2 / W2 at N=64" for s in schemes) + " |")
    print("|---|" + "---|" * len(schemes))
    for name in sdes:
        print(f"| {name} | " + " | ".join("{:.2f} / {:.2f} / {:.2g}".format(*orders[(name, s)]) for s in schemes) + " |")
    print("\nBimodal mixture (2-D), weak error e_N = E|Y_N|^2 - E|X_0|^2 (exact E|X_0|^2 = {:.4f}), {} paths from exact "
          "p_T; e_N - e_2N from coupled N- and 2N-step paths (shared Brownian increments); order fitted on "
          "|e_N - e_2N|, N >= 32.\n".format(m2_mix, n_mc))
    print("| SDE | scheme | " + " | ".join(f"N={n}: e_N / e_N - e_2N" for n in nm) + " | fitted order |")
    print("|---|---|" + "---|" * len(nm) + "---|")
    for name, scheme, errs, ses, diffs, dses, order in mix_rows:
        print(f"| {name} | {scheme} | " + " | ".join(f"{e:+.4f}({1e4 * s:.0f}) / {d:+.4f}({1e4 * ds:.0f})"
                                                    for e, s, d, ds in zip(errs, ses, diffs, dses))
              + f" | {order:.2f} |")
    print("\n(standard errors in units of 1e-4 in parentheses)")


# ----------------------------------------------------------------------------------------------- (d)
def study_d() -> None:
    """(d) for Gaussian data: exact output laws of the probability-flow ODE and of the SDE."""
    print("\n### (d) TV of probability-flow ODE samplers against the TV bound (T 5.2)\n")
    m, C = random_gaussian(2, seed=0)
    rows = []
    for name, sde in (("VP", VP()), ("OU", OU()), ("sub-VP", SubVP()), ("contractive VP", ContractiveVP())):
        prior = (np.zeros(2), sde.prior_std**2 * np.eye(2))
        ptv = gaussian_tv(forward_law(sde, m, C, sde.T), prior, seed=1)
        for eps in (0.05, 0.1, 0.5):
            for field, err in (("constant", constant_error(eps * np.ones(2) / math.sqrt(2))),
                               ("+linear", scaled_error(sde, m, C, eps)), ("-linear", scaled_error(sde, m, C, -eps))):
                bound = tv_bound(sde, score_error=lambda t: score_error_l2(sde, m, C, err, t), prior_tv=ptv.value)
                ode = gaussian_tv((m, C), probability_flow_law(sde, m, C, error=err), seed=2)
                sde_tv = gaussian_tv((m, C), backward_sde_law(sde, m, C, error=err), seed=3)
                rows.append((name, eps, field, ode, sde_tv, bound.value))
    print("Gaussian data (d = 2), exact output laws; TV by Monte Carlo (1e5 samples, s.e. < 0.002).\n")
    print("| SDE | eps | error field | TV of ODE output | TV of SDE output | T 5.2 bound | ODE within bound |")
    print("|---|---|---|---|---|---|---|")
    for name, eps, field, ode, sde_tv, b in rows:
        print(f"| {name} | {eps} | {field} | {ode.value:.3f} | {sde_tv.value:.3f} | {b:.3f} | "
              f"{'yes' if ode.value <= b + 4 * ode.stderr else '**no**'} |")


def study_d_mixture() -> None:
    """(d) on a 2-D mixture: the ODE sampler's own density from scoresde.likelihood."""
    target, sde, t_min, n = bimodal(), VP(), 1e-3, 2000
    gen = torch.Generator().manual_seed(4)
    u = np.array([1.0, 1.0]) / math.sqrt(2)
    p_end = target.at_time(sde, t_min)
    ptv_mix = tv(target.at_time(sde, sde.T).log_prob, sde.prior_logp, target.at_time(sde, sde.T).sample(MC, gen))
    print(f"\n2-D bimodal mixture, VP, t_end = {t_min}; TV(p_T, pi) = {ptv_mix.value:.2e}. TV(p_t_end, q) = "
          "E_q[(1 - p/q)_+] over n = 2000 ODE samples (dopri5, rtol 1e-7), log q from scoresde.likelihood "
          "(exact divergence, rtol 1e-7); the SDE column is the EI sampler (500 steps) scored by tv_grid (60x60 "
          "bins, floor = value expected of an exact sampler).\n")
    print("| eps | measured E(t) range | TV of ODE sampler | TV of SDE sampler (grid) | grid floor | T 5.2 bound | ODE within bound |")
    print("|---|---|---|---|---|---|---|")
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    eps_list = [0.0, 0.1, 0.3, 0.6]
    ode_vals, sde_vals, bounds = [], [], []
    grid_t = np.linspace(t_min, sde.T, 41)
    for eps in eps_list:
        score = shifted_score(target, sde, eps * u)
        # measured L2 error on a time grid (Monte Carlo from the exact p_t), interpolated
        E = []
        for t in grid_t:
            xt = target.at_time(sde, float(t)).sample(4000, gen)
            E.append(float(((score(xt, torch.full((4000,), float(t), dtype=torch.float64))
                             - target.at_time(sde, float(t)).score(xt)) ** 2).sum(1).mean().sqrt()))
        E = np.array(E)
        b = tv_bound(sde, score_error=lambda t: float(np.interp(t, grid_t, E)), prior_tv=ptv_mix.value, t_end=t_min)
        x = dopri5(sde, score, sde.prior_sample((n, 2), generator=gen, dtype=torch.float64), t_end=t_min,
                   rtol=1e-7, atol=1e-7, denoise=False)
        log_q, _ = log_likelihood(sde, score, x, t_min=t_min, rtol=1e-7, atol=1e-7)
        est = tv(lambda z: log_q, p_end.log_prob, x)
        ts = torch.linspace(sde.T, t_min, 501, dtype=torch.float64)
        xs = exponential_integrator(sde, score, sde.prior_sample((20_000, 2), generator=gen, dtype=torch.float64), ts,
                                    generator=gen, denoise=False)
        grid = tv_grid(xs, p_end.log_prob, bins=60, bounds=[(-3.5, 3.5), (-2.5, 2.5)])
        ode_vals.append(est), sde_vals.append(grid), bounds.append(b.value)
        print(f"| {eps} | {E.min():.3f}-{E.max():.3f} | {est.value:.3f} +- {est.stderr:.3f} | {grid.value:.3f} | "
              f"{grid.floor:.3f} | {b.value:.3f} | {'yes' if est.value <= b.value + 4 * est.stderr else '**no**'} |")
        if eps == eps_list[-1]:
            ax[1].scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, label=f"ODE samples, eps={eps}")
            ax[1].scatter(*target.sample(n, gen).T, s=2, alpha=0.3, label="data")
    ax[0].errorbar(eps_list, [e.value for e in ode_vals], yerr=[2 * e.stderr for e in ode_vals], fmt="o-",
                   label="TV of PF-ODE sampler (own log-density)")
    ax[0].plot(eps_list, [g.value for g in sde_vals], "s-", label="TV of SDE sampler (grid)")
    ax[0].plot(eps_list, [g.floor for g in sde_vals], "s:", color="gray", label="grid floor")
    ax[0].plot(eps_list, bounds, "k--", label="T 5.2 bound (measured E(t))")
    ax[0].set_xlabel("eps (constant error)")
    ax[0].set_ylabel("TV")
    ax[0].legend(fontsize=7)
    ax[0].grid(alpha=0.3)
    ax[0].set_title("VP, bimodal mixture")
    ax[1].legend(fontsize=7, markerscale=4)
    ax[1].set_aspect("equal")
    fig.tight_layout()
    common.save_figure(fig, NAME, "bounds_d_ode_tv.png", dpi=90)


STUDIES = {"a": study_a, "b": study_b, "c": study_c, "d": study_d, "d2": study_d_mixture}
QUICK = dict(studies=["d", "c"], mc=2000)


def add_arguments(p) -> None:
    p.add_argument("studies", nargs="*", default=list(STUDIES), type=common.choice(STUDIES),
                   help=f"studies to run, of {', '.join(STUDIES)} (default all; d: Gaussian part of (d), d2: mixture part)")
    p.add_argument("--mc", type=int, default=MC, help="Monte Carlo sample size of the TV estimates and (c)'s paths")


def run_tag(args) -> str:
    return "" if set(args.studies) == set(STUDIES) else "-".join(args.studies)


def run(args) -> None:
    global MC
    MC = args.mc
    for key in args.studies:
        start = time.perf_counter()
        STUDIES[key]()
        print(f"\n(study {key}: {time.perf_counter() - start:.0f} s)")
