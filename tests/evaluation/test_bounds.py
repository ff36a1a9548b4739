import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from scoresde.core.gaussian import (
    backward_sde_law,
    constant_error,
    forward_law,
    random_gaussian,
    scaled_error,
    score_error_l2,
)
from scoresde.core.sde import OU, VP, ContractiveOU, ContractiveVP, SubVP
from scoresde.evaluation.bounds import kappa_t, prior_w2_bound, tv_bound, tv_bound_vp, w2_bound, w2_bound_log_concave
from scoresde.evaluation.metrics import kl_gaussian, tv, w2_gaussian

# The SDEs of study (a) and their horizon grids (benchmarks/bounds_studies.py uses the same).
GRIDS = {
    "vp": (VP(), [0.25, 0.5, 1.0]),
    "subvp": (SubVP(), [0.25, 0.5, 1.0]),
    "ou": (OU(), [0.5, 1.0, 3.0]),
    "contractive_ou": (ContractiveOU(), [0.25, 0.5, 1.0]),
    "contractive_vp": (ContractiveVP(), [0.25, 0.5, 1.0]),
}
EPS = [0.0, 0.01, 0.1, 0.5]


def _tv_gauss(m1, C1, m2, C2, n, seed):
    """MC TV(N1, N2) with samples from N1 (scoresde.metrics.tv)."""
    p = torch.distributions.MultivariateNormal(torch.from_numpy(m1), torch.from_numpy(C1))
    q = torch.distributions.MultivariateNormal(torch.from_numpy(m2), torch.from_numpy(C2))
    torch.manual_seed(seed)
    return tv(p.log_prob, q.log_prob, p.sample((n,)))


def _check_case(sde, m, C, eps, n=100_000):
    d = m.size
    u = np.ones(d) / math.sqrt(d)
    out = backward_sde_law(sde, m, C, error=constant_error(eps * u))
    pT = forward_law(sde, m, C, sde.T)
    prior = (np.zeros(d), sde.prior_std**2 * np.eye(d))
    prior_tv = _tv_gauss(*pT, *prior, n, 0)
    exact_tv = _tv_gauss(m, C, *out, n, 1)
    # high-probability comparison: bound fed the upper end of prior TV, exact TV at its lower end
    tvb = tv_bound(sde, score_error=eps, prior_tv=prior_tv.value + 4 * prior_tv.stderr)
    assert tvb.value >= exact_tv.value - 4 * exact_tv.stderr
    kappa = 1 / np.linalg.eigvalsh(C).max()
    w2b = w2_bound_log_concave(sde, kappa=kappa, score_error_sup=eps, data_mean=m,
                               data_second_moment=m @ m + np.trace(C))
    assert w2b.value >= w2_gaussian(m, C, *out) * (1 - 1e-9)
    assert prior_w2_bound(sde, m, m @ m + np.trace(C)) >= w2_gaussian(*pT, *prior) * (1 - 1e-9)
    if isinstance(sde, (VP, OU)):
        vpb = tv_bound_vp(sde, score_error=eps, data_kl=kl_gaussian(m, C, *prior))
        assert vpb.value >= exact_tv.value - 4 * exact_tv.stderr
        assert vpb.prior_term >= prior_tv.value - 4 * prior_tv.stderr
    if eps == 0.0:
        assert tvb.score_term == 0.0 and w2b.score_term == 0.0
    # an error with the same L2 size eps but linear in x: the TV bound (L2 error) still holds
    lin = scaled_error(sde, m, C, eps)
    out_lin = backward_sde_law(sde, m, C, error=lin)
    exact_lin = _tv_gauss(m, C, *out_lin, n, 2)
    tvb_lin = tv_bound(sde, score_error=lambda t: score_error_l2(sde, m, C, lin, t),
                       prior_tv=prior_tv.value + 4 * prior_tv.stderr)
    assert tvb_lin.value >= exact_lin.value - 4 * exact_lin.stderr


@pytest.mark.parametrize("name", list(GRIDS))
def test_bounds_hold_study_a_fast_subset(name):
    sde, Ts = GRIDS[name]
    m, C = random_gaussian(2, seed=0)
    for T in (Ts[0], Ts[-1]):
        for eps in EPS:
            _check_case(dataclasses.replace(sde, T=T), m, C, eps, n=50_000)


@pytest.mark.slow
@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("name", list(GRIDS))
def test_bounds_hold_study_a_all_cases(name, dim):
    sde, Ts = GRIDS[name]
    m, C = random_gaussian(dim, seed=0)
    for T in Ts:
        for eps in EPS:
            _check_case(dataclasses.replace(sde, T=T), m, C, eps)


