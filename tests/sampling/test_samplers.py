"""Tests of scoresde.samplers against closed forms, a tight dopri5 reference and exact densities."""
import math
from functools import partial

import numpy as np
import pytest
import torch
from scipy import integrate

from scoresde.core.sde import OU, VE, VEEDM, VP, ContractiveOU, ContractiveVP, Langevin, SubVP
from scoresde.core.targets import GaussianMixture, ring
from scoresde.sampling import (
    METHODS,
    ddim,
    dopri5,
    dpm_solver_multistep,
    end_time_for_steps,
    euler_maruyama,
    exponential_integrator,
    fit_grid,
    heun,
    ode_euler,
    predictor_corrector,
    sample,
    time_grid,
)
from scoresde.sampling.ode import exp_adams_weights, ipndm
from scoresde.core.gaussian import ei_coefficients

LINEAR_SDES = [VP(), SubVP(), VE(), VEEDM(), OU(), ContractiveOU(), ContractiveVP()]
F64 = torch.float64


def counted(score_fn):
    def wrapped(x, t):
        wrapped.calls += 1
        assert t.shape == (x.shape[0],)
        return score_fn(x, t)

    wrapped.calls = 0
    return wrapped


def gaussian_1d(mean=0.5, var=0.04):
    return GaussianMixture(torch.ones(1), torch.tensor([[mean]]), torch.tensor([[[var]]]))


def log_density_gap(target, x, gen, n_ref=20000):
    """E_gen log p - E_true log p, and a 4-sigma tolerance from both Monte Carlo errors."""
    lp, lp_ref = target.log_prob(x), target.log_prob(target.sample(n_ref, gen))
    gap = lp.mean() - lp_ref.mean()
    se = math.sqrt(lp.var() / len(lp) + lp_ref.var() / len(lp_ref))
    return gap.item(), 4 * se


# ---- grids --------------------------------------------------------------------------------

@pytest.mark.parametrize("sde", LINEAR_SDES, ids=lambda s: type(s).__name__)
def test_grids_are_uniform_in_their_variable(sde):
    n, t_end = 12, 2 * sde.t_min
    checks = {
        "uniform": lambda t: t,
        "logsnr": lambda t: sde.log_snr(t),
        "edm": lambda t: torch.exp(-sde.log_snr(t) / 5.0),
        "poly": lambda t: t ** (1 / 3),
    }
    for kind, variable in checks.items():
        ts = time_grid(sde, n, kind, t_end=t_end, rho=5.0, power=3.0)
        assert ts[0] == sde.T and ts[-1] == t_end and len(ts) == n + 1
        assert (ts[1:] < ts[:-1]).all()
        v = variable(ts)
        torch.testing.assert_close(v[1:] - v[:-1], (v[1:] - v[:-1]).mean().expand(n), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sde", [VP(), VE(), VEEDM(), ContractiveVP()], ids=lambda s: type(s).__name__)
def test_end_time_for_steps_hits_its_noise_level(sde):
    for n in (2, 4, 9, 19, 100):
        t = torch.tensor(end_time_for_steps(sde, n), dtype=F64)
        ratio = float(sde.sigma(t) / sde.alpha(t))
        assert t.item() == sde.t_min or ratio == pytest.approx(max(0.4 / n, 0.045), rel=1e-9), (n, t, ratio)
        t = torch.tensor(end_time_for_steps(sde, n, min_ratio=0.0), dtype=F64)  # no floor (sa3's plain denoise)
        ratio = float(sde.sigma(t) / sde.alpha(t))
        assert t.item() == sde.t_min or ratio == pytest.approx(0.4 / n, rel=1e-9), (n, t, ratio)
    assert end_time_for_steps(sde, 10**6, min_ratio=0.0) == sde.t_min  # never below t_min
    with pytest.raises(ValueError, match="n_steps"):
        end_time_for_steps(sde, 0)
    with pytest.raises(ValueError, match="min_ratio"):
        end_time_for_steps(sde, 5, min_ratio=-0.1)


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="kind"):
        time_grid(VP(), 5, "cosine")
    with pytest.raises(ValueError, match="t_end"):
        time_grid(VP(), 5, t_end=2.0)
    with pytest.raises(ValueError, match="n_steps"):
        time_grid(VP(), 0)


# ---- the exponential integrator's coefficients and exactness ------------------------------

def test_ei_coefficients_closed_form_vp():
    sde, t, tn = VP(), torch.tensor(0.7, dtype=F64), torch.tensor(0.4, dtype=F64)
    dB = sde.B(t) - sde.B(tn)
    phi, c, v = ei_coefficients(sde, t, tn)
    torch.testing.assert_close(phi, torch.exp(dB / 2))
    torch.testing.assert_close(c, 2 * torch.expm1(dB / 2))
    torch.testing.assert_close(v, torch.expm1(dB))


