import math

import numpy as np
import pytest
import torch

from scoresde.core.gaussian import (
    backward_sde_law,
    constant_error,
    euler_maruyama_law,
    exponential_integrator_law,
    forward_law,
    probability_flow_law,
    scaled_error,
    score_error_l2,
    score_error_sup,
    step_coefficients,
)
from scoresde.core.sde import OU, VP, ContractiveOU, ContractiveVP, SubVP, probability_flow_drift, reverse_drift

SDES = [VP(), SubVP(), OU(T=3.0), ContractiveOU(g=2.0, T=1.0), ContractiveVP()]
IDS = ["vp", "subvp", "ou", "cou", "cvp"]


def _data(d=3, seed=0):
    rng = np.random.default_rng(seed)
    B = rng.normal(size=(d, d))
    return rng.normal(size=d), B @ B.T / d + 0.3 * np.eye(d)


def _affine_error(d, seed=1):
    """A time-varying affine error field A(t) x + a(t)."""
    rng = np.random.default_rng(seed)
    A0, a0 = 0.1 * rng.normal(size=(d, d)), 0.2 * rng.normal(size=d)
    return lambda t: (A0 * math.cos(t), a0 * (1 + t))


def _score_fn(sde, m, C, error):
    """Torch score grad log p_t + A(t) x + a(t) for a per-sample t (all equal in these tests)."""
    def score(x, t):
        t0 = float(t.reshape(-1)[0])
        mt, Ct = forward_law(sde, m, C, t0)
        A, a = error(t0)
        P = np.linalg.inv(Ct)
        M = torch.from_numpy(A - P)
        return x @ M.T + torch.from_numpy(P @ mt + a)
    return score


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_exact_score_from_p_T_returns_the_data(sde):
    """Time reversal (T 2.7) and the probability flow (T 6.1) carry p_T back to p_0 exactly."""
    m, C = _data()
    pT = forward_law(sde, m, C, sde.T)
    for law in (backward_sde_law, probability_flow_law):
        mu, S = law(sde, m, C, start=pT)
        np.testing.assert_allclose(mu, m, atol=1e-8)
        np.testing.assert_allclose(S, C, atol=1e-8)
    mu, S = backward_sde_law(sde, m, C, start=pT, t_end=0.3 * sde.T)
    mt, Ct = forward_law(sde, m, C, 0.3 * sde.T)
    np.testing.assert_allclose(S, Ct, rtol=1e-8)


def _simulate_backward(sde, score_fn, n, d, steps, flow, gen):
    """Euler(-Maruyama) on a uniform grid from T to 0 of the backward SDE or probability flow, from the prior."""
    drift = (probability_flow_drift if flow else reverse_drift)(sde, score_fn)
    x = sde.prior_sample((n, d), generator=gen, dtype=torch.float64)
    ts = torch.linspace(sde.T, 0.0, steps + 1, dtype=torch.float64)
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = float(t - t_next)
        x = x - h * drift(t, x)
        if not flow:
            x = x + math.sqrt(h) * float(sde.diffusion(t)) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


@pytest.mark.parametrize("sde", [VP(), ContractiveVP()], ids=["vp", "cvp"])
@pytest.mark.parametrize("flow", [False, True], ids=["sde", "ode"])
def test_moment_odes_against_monte_carlo(sde, flow):
    """Moment ODEs vs a Monte Carlo Euler(-Maruyama) simulation of the same linear backward dynamics, written
    with reverse_drift / probability_flow_drift from scoresde.sde (fine steps: O(h) bias below the MC error)."""
    d, n, steps = 2, 20_000, 400
    m, C = _data(d, seed=2)
    err = _affine_error(d)
    gen = torch.Generator().manual_seed(0)
    x = _simulate_backward(sde, _score_fn(sde, m, C, err), n, d, steps, flow, gen)
    law = (probability_flow_law if flow else backward_sde_law)(sde, m, C, error=err)
    mc_mean, mc_cov = x.mean(0).numpy(), np.cov(x.numpy().T)
    se_mean = np.sqrt(np.diag(mc_cov) / n)
    assert np.all(np.abs(mc_mean - law[0]) < 4 * se_mean + 2e-3 * np.abs(law[0]).max())
    se_cov = np.sqrt((np.diag(mc_cov)[:, None] * np.diag(mc_cov)[None] + mc_cov**2) / n)
    assert np.all(np.abs(mc_cov - law[1]) < 4 * se_cov + 5e-3 * np.abs(law[1]).max())


