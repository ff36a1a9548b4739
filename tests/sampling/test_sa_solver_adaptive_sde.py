"""sa3 (SA-Solver's stochastic Adams predictor-corrector) and adaptive_sde (Jolicoeur-Martineau et al. 2105.14080)
against closed forms: scipy quadrature of the weights, diffusers' SA-Solver coefficients, the exact output law of
the sampler for Gaussian data, and Monte Carlo with error bars for the adaptive solver."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from scoresde.core.gaussian import forward_law, random_gaussian
from scoresde.core.sde import VE, VP, ContractiveVP
from scoresde.core.targets import GaussianMixture, ring
from scoresde.sampling import METHODS, dpm_solver_multistep, sample, time_grid
from scoresde.sampling.adaptive import adaptive_sde
from scoresde.sampling.ode import exp_adams_weights

F64 = torch.float64
SDES = [VP(), VE(), ContractiveVP()]


def counted(score_fn):
    def wrapped(x, t):
        wrapped.calls += 1
        return score_fn(x, t)

    wrapped.calls = 0
    return wrapped


# ---- sa3: the stochastic exponential-Adams weights -----------------------------------------

@pytest.mark.parametrize("rate", [1.0, 1.25, 2.0])
@pytest.mark.parametrize("lam_from, lam_to, nodes", [
    (-1.0, -0.3, [-1.0]), (0.2, 1.5, [0.2, -0.4, -0.9]), (2.0, 2.05, [2.0, 1.9, 1.7]),
    (0.5, 1.2, [1.2, 0.5, 0.1, -0.6]), (-3.0, 1.0, [1.0, -3.0, -5.0]),
], ids=["ddim", "ab3", "ab3-small-h", "am4", "am3-large-h"])
def test_sa_weights_against_quadrature(rate, lam_from, lam_to, nodes):
    """SA-Solver's weights with rate = 1 + tau^2: w_j = rate alpha' int e^{rate (u - lam_to)} L_j(u) du (scipy)."""
    a_next = 0.7
    w = exp_adams_weights(a_next, lam_from, lam_to, nodes, rate)

    def basis(j, u):
        return math.prod((u - nodes[m]) / (nodes[j] - nodes[m]) for m in range(len(nodes)) if m != j)

    ref = [rate * a_next * integrate.quad(lambda u: math.exp(rate * (u - lam_to)) * basis(j, u), lam_from, lam_to,
                                          epsabs=0, epsrel=1e-13)[0] for j in range(len(nodes))]
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("tau", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_sa_weights_match_diffusers(order, tau):
    """diffusers' SASolverScheduler (data prediction) weights x0 at the nodes by
    (1 + tau^2) sigma' e^{-tau^2 lambda'} c_j with its own closed-form integrals c_j; the same numbers."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.SASolverScheduler()
    lam_s, lam_t, nodes = 0.3, 0.9, [0.3, -0.2, -0.6, -1.1][:order]
    t64 = lambda v: torch.tensor(v, dtype=F64)
    c = sched.get_coefficients_fn(order, t64(lam_s), t64(lam_t), [t64(v) for v in nodes], t64(tau))
    sigma_t = 1 / math.sqrt(1 + math.exp(2 * lam_t))  # VP: alpha^2 + sigma^2 = 1, alpha / sigma = e^lambda
    ref = [float((1 + tau**2) * sigma_t * math.exp(-tau**2 * lam_t) * cj) for cj in c]
    w = exp_adams_weights(sigma_t * math.exp(lam_t), lam_s, lam_t, nodes, 1 + tau**2)
    np.testing.assert_allclose(w, ref, rtol=1e-9)


# ---- sa3: tau = 0 is the deterministic predictor-corrector ----------------------------------