@pytest.mark.parametrize("sde", LINEAR_SDES, ids=lambda s: type(s).__name__)
def test_ei_coefficients_against_quadrature(sde):
    t, tn = 0.6 * sde.T, 0.25 * sde.T
    a = lambda u: float(sde.alpha(torch.tensor(u, dtype=F64)))
    g2 = lambda u: float(sde.diffusion(torch.tensor(u, dtype=F64))) ** 2
    c_ref = a(tn) * integrate.quad(lambda u: g2(u) / a(u), tn, t, epsabs=0, epsrel=1e-12)[0]
    v_ref = integrate.quad(lambda u: (a(tn) / a(u)) ** 2 * g2(u), tn, t, epsabs=0, epsrel=1e-12)[0]
    phi, c, v = ei_coefficients(sde, torch.tensor(t, dtype=F64), torch.tensor(tn, dtype=F64))
    assert phi.item() == pytest.approx(a(tn) / a(t), rel=1e-12)
    assert c.item() == pytest.approx(c_ref, rel=1e-9)
    assert v.item() == pytest.approx(v_ref, rel=1e-9)


@pytest.mark.parametrize("lam_from, lam_to, nodes", [
    (-1.0, -0.3, [-1.0]), (0.2, 1.5, [0.2, -0.4]), (2.0, 2.05, [2.0, 1.9, 1.7]), (-3.0, 1.0, [-3.0, -5.0, -6.0]),
    (0.5, 1.2, [1.2, 0.5]), (0.5, 1.2, [1.2, 0.5, 0.1, -0.6]), (1.0, 1.001, [1.001, 1.0, 0.999]),
], ids=["ddim", "ab2", "ab3-small-h", "ab3-large-h", "am2", "am4", "am3-tiny-h"])
def test_exp_adams_weights_against_quadrature(lam_from, lam_to, nodes):
    """w_j = alpha' int e^{u - lam_to} L_j(u) du over [lam_from, lam_to], L_j the Lagrange basis of the nodes
    (scipy quad); with an exactly polynomial x0_hat the step is exact."""
    a_next = 0.7
    w = exp_adams_weights(a_next, lam_from, lam_to, nodes)

    def basis(j, u):
        return math.prod((u - nodes[m]) / (nodes[j] - nodes[m]) for m in range(len(nodes)) if m != j)

    ref = [a_next * integrate.quad(lambda u: math.exp(u - lam_to) * basis(j, u), lam_from, lam_to,
                                   epsabs=0, epsrel=1e-13)[0] for j in range(len(nodes))]
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-15)
    if len(nodes) == 1:  # DDIM: alpha' (1 - e^{-h})
        assert w[0] == pytest.approx(a_next * -math.expm1(lam_from - lam_to), rel=1e-14)


@pytest.mark.parametrize("sde", [VP(), ContractiveOU(), SubVP()], ids=lambda s: type(s).__name__)
def test_exponential_integrator_exact_for_the_linear_part(sde, gen):
    """With an x-independent score s0 the reverse SDE is linear with constant forcing; the exponential
    integrator then reproduces its exact law with any number of steps, Euler-Maruyama does not."""
    n, s0 = 40000, torch.tensor([[0.3]], dtype=F64)
    score_fn = lambda x, t: s0.expand_as(x)
    x_T = torch.full((n, 1), 0.8, dtype=F64)
    T, t_end = torch.tensor(sde.T, dtype=F64), torch.tensor(0.2 * sde.T, dtype=F64)
    phi, c, v = ei_coefficients(sde, T, t_end)  # one-step coefficients, checked against quadrature above
    mean, std = phi * 0.8 + c * 0.3, v.sqrt()
    for steps in (1, 3, 8):
        ts = time_grid(sde, steps, "uniform", t_end=float(t_end))
        x = exponential_integrator(sde, score_fn, x_T, ts, generator=gen, denoise=False)
        assert abs(x.mean() - mean) < 4 * std / math.sqrt(n)
        assert abs(x.std() / std - 1) < 4 / math.sqrt(2 * n)
    x_em = euler_maruyama(sde, score_fn, x_T, time_grid(sde, 3, "uniform", t_end=float(t_end)), generator=gen,
                          denoise=True)
    x_em = x_em * sde.alpha(t_end) - sde.sigma(t_end) ** 2 * 0.3  # undo the final Tweedie step
    assert abs(x_em.mean() - mean) > 10 * std / math.sqrt(n) or abs(x_em.std() / std - 1) > 10 / math.sqrt(2 * n)


# ---- the NFE budget and the entry point ---------------------------------------------------

BUDGETS = {"em": 7, "ei": 7, "pc": 9, "ald": 9, "euler": 7, "heun": 7, "dpm1": 7, "dpm2m": 7, "dpm3m": 7,
           "dpm2m_sde": 7, "dpm3m_sde": 7, "edm_sde": 7,
           "ddim": 7, "ddpm": 7, "unipc2": 7, "unipc3": 7, "sa3": 7, "ipndm": 7}


@pytest.mark.parametrize("method", sorted(BUDGETS))
@pytest.mark.parametrize("sde", [VP(), VE(), ContractiveVP()], ids=lambda s: type(s).__name__)
def test_nfe_spent_equals_budget(method, sde, gen):
    """On the fixed grid (the automatic schedule's, and its search's evaluations: test_schedule.py)."""
    score = counted(ring().score_fn(sde))
    for nfe in (BUDGETS[method], BUDGETS[method] + 2):
        score.calls = 0
        x = sample(sde, score, (64, 2), method=method, nfe=nfe, generator=gen, dtype=F64, schedule="default")
        assert score.calls == nfe and x.shape == (64, 2) and torch.isfinite(x).all()
    score.calls = 0
    sample(sde, score, (64, 2), method=method, nfe=BUDGETS[method] - 1, denoise=False, generator=gen)
    assert score.calls == BUDGETS[method] - 1