@pytest.mark.parametrize("sde", [VP(), SubVP(), ContractiveOU(g=2.0, T=1.0)], ids=["vp", "subvp", "cou"])
@pytest.mark.parametrize("flow", [False, True], ids=["sde", "ode"])
def test_euler_maruyama_recursion_against_monte_carlo(sde, flow):
    """The exact EM recursion equals the mean and covariance of simulated EM paths with the same N steps."""
    d, n, steps = 2, 40_000, 8
    m, C = _data(d, seed=3)
    err = _affine_error(d)
    gen = torch.Generator().manual_seed(1)
    x = _simulate_backward(sde, _score_fn(sde, m, C, err), n, d, steps, flow, gen)
    mu, S = euler_maruyama_law(sde, m, C, steps, error=err, probability_flow=flow)
    mc_mean, mc_cov = x.mean(0).numpy(), np.cov(x.numpy().T)
    assert np.all(np.abs(mc_mean - mu) < 4 * np.sqrt(np.diag(mc_cov) / n))
    se_cov = np.sqrt((np.diag(mc_cov)[:, None] * np.diag(mc_cov)[None] + mc_cov**2) / n)
    assert np.all(np.abs(mc_cov - S) < 4 * se_cov)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("flow", [False, True], ids=["sde", "ode"])