@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_sa3_at_tau_zero_is_unipc_bit_for_bit(sde):
    """At tau = 0 (or with a tau band no step reaches) sa3 draws no noise and is unipc3's predictor-corrector:
    the same bits, whatever the generator (at nfe 9, 8 steps of noise-to-signal 0.4 / 8 above unipc's end floor,
    the two fixed default grids coincide)."""
    score = ring().score_fn(sde)
    x_T = sde.prior_sample((64, 2), torch.Generator().manual_seed(0), F64)
    unipc = sample(sde, score, None, method="unipc3", nfe=9, x_T=x_T, schedule="default")
    for kw in ({"tau": 0.0}, {"tau_band": (50.0, 60.0)}):
        for seed in (1, 2):
            gen = torch.Generator().manual_seed(seed)
            sa = sample(sde, score, None, method="sa3", nfe=9, x_T=x_T, generator=gen, extrapolate=True,
                        schedule="default", **kw)
            assert torch.equal(sa, unipc), kw
    ts = time_grid(sde, 8, "logsnr", dtype=F64)
    for order in (1, 2, 3):
        flow = dpm_solver_multistep(sde, score, x_T, ts, order=order, corrector=True)
        same = dpm_solver_multistep(sde, score, x_T, ts, order=order, corrector=True, tau=0.0,
                                    generator=torch.Generator().manual_seed(3))
        assert torch.equal(flow, same)
    assert not METHODS["sa3"].stochastic({"tau": 0.0}) and METHODS["sa3"].stochastic({})


def test_tau_band_switches_noise_by_noise_to_signal():
    """tau acts on a step exactly when sigma / alpha at its start lies in the band: with a band holding only
    the first step, outputs differ from tau = 0 but two runs with one seed agree."""
    sde, score = VP(), ring().score_fn(VP())
    x_T = sde.prior_sample((32, 2), torch.Generator().manual_seed(0), F64)
    ts = time_grid(sde, 6, "logsnr", dtype=F64)
    r0 = float(torch.exp(-sde.log_snr(ts[0])))
    run = lambda **kw: dpm_solver_multistep(sde, score, x_T, ts, order=3, corrector=True, denoise=False,
                                            generator=torch.Generator().manual_seed(4), **kw)
    calls = []
    run(tau=1.0, tau_band=(0.99 * r0, 1.01 * r0), noise=lambda i: calls.append(i) or torch.zeros_like(x_T))
    assert calls == [0]
    assert not torch.equal(run(tau=1.0, tau_band=(0.99 * r0, 1.01 * r0)), run(tau=0.0))


# ---- sa3: the exact output law for Gaussian data ----------------------------------------------

M, V = 0.5, 0.04  # data N(M, V) in 1-D
TARGET = GaussianMixture(torch.ones(1), torch.tensor([[M]]), torch.tensor([[[V]]]))