def test_tv_bound_quadrature_against_closed_forms():
    sde = VP()
    B = 0.1 * 0.7 + 0.5 * 19.9 * 0.7**2
    r = tv_bound(sde, score_error=0.2, prior_tv=0.05, T=0.7)
    assert r.score_term == pytest.approx(0.1 * math.sqrt(B), rel=1e-9)
    assert r.value == pytest.approx(0.05 + r.score_term) and float(r) == r.value
    # E(t) = t: int_0^1 beta(t) t^2 dt = beta_min / 3 + (beta_max - beta_min) / 4
    r = tv_bound(sde, score_error=lambda t: t, prior_tv=0.0)
    assert r.score_term == pytest.approx(0.5 * math.sqrt(0.1 / 3 + 19.9 / 4), rel=1e-9)
    # a kinked error curve, E = |t - 0.3| + 1 on a 40-knot log grid interpolated as in runs.analytic_report:
    # with its knots as breakpoints the quadrature matches the exact integral of the interpolant piece by piece
    knots = np.geomspace(1e-3, 1.0, 40)
    E = lambda t: float(np.interp(np.log(t), np.log(knots), np.abs(knots - 0.3) + 1))
    pieces = [quad_exact for a, b in zip(knots[:-1], knots[1:])
              for quad_exact in [integrate.quad(lambda t: (0.1 + 19.9 * t) * E(t) ** 2, a, b, epsrel=1e-12)[0]]]
    r = tv_bound(sde, score_error=E, prior_tv=0.0, t_end=1e-3, breakpoints=knots[1:-1])
    assert r.score_term == pytest.approx(0.5 * math.sqrt(sum(pieces)), rel=1e-9)
    # T 5.3 for OU: prior sqrt(KL / 2) e^{-T}, score eps sqrt(2T) / 2
    r = tv_bound_vp(OU(T=2.0), score_error=0.1, data_kl=0.8)
    assert r.prior_term == pytest.approx(math.sqrt(0.4) * math.exp(-2.0), rel=1e-9)
    assert r.score_term == pytest.approx(0.05 * 2.0, rel=1e-9)


def test_w2_bound_quadrature_against_closed_form():
    # OU: g^2 = 2, constant L: e^{LT} W + eps 2 (e^{LT} - 1) / L
    sde, L, eps, W, T = OU(T=2.0), -0.7, 0.3, 0.4, 2.0
    r = w2_bound(sde, score_error_sup=eps, lipschitz=L, prior_w2=W)
    assert r.prior_term == pytest.approx(math.exp(L * T) * W, rel=1e-9)
    assert r.score_term == pytest.approx(eps * 2 * math.expm1(L * T) / L, rel=1e-9)
    # a callable L(u) = u: e^{int_u^T L} = e^{(T^2 - u^2) / 2}; check against scipy quad
    from scipy.integrate import quad
    r = w2_bound(sde, score_error_sup=eps, lipschitz=lambda u: u, prior_w2=W)
    expect = quad(lambda u: eps * 2 * math.exp((T**2 - u**2) / 2), 0, T, epsrel=1e-12)[0]
    assert r.score_term == pytest.approx(expect, rel=1e-8)


@pytest.mark.parametrize("sde", [VP(), SubVP(), OU(), ContractiveOU(), ContractiveVP()])
def test_kappa_t_is_exact_for_isotropic_gaussians(sde):
    kappa = 2.5
    for t in (0.1, 0.5, 0.9):
        _, Ct = forward_law(sde, np.zeros(3), np.eye(3) / kappa, t)
        np.testing.assert_allclose(np.linalg.inv(Ct), kappa_t(sde, kappa, t) * np.eye(3), rtol=1e-10)


def test_w2_log_concave_is_tight_for_isotropic_data_with_constant_error():
    """For N(0, I/kappa) and a constant error the synchronous coupling is optimal and L(u) is exact:
    the score term equals the exact W2 between the outputs with and without the error, started alike."""
    sde = VP()
    d, kappa, eps = 2, 2.0, 0.3
    m, C = np.zeros(d), np.eye(d) / kappa
    u = np.array([1.0, 0.0])
    pT = forward_law(sde, m, C, sde.T)
    shifted = backward_sde_law(sde, m, C, error=constant_error(eps * u), start=pT)
    exact = w2_gaussian(m, C, *shifted)
    r = w2_bound_log_concave(sde, kappa=kappa, score_error_sup=eps, data_mean=m, data_second_moment=d / kappa)
    assert r.score_term == pytest.approx(exact, rel=1e-6)


def test_bad_inputs_name_the_parameter():
    sde = VP()
    with pytest.raises(ValueError, match="score_error"):
        tv_bound(sde, score_error=-0.1, prior_tv=0.0)
    with pytest.raises(ValueError, match="score_error"):
        tv_bound(sde, score_error=lambda t: -1.0, prior_tv=0.0)
    with pytest.raises(ValueError, match="prior_tv"):
        tv_bound(sde, score_error=0.1, prior_tv=float("nan"))
    with pytest.raises(ValueError, match="T must be"):
        tv_bound(sde, score_error=0.1, prior_tv=0.0, T=sde.t_min)
    with pytest.raises(ValueError, match="sde must be VP or OU"):
        tv_bound_vp(SubVP(), score_error=0.1, data_kl=1.0)
    with pytest.raises(ValueError, match="data_kl"):
        tv_bound_vp(sde, score_error=0.1, data_kl=-1.0)
    with pytest.raises(ValueError, match="kappa"):
        w2_bound_log_concave(sde, kappa=float("inf"), score_error_sup=0.1, data_mean=[0.0], data_second_moment=1.0)
    with pytest.raises(ValueError, match="kappa"):
        w2_bound_log_concave(sde, kappa=-1.0, score_error_sup=0.1, data_mean=[0.0], data_second_moment=1.0)
    with pytest.raises(ValueError, match="data_second_moment"):
        w2_bound_log_concave(sde, kappa=1.0, score_error_sup=0.1, data_mean=[2.0], data_second_moment=1.0)
    with pytest.raises(ValueError, match="lipschitz"):
        w2_bound(sde, score_error_sup=0.1, lipschitz=float("nan"), prior_w2=0.0)
    with pytest.raises(ValueError, match="score_error_sup"):
        w2_bound(sde, score_error_sup=-0.1, lipschitz=0.0, prior_w2=0.0)