def test_all_methods_are_tested():
    """Every registered method is in BUDGETS, dopri5 (adaptive, tested above), adaptive_sde (adaptive,
    test_sa_solver_adaptive_sde.py) or consistency (test_consistency.py)."""
    assert set(METHODS) == set(BUDGETS) | {"dopri5", "adaptive_sde", "consistency"}


def test_impossible_budgets_raise(gen):
    score = ring().score_fn(VP())
    with pytest.raises(ValueError, match="nfe=8 does not fit method 'heun'"):
        sample(VP(), score, (4, 2), method="heun", nfe=8, denoise=True)
    with pytest.raises(ValueError, match="multiple of 3"):
        sample(VP(), score, (4, 2), method="pc", nfe=8, corrector_steps=2)
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        sample(VP(), score, (4, 2), method="em", nfe=0)
    with pytest.raises(ValueError, match="nfe=1 does not fit"):
        sample(VP(), score, (4, 2), method="em", nfe=1)  # the denoise step alone
    with pytest.raises(ValueError, match="denoise must be true or false, got 'yes'"):
        sample(VP(), score, (4, 2), method="em", nfe=5, denoise="yes")  # not read as True
    with pytest.raises(ValueError, match="valid: adaptive_sde, ald, consistency, ddim, ddpm, dopri5"):
        sample(VP(), score, (4, 2), method="rk4", nfe=10)
    with pytest.raises(ValueError, match="shape"):
        sample(VP(), score, (4, 2), method="em", nfe=10, x_T=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="eta"):
        sample(VP(), score, (4, 2), method="ddim", nfe=10, eta=1.5)
    with pytest.raises(ValueError, match="order"):
        dpm_solver_multistep(VP(), score, torch.zeros(4, 2), time_grid(VP(), 4), order=4)
    with pytest.raises(ValueError, match="decreasing"):
        ode_euler(VP(), score, torch.zeros(4, 2), torch.tensor([0.1, 0.5]))


def test_heun_default_denoise_follows_parity(gen):
    for nfe in (8, 9):
        score = counted(ring().score_fn(VP()))
        sample(VP(), score, (8, 2), method="heun", nfe=nfe, generator=gen)
        assert score.calls == nfe


def test_dopri5_budget_is_a_cap(gen):
    sde, score = VP(), counted(ring().score_fn(VP()))
    x = sample(sde, score, (32, 2), method="dopri5", nfe=400, generator=gen, dtype=F64)
    assert 10 < score.calls <= 400 and torch.isfinite(x).all()
    with pytest.raises(RuntimeError, match="more than nfe=20"):
        sample(sde, score, (32, 2), method="dopri5", nfe=20, generator=gen, dtype=F64, rtol=1e-8, atol=1e-8)


def test_callback_sees_every_step(gen):
    seen = []
    sample(VP(), ring().score_fn(VP()), (8, 2), method="dpm2m", nfe=6, generator=gen,
           callback=lambda i, t, x: seen.append((i, float(t), x.shape)))
    assert [s[0] for s in seen] == list(range(7))
    assert seen[0][1] == VP().T and seen[-2][1] == pytest.approx(VP().t_min) and seen[-1][1] == 0.0


@pytest.mark.parametrize("sde", [VP(), VE()], ids=lambda s: type(s).__name__)
def test_unipc_default_grid_is_cubic_to_the_step_dependent_end(sde, gen):
    """unipc2 at nfe 10 without the automatic schedule: 9 steps on the cubic-in-t grid from T to
    end_time_for_steps(sde, 9), then the extrapolated denoise; an explicit t_end or grid overrides the defaults."""
    seen = []
    sample(sde, ring().score_fn(sde), (8, 2), method="unipc2", nfe=10, generator=gen, dtype=F64, schedule="default",
           callback=lambda i, t, x: seen.append(float(t)))
    expected = time_grid(sde, 9, "poly", t_end=end_time_for_steps(sde, 9), power=3.0).tolist() + [0.0]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    seen.clear()
    sample(sde, ring().score_fn(sde), (8, 2), method="unipc2", nfe=10, generator=gen, dtype=F64, t_end=0.05,
           grid="uniform", callback=lambda i, t, x: seen.append(float(t)))
    np.testing.assert_allclose(seen[:-1], time_grid(sde, 9, "uniform", t_end=0.05).tolist(), rtol=1e-12)


@pytest.mark.parametrize("method", sorted(BUDGETS))
def test_image_shapes_and_dtypes(method, gen):
    """(batch, C, H, W) inputs through every method on its fixed grid, in float32 and float64 (the automatic
    schedule's: test_schedule.py)."""
    sde, mix = VP(), GaussianMixture(torch.ones(2), torch.stack([torch.ones(4), -torch.ones(4)]),
                                     0.1 * torch.eye(4).expand(2, 4, 4))
    score = lambda x, t: mix.score_fn(sde)(x.flatten(1), t).view_as(x)
    for dtype in (torch.float32, F64):
        x_T = sde.prior_sample((6, 1, 2, 2), gen, dtype)
        x = sample(sde, score, (6, 1, 2, 2), method=method, nfe=BUDGETS[method] + 2, x_T=x_T, generator=gen,
                   schedule="default")
        assert x.shape == (6, 1, 2, 2) and x.dtype == dtype and torch.isfinite(x).all()