def sa_output_law(sde, steps, t_end, tau):
    """The exact law of dpm_solver_multistep's output, started from the exact p_T, for Gaussian data: the score
    is affine, so the output is c + A (x_T - m_T) + sum_i B_i z_i. One run of the solver itself on n + 2 rows gives
    c (row 0: x_T = m_T, no noise), A (row 1: x_T = m_T + 1) and every B_i (row 2 + i: z_i = 1, a callable
    noise). Returns (mean, variance) = (c, A^2 v_T + sum B_i^2)."""
    rows = steps + 2
    p_T = TARGET.at_time(sde, sde.T)
    m_T, v_T = float(p_T.alpha * M), float(p_T.alpha**2 * V + p_T.sigma**2)
    x_T = torch.full((rows, 1), m_T, dtype=F64)
    x_T[1] += 1.0

    def noise(i):
        z = torch.zeros(rows, 1, dtype=F64)
        z[2 + i] = 1.0
        return z

    ts = time_grid(sde, steps, "logsnr", t_end=t_end, dtype=F64)
    y = dpm_solver_multistep(sde, TARGET.score_fn(sde), x_T, ts, order=3, corrector=True, tau=tau, noise=noise,
                             denoise=False)[:, 0]
    return float(y[0]), float((y[1] - y[0]) ** 2 * v_T + ((y[2:] - y[0]) ** 2).sum())


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_sa3_output_law_converges_with_weak_order_two(sde, tau):
    """The SDE of every tau has the marginals p_t, so the output law must tend to p_{t_end} = N(alpha m,
    alpha^2 v + sigma^2) (exact) as the steps double (log-SNR grid, 16 -> 128 steps). Measured: the mean is
    exact to 1e-9 (x0_hat along the mean path is the constant m, which the interpolation reproduces), the
    variance error falls at rate 1.92-2.07 per doubling for VP, VE, ContractiveVP and tau 0.5, 1 (also with
    lower_order_final=False: 2.5-3 at 16-64 steps, settling to 2.2-2.3 at 512), so weak order 2.
    Asserted: rates in (1.7, 2.4) on the last two doublings."""
    t_end = float(sde.inverse_log_snr(torch.tensor(2.0, dtype=F64)))
    p = TARGET.at_time(sde, t_end)
    exact_mean, exact_var = float(p.alpha * M), float(p.alpha**2 * V + p.sigma**2)
    laws = [sa_output_law(sde, n, t_end, tau) for n in (16, 32, 64, 128)]
    assert all(abs(mean - exact_mean) < 1e-8 for mean, _ in laws), laws
    errs = np.array([abs(var - exact_var) for _, var in laws])
    rates = np.log2(errs[:-1] / errs[1:])
    assert ((1.7 < rates[1:]) & (rates[1:] < 2.4)).all(), (errs, rates)


# ---- adaptive_sde ---------------------------------------------------------------------------------

def _gaussian_data(dim=2):
    m, C = random_gaussian(dim, seed=1, eig_range=(0.05, 0.3))
    return m, C, GaussianMixture(torch.ones(1), torch.tensor(m)[None], torch.tensor(C)[None])


def _moment_z(x, mean, cov):
    """Largest |z-score| of the sample mean and covariance entries against the exact (mean, cov)."""
    n = x.shape[0]
    xm = x.mean(0).numpy()
    xc = np.cov(x.numpy(), rowvar=False)
    z_mean = np.abs(xm - mean) / np.sqrt(np.diag(cov) / n)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    return max(z_mean.max(), (np.abs(xc - cov) / se_cov).max())