def test_exponential_integrator_is_exact_for_a_time_constant_score(sde, flow):
    """With s(t, x) = v (an error field cancelling the true score) the frozen-score scheme makes no error,
    so any number of steps reproduces the moment ODE: checks the linear, score and noise coefficients."""
    m, C = _data(2, seed=4)
    v = np.array([0.4, -0.3])

    def cancel(t):
        mt, Ct = forward_law(sde, m, C, t)
        P = np.linalg.inv(Ct)
        return P, v - P @ mt

    exact = (probability_flow_law if flow else backward_sde_law)(sde, m, C, error=cancel, t_end=0.05)
    for n_steps in (1, 3):
        mu, S = exponential_integrator_law(sde, m, C, n_steps, error=cancel, t_end=0.05, probability_flow=flow)
        np.testing.assert_allclose(mu, exact[0], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(S, exact[1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("scheme", [euler_maruyama_law, exponential_integrator_law], ids=["em", "ei"])
def test_discretisations_converge_at_order_one(scheme):
    sde = VP()
    m, C = _data(2, seed=5)
    pT = forward_law(sde, m, C, sde.T)
    errs = []
    for n in (200, 400, 800):
        mu, S = scheme(sde, m, C, n, start=pT, t_end=1e-3)
        errs.append(np.abs(S - forward_law(sde, m, C, 1e-3)[1]).max())
    assert 1.8 < errs[0] / errs[1] < 2.2 and 1.8 < errs[1] / errs[2] < 2.2


def test_score_errors_against_monte_carlo(gen):
    sde = VP()
    m, C = _data(3, seed=6)
    err = _affine_error(3)
    t = 0.4
    mt, Ct = forward_law(sde, m, C, t)
    x = np.random.default_rng(0).multivariate_normal(mt, Ct, size=200_000)
    A, a = err(t)
    sq = ((x @ A.T + a) ** 2).sum(1)
    assert score_error_l2(sde, m, C, err, t) ** 2 == pytest.approx(sq.mean(), abs=4 * sq.std() / math.sqrt(sq.size))
    assert score_error_l2(sde, m, C, scaled_error(sde, m, C, 0.1), t) == pytest.approx(0.1, rel=1e-12)
    assert score_error_sup(constant_error([0.3, 0.4, 0.0]), t) == pytest.approx(0.5)
    assert score_error_sup(err, t) == math.inf


def test_bad_inputs():
    m, C = _data(2)
    with pytest.raises(ValueError, match="t_end"):
        backward_sde_law(VP(), m, C, t_end=1.5)
    with pytest.raises(ValueError, match="n_steps"):
        euler_maruyama_law(VP(), m, C, 0)
    with pytest.raises(ValueError, match="positive definite"):
        forward_law(VP(), m, -C, 0.5)
    with pytest.raises(ValueError, match="cov"):
        forward_law(VP(), m, np.eye(3), 0.5)


@pytest.mark.parametrize("sde", [VP(), ContractiveVP()], ids=["vp", "cvp"])
def test_exponential_integrator_recursion_against_the_samplers_module(sde):
    """Peer check: scoresde.samplers.exponential_integrator (its own coefficients) simulated with the same
    affine score has the mean and covariance of the exact recursion."""
    from scoresde.sampling import exponential_integrator
    d, n, steps = 2, 40_000, 6
    m, C = _data(d, seed=7)
    err = _affine_error(d)
    gen = torch.Generator().manual_seed(2)
    x_T = sde.prior_sample((n, d), generator=gen, dtype=torch.float64)
    ts = torch.linspace(sde.T, 0.0, steps + 1, dtype=torch.float64)
    x = exponential_integrator(sde, _score_fn(sde, m, C, err), x_T, ts, generator=gen, denoise=False)
    mu, S = exponential_integrator_law(sde, m, C, steps, error=err)
    mc_mean, mc_cov = x.mean(0).numpy(), np.cov(x.numpy().T)
    assert np.all(np.abs(mc_mean - mu) < 4 * np.sqrt(np.diag(mc_cov) / n))
    se_cov = np.sqrt((np.diag(mc_cov)[:, None] * np.diag(mc_cov)[None] + mc_cov**2) / n)
    assert np.all(np.abs(mc_cov - S) < 4 * se_cov)


def test_step_coefficients_vp_closed_form():
    """VP (b = beta / 2, g^2 = beta, D = int_{t'}^{t} beta): the exponential integrator's step is
    Y' = e^{D/2} Y + 2 (e^{D/2} - 1) s + sqrt(e^D - 1) Z; Euler-Maruyama's 1 + h beta / 2, h beta, h beta."""
    sde = VP()
    ts = np.array([1.0, 0.7, 0.3, 0.05, 1e-3])
    hi, lo = ts[:-1], ts[1:]
    D = sde.beta_min * (hi - lo) + 0.5 * (sde.beta_max - sde.beta_min) * (hi**2 - lo**2)
    lin, score_w, noise = step_coefficients(sde, ts, exponential=True)
    np.testing.assert_allclose(lin, np.exp(D / 2), rtol=1e-13)
    np.testing.assert_allclose(score_w, 2 * np.expm1(D / 2), rtol=1e-13)
    np.testing.assert_allclose(noise, np.expm1(D), rtol=1e-13)
    lin, score_w, noise = step_coefficients(sde, ts, exponential=True, probability_flow=True)
    np.testing.assert_allclose(score_w, np.expm1(D / 2), rtol=1e-13)
    assert not noise.any()
    beta = sde.beta_min + (sde.beta_max - sde.beta_min) * hi
    lin, score_w, noise = step_coefficients(sde, ts, exponential=False)
    np.testing.assert_allclose(lin, 1 + (hi - lo) * beta / 2, rtol=1e-14)
    np.testing.assert_allclose(score_w, (hi - lo) * beta, rtol=1e-14)
    np.testing.assert_allclose(noise, (hi - lo) * beta, rtol=1e-14)