@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].linear])
def test_generic_samplers_run_the_nonlinear_langevin_sde(method):
    """Langevin with V = |x|^2 / 2 is OU: the generic-drift path (no Tweedie step by default) must give
    OU's result from the same x_T and noise, for every method not declared `linear`."""
    assert set(METHODS) - {m for m in METHODS if METHODS[m].linear} == {"em", "pc", "euler", "heun", "dopri5",
                                                                         "adaptive_sde"}
    lang = Langevin(potential=lambda x: 0.5 * x.pow(2).sum(1), T=OU().T, t_min=OU().t_min)
    score = ring().score_fn(OU())
    x_T = OU().prior_sample((50, 2), torch.Generator().manual_seed(2), F64)
    nfe = 2000 if METHODS[method].adaptive else 8
    runs = [sample(sde, score, None, method=method, nfe=nfe, x_T=x_T, generator=torch.Generator().manual_seed(5),
                   grid="uniform", denoise=False) for sde in (OU(), lang)]
    torch.testing.assert_close(runs[0], runs[1])
    sample(lang, score, None, method=method, nfe=nfe, x_T=x_T, grid="uniform")  # default: no denoise
    with pytest.raises(ValueError, match="linear SDE"):
        sample(lang, score, None, method="em", nfe=8, x_T=x_T, denoise=True)
    with pytest.raises(ValueError, match="linear SDE"):  # the multistep solvers need (alpha, sigma)
        sample(lang, score, None, method="unipc2", nfe=8, x_T=x_T, denoise=False)


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].linear])
def test_methods_declared_linear_refuse_a_nonlinear_sde(method):
    lang = Langevin(potential=lambda x: 0.5 * x.pow(2).sum(1), T=OU().T, t_min=OU().t_min)
    with pytest.raises(ValueError, match=f"linear SDE .*method '{method}'"):
        sample(lang, ring().score_fn(OU()), None, method=method, nfe=9, x_T=torch.zeros(4, 2), denoise=False)


def test_declared_noise_rule_of_ddim_follows_eta():
    """ddim is deterministic exactly at eta = 0 (its declared rule): other generators give the same output
    there and different outputs at eta = 0.5; em always draws noise, heun never."""
    sde, score = VP(), ring().score_fn(VP())
    x_T = sde.prior_sample((64, 2), torch.Generator().manual_seed(0), F64)

    def two_draws(method, **kw):
        return [sample(sde, score, None, method=method, nfe=7, x_T=x_T, generator=torch.Generator().manual_seed(s),
                       **kw) for s in (1, 2)]

    for method, kw in (("ddim", {}), ("ddim", {"eta": 0.5}), ("em", {}), ("heun", {})):
        a, b = two_draws(method, **kw)
        assert METHODS[method].stochastic(kw) == (not torch.equal(a, b)), (method, kw)


def test_consistency_method_needs_no_denoise_flag():
    """sample(method="consistency", nfe=k) takes k consistency steps without denoise=False (the method's declared
    default); for Gaussian data N(0, s0^2) under VP the exact consistency function is the flow map
    f(x, t) = x sqrt(alpha_min^2 s0^2 + sigma_min^2) / sqrt(alpha_t^2 s0^2 + sigma_t^2), so one step is that
    map at T."""
    sde, s0 = VP(), 0.7
    sd = lambda t: torch.sqrt(sde.alpha(t) ** 2 * s0**2 + sde.sigma(t) ** 2)
    t_min = torch.tensor(sde.t_min, dtype=F64)
    f = counted(lambda x, t: x * (sd(t_min) / sd(t))[:, None])
    x_T = sde.prior_sample((16, 2), torch.Generator().manual_seed(0), F64)
    x = sample(sde, f, None, method="consistency", nfe=1, x_T=x_T)
    torch.testing.assert_close(x, x_T * sd(t_min) / sd(torch.tensor(sde.T, dtype=F64)))
    f.calls = 0
    sample(sde, f, (16, 2), method="consistency", nfe=3, generator=torch.Generator().manual_seed(1))
    assert f.calls == 3
    with pytest.raises(ValueError, match="no final denoising step"):
        sample(sde, f, (16, 2), method="consistency", nfe=3, denoise=True)