def _exact_start(sde, m, C, n, seed):
    """n draws from the exact p_T of data N(m, C) (the prior differs from it for contractive SDEs)."""
    mT, CT = forward_law(sde, m, C, sde.T)
    z = torch.randn(n, len(m), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return torch.tensor(mT) + z @ torch.tensor(np.linalg.cholesky(CT)).T


@pytest.mark.slow  # 13-65 s each (20000 draws at rtol 0.05)
@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_adaptive_sde_reaches_the_exact_law_within_its_budget(sde):
    """Gaussian data N(m, C), started from the exact p_T: the reverse SDE's marginal at t_end is exactly
    N(alpha m, alpha^2 C + sigma^2 I). At rtol 0.01 the sample mean and covariance of 20000 draws are within 4.5
    standard errors of it (measured: 1.7 VE, 2.7 VP); the score calls are 2 per iteration (the callback counts
    them) and never above nfe."""
    m, C, target = _gaussian_data()
    score = counted(target.score_fn(sde))
    t_end = 1e-2 * sde.T
    iters = []
    x = sample(sde, score, None, method="adaptive_sde", nfe=3000, x_T=_exact_start(sde, m, C, 20000, 3), rtol=0.01,
               t_end=t_end, denoise=False, generator=torch.Generator().manual_seed(0),
               callback=lambda i, t, x: iters.append(i))
    assert score.calls == 2 * iters[-1] <= 3000
    mean, cov = forward_law(sde, m, C, t_end)
    assert _moment_z(x, mean, cov) < 4.5


@pytest.mark.slow  # 9 minutes before it fails
@pytest.mark.xfail(raises=RuntimeError, strict=True,
                   reason="measured: at the tighter tolerance the batch-wise step needs more than nfe = 200000 "
                          "evaluations (the largest per-sample error sets the step); open in issue 21")
def test_adaptive_sde_tighter_tolerance_costs_more_and_follows_the_path_closer():
    """VE, data N(m, C): on one Brownian path (same seed) and the same x_T, rtol 0.2, 0.05, 0.01 spend increasing
    NFE and land increasingly close to the path's solution at rtol 1e-4 (the strong error; the tolerance
    controls it, so it must fall)."""
    sde, (m, C, target) = VE(), _gaussian_data()
    x_T = _exact_start(sde, m, C, 2000, 1)
    nfes, outs = [], []
    for rtol in (0.2, 0.05, 0.01, 1e-4):
        score = counted(target.score_fn(sde))
        outs.append(sample(sde, score, None, method="adaptive_sde", nfe=200000, x_T=x_T, rtol=rtol, atol=1e-6,
                           t_end=1e-2, denoise=False, generator=torch.Generator().manual_seed(2)))
        nfes.append(score.calls)
    errs = [(x - outs[-1]).norm(dim=1).mean().item() for x in outs[:-1]]
    assert nfes[0] < nfes[1] < nfes[2] < nfes[3], nfes
    assert errs[0] > errs[1] > errs[2], (nfes, errs)


def test_adaptive_sde_budget_is_a_cap_and_says_so():
    sde, score = VP(), counted(ring().score_fn(VP()))
    with pytest.raises(RuntimeError, match="nfe=30"):
        sample(sde, score, (64, 2), method="adaptive_sde", nfe=30, rtol=1e-3, generator=torch.Generator().manual_seed(0))
    assert score.calls == 30
    score.calls = 0
    x = sample(sde, score, (64, 2), method="adaptive_sde", nfe=1000, generator=torch.Generator().manual_seed(0))
    assert score.calls <= 1000 and score.calls % 2 == 1 and torch.isfinite(x).all()  # 2 per iteration + denoise


def test_adaptive_sde_steps_land_on_t_end():
    """Batch-wise steps: the callback's times fall from T to exactly t_end, with steps of varying length."""
    sde = VE()
    seen = []
    sample(sde, ring().score_fn(sde), (16, 2), method="adaptive_sde", nfe=2000, t_end=0.01, denoise=False,
           generator=torch.Generator().manual_seed(0), dtype=F64, callback=lambda i, t, x: seen.append(float(t)))
    assert seen[0] == sde.T and seen[-1] == 0.01
    steps = -np.diff(seen)
    assert (steps >= 0).all() and len(set(steps[steps > 0].round(12))) > 3


def test_adaptive_sde_rejects_bad_input():
    sde, score, x = VP(), ring().score_fn(VP()), torch.zeros(4, 2)
    for kw, match in [({"rtol": 0.0}, "rtol"), ({"atol": -1.0}, "atol"), ({"h_init": 2.0}, "h_init"),
                      ({"safety": 0.0}, "safety"), ({"noise": "pink"}, "noise"), ({"t_end": 1.5}, "t_end")]:
        with pytest.raises(ValueError, match=match):
            adaptive_sde(sde, score, x, **kw)
    with pytest.raises(ArithmeticError, match="not finite"):
        adaptive_sde(sde, lambda x, t: x * math.nan, x)


def test_sa3_rejects_bad_input():
    sde, score = VP(), ring().score_fn(VP())
    for kw, match in [({"tau": -0.5}, "tau"), ({"tau_band": (1.0, 0.5)}, "tau_band"), ({"noise": "pink"}, "noise")]:
        with pytest.raises(ValueError, match=match):
            sample(sde, score, (4, 2), method="sa3", nfe=6, **kw)