def _step_noise_variance(sde, ts, **kw):
    """c^2 of one ddpm step t -> t' from x = 0 with a zero score: the output is c z with z the step's draw."""
    x = sample(sde, lambda x, t: torch.zeros_like(x), None, method="ddpm", nfe=1, x_T=torch.zeros(8, 1, dtype=F64),
               ts=ts, denoise=False, generator=torch.Generator().manual_seed(3), **kw)
    z = torch.randn(8, 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    return float((x / z).pow(2).mean())


def test_ddpm_variances_are_ho_et_al_fixed_small_and_fixed_large():
    """The sampler "ddpm" on a respaced VP grid whose alpha^2 are diffusers' alphas_cumprod: variance "posterior"
    (the default) is diffusers' "fixed_small" beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, "beta" is
    "fixed_large" beta_t = 1 - abar_t / abar_{t-1}, and beta-tilde < beta (Ho et al. sec. 3.2)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(10)
    sde = VP()
    abar = sched.alphas_cumprod.double()
    steps = sched.timesteps.tolist()
    for t, t_prev in zip(steps[:-1], steps[1:]):
        ts = sde.inverse_log_snr(0.5 * torch.log(abar[[t, t_prev]] / (1 - abar[[t, t_prev]])))
        small = float(sched._get_variance(t, variance_type="fixed_small"))
        large = float(sched._get_variance(t, variance_type="fixed_large"))
        posterior, beta = _step_noise_variance(sde, ts), _step_noise_variance(sde, ts, variance="beta")
        assert posterior == pytest.approx(small, rel=1e-4) and beta == pytest.approx(large, rel=1e-4), t
        assert posterior < beta
    with pytest.raises(ValueError, match="variance must be one of posterior, beta"):
        _step_noise_variance(sde, ts, variance="large")


# ---- deterministic solvers: order against a tight dopri5 reference ------------------------

def _ode_errors(solver, sde, steps, t_end, kind, x_T, ref):
    return [(solver(sde, ring().score_fn(sde), x_T, time_grid(sde, n, kind, t_end=t_end, dtype=F64),
                    denoise=False) - ref).norm(dim=1).mean().item() for n in steps]


@pytest.fixture(scope="module")
def vp_reference():
    sde, t_end = VP(), 0.05
    x_T = sde.prior_sample((200, 2), torch.Generator().manual_seed(7), F64)
    ref = dopri5(sde, ring().score_fn(sde), x_T, t_end=t_end, rtol=1e-11, atol=1e-11, denoise=False)
    return sde, t_end, x_T, ref


@pytest.mark.parametrize("solver, kind, order", [
    (ode_euler, "logsnr", 1), (heun, "logsnr", 2), (ddim, "logsnr", 1),
    (lambda *a, **k: dpm_solver_multistep(*a, order=2, **k), "logsnr", 2),
    (lambda *a, **k: dpm_solver_multistep(*a, order=3, lower_order_final=False, **k), "logsnr", 3),
    (lambda *a, **k: dpm_solver_multistep(*a, order=1, corrector=True, **k), "logsnr", 2),
    (lambda *a, **k: dpm_solver_multistep(*a, order=2, lower_order_final=False, corrector=True, **k), "logsnr", 3),
    (lambda *a, **k: dpm_solver_multistep(*a, order=3, lower_order_final=False, corrector=True, **k), "logsnr", 4),
    (lambda *a, **k: ipndm(*a, order=1, **k), "logsnr", 1),
    (lambda *a, **k: ipndm(*a, order=3, **k), "logsnr", 2),
], ids=["euler", "heun", "ddim", "dpm2m", "dpm3m", "dpm1+corrector", "dpm2m+corrector", "dpm3m+corrector",
        "ipndm1", "ipndm3"])
def test_observed_order_of_ode_solvers(solver, kind, order, vp_reference):
    """The UniC-style corrector raises each multistep solver's order by one at no extra NFE (the last step,
    which no evaluation follows, is not corrected: a lower-order final step would cap the order). iPNDM's
    order-3 steps converge at order 2: its first step is Euler's (local error h^2, once), and its equal-step
    coefficients on steps of unequal length in sigma / alpha leave an error of O(h^3) at every step."""
    sde, t_end, x_T, ref = vp_reference
    steps = {4: [64, 128, 256], 3: [32, 64, 128]}.get(order, [16, 32, 64])
    err = _ode_errors(solver, sde, steps, t_end, kind, x_T, ref)
    rates = np.log2(np.array(err[:-1]) / np.array(err[1:]))
    assert err[-1] < err[0]
    assert order - 0.35 < rates[-1] < order + 0.6, (err, rates)


@pytest.mark.parametrize("solver", [partial(dpm_solver_multistep, order=3), ipndm], ids=["dpm3m", "ipndm"])
@pytest.mark.parametrize("sde", LINEAR_SDES, ids=lambda s: type(s).__name__)
def test_multistep_solves_the_flow_of_every_linear_sde(sde, solver):
    """DPM-Solver++(3M) and iPNDM, written only in (alpha, sigma), converge to the probability-flow
    solution for VE, contractive and OU SDEs alike."""
    x_T = sde.prior_sample((100, 2), torch.Generator().manual_seed(3), F64)
    score = ring().score_fn(sde)
    ref = dopri5(sde, score, x_T, rtol=1e-10, atol=1e-10, denoise=False)
    scale = ref.norm(dim=1).mean()
    errs = [(solver(sde, score, x_T, time_grid(sde, n, "logsnr", dtype=F64), denoise=False) - ref).norm(dim=1).mean()
            / scale for n in (10, 40)]
    assert errs[1] < 5e-3 and errs[1] < errs[0] / 8, errs


@pytest.mark.parametrize("sde", [VP(), VE(), ContractiveVP()], ids=lambda s: type(s).__name__)
def test_ipndm_is_exact_where_the_data_are_a_point(sde):
    """For data N(m, v) the flow maps y = x / alpha to m + (y - m) sqrt((v + rho'^2) / (v + rho^2)), rho = sigma /
    alpha (closed form). As v -> 0 the noise prediction (y - m) / rho is constant along it, so three Adams-Bashforth
    steps are exact (relative to the distance travelled); at v = 0.04 their error is 1e3 times larger."""
    x_T = sde.prior_sample((100, 1), torch.Generator().manual_seed(1), F64)
    ts = time_grid(sde, 3, "uniform", dtype=F64)
    rho = sde.sigma(ts[[0, -1]]) / sde.alpha(ts[[0, -1]])
    errors = []
    for v in (1e-10, 0.04):
        data = GaussianMixture(torch.ones(1, dtype=F64), torch.tensor([[0.5]], dtype=F64),
                               torch.tensor([[[v]]], dtype=F64))
        x = ipndm(sde, data.score_fn(sde), x_T, ts, denoise=False)
        flow = sde.alpha(ts[-1]) * (0.5 + (x_T / sde.alpha(ts[0]) - 0.5) * torch.sqrt((v + rho[1]**2) / (v + rho[0]**2)))
        errors.append(float((x - flow).abs().max() / (x_T - flow).abs().max()))
    assert errors[0] < 1e-7 and errors[0] < 1e-3 * errors[1], errors


def test_ipndm_refuses_an_order_it_has_no_coefficients_for():
    sde = VP()
    for order in (0, 5, 2.5):
        with pytest.raises(ValueError, match=f"order must be 1, 2, 3 or 4, got {order}"):
            sample(sde, ring().score_fn(sde), (8, 2), method="ipndm", nfe=5, schedule="default", order=order)


@pytest.mark.parametrize("method", ["ipndm", "unipc2", "dpm3m"])
def test_analytic_first_step_is_the_score_where_p_T_is_the_prior(method):
    """Data N(m, I) under VP: p_T = N(alpha_T m, I) and the prior is N(0, I). With m = 0 they are equal, so the
    analytical first step (the prior's score at T) is the exact score: on the same grid the output equals that of
    the evaluated first step, the score is never asked at T and nfe buys that one step more. With m = 3 the
    two differ by about the first step's error alpha_T m / sigma_T in the noise prediction (0.019), carried
    through the flow."""
    sde, ts = VP(), time_grid(VP(), 5, "uniform", dtype=F64)
    x_T = sde.prior_sample((64, 2), torch.Generator().manual_seed(0), F64)
    for m, same in ((0.0, True), (3.0, False)):
        data = GaussianMixture(torch.ones(1, dtype=F64), torch.full((1, 2), m, dtype=F64),
                               torch.eye(2, dtype=F64)[None])
        times = []

        def score(x, t, exact=data.score_fn(sde)):
            times.append(float(t[0]))
            return exact(x, t)

        x = sample(sde, score, None, method=method, nfe=5, x_T=x_T, ts=ts, analytic_first=True)
        assert len(times) == 5 and max(times) < float(ts[0])
        ref = sample(sde, data.score_fn(sde), None, method=method, nfe=6, x_T=x_T, ts=ts)
        gap = float((x - ref).abs().max())
        assert gap < 1e-12 if same else gap > 1e-3, (m, gap)


def test_analytic_first_step_is_refused_unless_true_or_false_and_where_a_method_has_none():
    sde, score = VP(), ring().score_fn(VP())
    with pytest.raises(ValueError, match="analytic_first must be one of True, False, got 'yes'"):
        sample(sde, score, (8, 2), method="ipndm", nfe=5, schedule="default", analytic_first="yes")
    with pytest.raises(ValueError, match="method 'heun' takes no option 'analytic_first'"):
        sample(sde, score, (8, 2), method="heun", nfe=5, analytic_first=True)


@pytest.mark.parametrize("sde", [VP(), VE()], ids=lambda s: type(s).__name__)
def test_extrapolated_denoise_follows_the_flow_to_zero(sde):
    """For a Gaussian target the probability flow from T to 0 is the affine map
    x_0 = m + (x_T - alpha_T m) sqrt(v / (alpha_T^2 v + sigma_T^2)). Stopping at t_end with the Tweedie step
    shrinks by O(sigma^2 / alpha^2) of the end time; extrapolating the last two data predictions in
    (sigma / alpha)^2 removes that term, so its error is far smaller at no extra NFE."""
    m, v = 0.5, 0.04
    target = gaussian_1d(m, v)
    x_T = sde.prior_sample((1000, 1), torch.Generator().manual_seed(4), F64)
    a_T, s_T = sde.alpha(torch.tensor(sde.T, dtype=F64)), sde.sigma(torch.tensor(sde.T, dtype=F64))
    exact = m + (x_T - a_T * m) * torch.sqrt(v / (a_T**2 * v + s_T**2))
    t_end = float(sde.inverse_log_snr(torch.tensor(-0.5 * math.log(0.05 * v), dtype=F64)))  # (sigma/alpha)^2 = v / 20
    ts = time_grid(sde, 200, "logsnr", t_end=t_end, dtype=F64)
    err = {ex: (dpm_solver_multistep(sde, target.score_fn(sde), x_T, ts, order=3, corrector=True, extrapolate=ex)
                - exact).abs().max().item() for ex in (False, True)}
    assert err[False] > 1e-3 and err[True] < err[False] / 8, err


def test_corrector_pays_at_equal_nfe(vp_reference):
    """At 8, 12 and 16 steps on the same grid, the corrected solver lands closer to the exact flow than
    DPM-Solver++ of the same order, for the same number of score evaluations (the gain grows with the steps:
    one order more)."""
    sde, t_end, x_T, ref = vp_reference
    for order in (2, 3):
        plain, corrected = (_ode_errors(lambda *a, **k: dpm_solver_multistep(*a, order=order, corrector=c, **k),
                                        sde, [8, 12, 16], t_end, "logsnr", x_T, ref) for c in (False, True))
        assert all(b < a / 1.3 for a, b in zip(plain, corrected)), (order, plain, corrected)
        assert corrected[-1] < plain[-1] / 2, (order, plain, corrected)


@pytest.mark.parametrize("sde", [VP(), VE()], ids=lambda s: type(s).__name__)
def test_fitted_grid_beats_the_default_on_fresh_draws(sde):
    """fit_grid uses only the score model and its own probe draws; on other prior draws the fitted grid
    lands closer to the exact flow (a tight dopri5 solve, independent of the fit's own reference) than the
    method's default grid at the same NFE, and keeps every lambda step above min_fraction of the range."""
    score, t_end = ring().score_fn(sde), float(sde.inverse_log_snr(torch.tensor(1.0, dtype=F64)))
    probe = sde.prior_sample((256, 2), torch.Generator().manual_seed(11), F64)
    fit = fit_grid(sde, score, probe, method="unipc2", nfe=5, t_end=t_end, denoise=False, min_fraction=0.02)
    assert fit.error < fit.start_error / 2 and fit.evaluations > 200, fit
    assert fit.ts[0] == sde.T and fit.ts[-1] == t_end and (fit.ts[1:] < fit.ts[:-1]).all()
    lam = sde.log_snr(fit.ts)
    assert (lam.diff() >= 0.02 * (lam[-1] - lam[0]) * (1 - 1e-6)).all()
    x_T = sde.prior_sample((1000, 2), torch.Generator().manual_seed(12), F64)
    exact = dopri5(sde, score, x_T, t_end=t_end, rtol=1e-10, atol=1e-10, denoise=False)
    err = {name: (sample(sde, score, None, method="unipc2", nfe=5, x_T=x_T, denoise=False, **kw) - exact)
           .norm(dim=1).mean().item() for name, kw in (("default", {"t_end": t_end}), ("fitted", {"ts": fit.ts}))}
    assert err["fitted"] < err["default"] / 1.5, err


@pytest.mark.parametrize("sde", LINEAR_SDES, ids=lambda s: type(s).__name__)
def test_fit_grid_works_for_every_linear_sde(sde):
    """The knots live in lambda, so the fit needs only log_snr and its inverse: every linear SDE, a multistep
    and an explicit solver (ddim at eta = 0 counts as deterministic); the fit at least halves the probe error."""
    score = ring().score_fn(sde)
    probe = sde.prior_sample((128, 2), torch.Generator().manual_seed(0), F64)
    for method in ("unipc2", "heun", "ddim"):
        fit = fit_grid(sde, score, probe, method=method, nfe=7, max_iter=60)
        assert fit.error < fit.start_error / 2 and len(fit.ts) == (4 if method == "heun" else 7), (method, fit)


def test_explicit_grid_may_be_a_list_and_follows_x_T():
    sde, score = VP(), ring().score_fn(VP())
    x_T = sde.prior_sample((16, 2), torch.Generator().manual_seed(0), F64)
    ts = time_grid(sde, 6, "logsnr", t_end=0.01)
    a = sample(sde, score, None, method="unipc2", nfe=7, x_T=x_T, ts=ts.float())
    b = sample(sde, score, None, method="unipc2", nfe=7, x_T=x_T, ts=ts.tolist())
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert a.dtype == F64


def test_fit_grid_rejects_bad_input():
    sde, score = VP(), ring().score_fn(VP())
    probe = sde.prior_sample((16, 2), torch.Generator().manual_seed(0), F64)
    for kwargs, match in [({"method": "em"}, "deterministic"), ({"method": "dopri5"}, "deterministic"),
                          ({"method": "ddim", "eta": 0.5}, "draws noise"),
                          ({"method": "nope"}, "deterministic"), ({"ts": time_grid(sde, 4)}, "do not pass ts"),
                          ({"reference_steps": 4}, "reference_steps"), ({"min_fraction": 0.3}, "min_fraction"),
                          ({"nfe": 2}, "nothing to fit"), ({"nfe": 1}, "does not fit"), ({"t_end": 2.0}, "t_end")]:
        with pytest.raises(ValueError, match=match):
            fit_grid(sde, score, probe, **{"method": "unipc2", "nfe": 5, **kwargs})
    with pytest.raises(ValueError, match="x_probe"):
        fit_grid(sde, score, probe[0], method="unipc2", nfe=5)
    with pytest.raises(ValueError, match="not finite"):
        fit_grid(sde, lambda x, t: x * math.nan, probe, method="unipc2", nfe=5)
    with pytest.raises(ValueError, match="linear SDE"):
        fit_grid(Langevin(potential=lambda x: 0.5 * x.pow(2).sum(1)), score, probe, method="unipc2", nfe=5)


def test_ddim_eta0_approaches_the_flow(vp_reference):
    sde, t_end, x_T, ref = vp_reference
    err = _ode_errors(ddim, sde, [10, 40, 160], t_end, "logsnr", x_T, ref)
    assert err[2] < err[1] < err[0] and err[2] < 1e-2, err


# ---- stochastic samplers: weak order and convergence to the target -----------------------

def test_euler_maruyama_weak_order_one():
    """Second moment of the EM output against the exact p_{t_end} for a 1-D Gaussian target (VP);
    the bias halves when the steps double."""
    sde, target, t_end, n = VP(), gaussian_1d(), 0.1, 200000
    p_end = target.at_time(sde, t_end)
    exact = p_end.alpha**2 * (0.25 + 0.04) + p_end.sigma**2
    gen = torch.Generator().manual_seed(11)
    x_T = sde.prior_sample((n, 1), gen, F64)
    bias = []
    for steps in (10, 20, 40):
        x = euler_maruyama(sde, target.score_fn(sde), x_T, time_grid(sde, steps, "uniform", t_end=t_end),
                           generator=gen, denoise=False)
        bias.append((x.pow(2).mean() - exact).item())
    se = x_T.pow(2).std().item() * exact.item() / math.sqrt(n)  # Monte Carlo error of a second moment
    assert all(b > 8 * se for b in map(abs, bias)), (bias, se)
    rates = np.log2(np.abs(bias[:-1]) / np.abs(bias[1:]))
    assert 0.6 < rates[0] < 1.4 and abs(bias[2]) < abs(bias[1]), (bias, rates)


@pytest.mark.parametrize("method, options", [
    ("em", {}), ("ei", {}), ("pc", {"corrector_steps": 1}), ("ddpm", {}), ("ddim", {"eta": 0.5}),
    ("dpm2m", {}), ("heun", {}), ("unipc2", {"schedule": "default"}), ("unipc3", {"schedule": "default"}),
])
def test_converges_to_the_target(method, options, gen):
    sde, target = VP(), ring()
    gaps = []
    for nfe in (7, 151):
        x = sample(sde, target.score_fn(sde), (3000, 2), method=method, nfe=nfe, generator=gen, dtype=F64, **options)
        gaps.append(log_density_gap(target, x, gen))
    (small, _), (large, tol) = gaps
    assert abs(large) < tol + 0.02, gaps
    assert abs(large) < abs(small), gaps


def test_langevin_corrector_improves_ve(gen):
    """At 20 predictor steps on VE, two Langevin corrector steps per step (T 5.22, snr 0.16) bring the
    log-density gap closer to 0 than the predictor alone, by more than 4 standard errors."""
    sde, target, n = VE(), ring(), 20000
    x_T = sde.prior_sample((n, 2), gen, F64)
    ts = time_grid(sde, 20, "uniform")
    score = target.score_fn(sde)
    lp_p = target.log_prob(euler_maruyama(sde, score, x_T, ts, generator=gen))
    lp_pc = target.log_prob(predictor_corrector(sde, score, x_T, ts, corrector_steps=2, snr=0.16, generator=gen))
    lp_true = target.log_prob(target.sample(n, gen))
    gap_p, gap_pc = lp_p.mean() - lp_true.mean(), lp_pc.mean() - lp_true.mean()
    se = math.sqrt((lp_p.var() + lp_pc.var() + 2 * lp_true.var()) / n)
    assert gap_p < -4 * se and abs(gap_pc) < abs(gap_p) - 4 * se, (gap_p, gap_pc, se)


def test_annealed_langevin_default_step_mixes_faster_than_ncsn(gen):
    """At 10 levels x 2 steps the default step_ratio 1.0 gets far closer to the target than NCSN's 0.2."""
    sde, target = VE(), ring()
    x_T = sde.prior_sample((4000, 2), gen, F64)
    gaps = [log_density_gap(target, sample(sde, target.score_fn(sde), None, method="ald", nfe=21, steps_per_level=2,
                                           x_T=x_T, generator=gen, **kw), gen)[0] for kw in ({}, {"step_ratio": 0.2})]
    assert abs(gaps[0]) < abs(gaps[1]) / 10, gaps


@pytest.mark.slow
def test_annealed_langevin_converges(gen):
    sde, target = VE(), ring()
    x = sample(sde, target.score_fn(sde), (2000, 2), method="ald", nfe=2001, steps_per_level=20, generator=gen,
               dtype=F64)
    gap, tol = log_density_gap(target, x, gen)
    assert abs(gap) < tol + 0.05, gap


def test_sample_refuses_unknown_options_a_misshapen_score_and_names_an_exhausted_budget():
    from scoresde.core.errors import BudgetExhaustedError, ScoresdeError
    from scoresde.core.sde import VP

    with pytest.raises(ValueError, match=r"method 'em' takes no option 'eta'; its options: .*noise"):
        sample(VP(), lambda x, t: -x, (4, 2), method="em", nfe=3, eta=1.0)
    with pytest.raises(ValueError, match=r"score_fn\(x, t\) must return a tensor of the shape of x \(4, 2\), got "
                                         r"shape \(4, 1\)"):
        sample(VP(), lambda x, t: -x[:, :1], (4, 2), method="em", nfe=3)
    with pytest.raises(BudgetExhaustedError, match="nfe=5") as err:
        sample(VP(), lambda x, t: -x, (4, 2), method="adaptive_sde", nfe=5)
    assert isinstance(err.value, ScoresdeError)
