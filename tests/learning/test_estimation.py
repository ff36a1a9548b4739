"""Score-matching statistics against closed forms, a numerical optimiser, quadrature and Monte Carlo."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from scoresde.learning import estimation as E


def gaussian_family(interval=(-15.0, 15.0)):
    return E.ExponentialFamily(lambda x: torch.cat([x, x**2], -1), interval=interval)


def quartic_family():
    return E.ExponentialFamily(lambda x: torch.cat([x, x**2, x**3, x**4], -1), interval=(-8.0, 8.0))


QUARTIC_THETA = torch.tensor([0.5, -1.0, 0.3, -0.5], dtype=torch.float64)


def gaussian_natural(mu, var):
    return torch.tensor([mu / var, -0.5 / var], dtype=torch.float64)


def test_gaussian_estimate_is_closed_form_and_mle(gen):
    fam = gaussian_family()
    x = 1.0 + 1.5 * torch.randn(300, 1, generator=gen, dtype=torch.float64)
    mean, var = x.mean(), ((x - x.mean()) ** 2).mean()  # MLE of a Gaussian: the biased variance
    closed = gaussian_natural(mean.item(), var.item())
    torch.testing.assert_close(E.score_matching_estimate(fam, x), closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(E.mle_estimate(fam, x), closed, rtol=1e-9, atol=1e-9)
    # badly scaled statistics are not mistaken for a singular H: theta rescales exactly
    scaled = E.ExponentialFamily(lambda y: torch.cat([1e-7 * y, 1e5 * y**2], -1))
    torch.testing.assert_close(E.score_matching_estimate(scaled, x), closed * torch.tensor([1e7, 1e-5], dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_multivariate_gaussian_estimate_is_inverse_sample_covariance(gen):
    fam = E.ExponentialFamily(
        lambda x: torch.stack([x[:, 0], x[:, 1], x[:, 0] ** 2, x[:, 0] * x[:, 1], x[:, 1] ** 2], -1), dim=2)
    a = torch.tensor([[1.0, 0.0], [0.7, 0.5]], dtype=torch.float64)
    x = torch.randn(500, 2, generator=gen, dtype=torch.float64) @ a.T + torch.tensor([0.3, -1.0], dtype=torch.float64)
    mean = x.mean(0)
    prec = torch.linalg.inv((x - mean).T @ (x - mean) / len(x))
    # log p = -x^T P x / 2 + (P mu)^T x: theta = (P mu, -P11/2, -P12, -P22/2)
    closed = torch.cat([prec @ mean, torch.stack([-prec[0, 0] / 2, -prec[0, 1], -prec[1, 1] / 2])])
    torch.testing.assert_close(E.score_matching_estimate(fam, x), closed, rtol=1e-10, atol=1e-10)
    # the family's score J_T^T theta is the Gaussian score -P (x - mu)
    torch.testing.assert_close(fam.score(x, closed), -(x - mean) @ prec, rtol=1e-10, atol=1e-10)


def test_batched_estimate_equals_per_repetition(gen):
    fam = quartic_family()
    x = fam.sample(3 * 200, QUARTIC_THETA, gen).reshape(3, 200, 1)
    batched = E.score_matching_estimate(fam, x)
    for r in range(3):
        torch.testing.assert_close(batched[r], E.score_matching_estimate(fam, x[r]))


def test_closed_form_equals_lbfgs_minimiser(gen):
    fam = quartic_family()
    x = fam.sample(400, QUARTIC_THETA, gen)
    closed = E.score_matching_estimate(fam, x)

    def log_p(y, theta):  # the same family as a plain unnormalised callable
        return torch.cat([y, y**2, y**3, y**4], -1) @ theta

    numeric = E.score_matching_estimate(log_p, x, theta0=torch.tensor([0.0, -0.5, 0.0, -0.1]))
    torch.testing.assert_close(numeric, closed, rtol=1e-6, atol=1e-6)
    # the closed form is a stationary point of the objective evaluated through autograd
    grad = torch.func.grad(lambda th: E.implicit_objective(log_p, x, th).mean())(closed)
    assert grad.abs().max() < 1e-9
    # sample sandwich: functorch Hessian / per-sample gradients agree with the M, b formulas
    torch.testing.assert_close(E.sandwich_covariance(log_p, closed, x), E.sandwich_covariance(fam, closed, x))


def test_gaussian_normaliser_fisher_and_efficiency_closed_form():
    fam = gaussian_family()
    mu, var = -0.7, 1.8
    theta = gaussian_natural(mu, var)
    assert abs(fam.log_normalizer(theta).item() - (0.5 * math.log(2 * math.pi * var) + mu**2 / (2 * var))) < 1e-12
    # Cov(X, X^2) for N(mu, var)
    fisher = torch.tensor([[var, 2 * mu * var], [2 * mu * var, 2 * var**2 + 4 * mu**2 * var]], dtype=torch.float64)
    torch.testing.assert_close(E.fisher_information(fam, theta), fisher, rtol=1e-11, atol=1e-11)
    # score matching is the MLE for a Gaussian, so its sandwich is I^{-1} and the efficiency is 1
    torch.testing.assert_close(E.sandwich_covariance(fam, theta), torch.linalg.inv(fisher), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(E.relative_efficiency(fam, theta), torch.ones(2, dtype=torch.float64), rtol=1e-9, atol=0)


def test_quartic_normaliser_mle_and_fisher_against_scipy_quad(gen):
    fam = quartic_family()
    theta = QUARTIC_THETA

    def moment(f, th):
        return integrate.quad(lambda s: f(s) * math.exp(th @ np.array([s, s**2, s**3, s**4])), -np.inf, np.inf,
                              epsabs=0, epsrel=1e-12)[0]

    th = theta.numpy()
    z = moment(lambda s: 1.0, th)
    assert abs(fam.log_normalizer(theta).item() - math.log(z)) < 1e-10
    means = np.array([moment(lambda s, j=j: s ** (j + 1), th) for j in range(4)]) / z
    second = np.array([[moment(lambda s, i=i, j=j: s ** (i + j + 2), th) for j in range(4)] for i in range(4)]) / z
    np.testing.assert_allclose(E.fisher_information(fam, theta).numpy(), second - np.outer(means, means), rtol=1e-8)
    # the MLE matches moments: E_theta_hat T = mean T(x), checked with scipy's integrator
    x = fam.sample(2000, theta, gen)
    mle = E.mle_estimate(fam, x).numpy()
    z_hat = moment(lambda s: 1.0, mle)
    fitted = np.array([moment(lambda s, j=j: s ** (j + 1), mle) for j in range(4)]) / z_hat
    np.testing.assert_allclose(fitted, fam.stat(x).mean(0).numpy(), rtol=1e-7, atol=1e-9)
    eff = E.relative_efficiency(fam, theta)
    assert ((eff > 0) & (eff <= 1 + 1e-9)).all()  # Cramer-Rao: no estimator beats the MLE


def test_sampler_against_normal_cdf(gen):
    fam = gaussian_family()
    x = fam.sample(20000, gaussian_natural(0.5, 2.0), gen)
    assert stats.kstest(x[:, 0].numpy(), stats.norm(0.5, math.sqrt(2.0)).cdf).pvalue > 1e-3


def _sandwich_vs_repetitions(reps, n, gen, z_max):
    fam = quartic_family()
    chunk = max(1, 400_000 // n)  # repetitions per batch, to bound memory
    est = torch.cat([E.score_matching_estimate(fam, fam.sample(min(chunk, reps - r) * n, QUARTIC_THETA, gen)
                                               .reshape(-1, n, 1)) for r in range(0, reps, chunk)])
    z = math.sqrt(n) * (est - QUARTIC_THETA)
    emp = torch.cov(z.T)
    exact = E.sandwich_covariance(fam, QUARTIC_THETA)
    # each variance estimate has relative standard error sqrt(2 / (reps - 1)) for normal z
    zscore = (emp.diagonal() / exact.diagonal() - 1) / math.sqrt(2 / (reps - 1))
    assert zscore.abs().max() < z_max, (emp.diagonal(), exact.diagonal())
    # means: bias of order 1/sqrt(n) in these units, far below the Monte Carlo error of the mean
    assert ((z.mean(0) / (exact.diagonal() / reps).sqrt()).abs() < z_max).all()
    return emp, exact


def test_sandwich_by_quadrature_matches_repetitions_small(gen):
    _sandwich_vs_repetitions(reps=400, n=2000, gen=gen, z_max=4.5)


@pytest.mark.slow
def test_sandwich_by_quadrature_matches_repetitions_large(gen):
    emp, exact = _sandwich_vs_repetitions(reps=4000, n=10000, gen=gen, z_max=4.5)
    # correlations: Fisher-z standard error 1/sqrt(reps - 3)
    d_emp, d_exact = emp.diagonal().sqrt(), exact.diagonal().sqrt()
    r_emp, r_exact = emp / torch.outer(d_emp, d_emp), exact / torch.outer(d_exact, d_exact)
    iu = torch.triu_indices(4, 4, 1)
    fz = (torch.atanh(r_emp[iu[0], iu[1]]) - torch.atanh(r_exact[iu[0], iu[1]])) * math.sqrt(4000 - 3)
    assert fz.abs().max() < 4.5


def test_errors(gen):
    fam = gaussian_family()
    x = torch.randn(50, 1, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="not identifiable"):
        E.score_matching_estimate(E.ExponentialFamily(lambda y: torch.cat([y, 2 * y], -1)), x)
    with pytest.raises(ValueError, match="not identifiable"):  # a constant statistic has no x-gradient
        E.score_matching_estimate(E.ExponentialFamily(lambda y: torch.cat([y, y**2, torch.ones_like(y)], -1)), x)
    with pytest.raises(ValueError, match="at least as many samples"):
        E.score_matching_estimate(fam, x[:1])
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        E.score_matching_estimate(fam, bad)
    with pytest.raises(ValueError, match="theta0"):
        E.score_matching_estimate(lambda y, th: th[0] * y[:, 0] ** 2, x)
    with pytest.raises(ValueError, match="interval"):
        E.fisher_information(E.ExponentialFamily(lambda y: torch.cat([y, y**2], -1)), gaussian_natural(0, 1))
    with pytest.raises(ValueError, match="not negligible"):
        gaussian_family(interval=(-2.0, 2.0)).log_normalizer(gaussian_natural(0.0, 1.0))
    with pytest.raises(ValueError, match="not negligible"):  # not normalisable: positive x^2 coefficient
        fam.sample(10, torch.tensor([0.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="theta must have shape"):
        fam.log_normalizer(torch.zeros(3, dtype=torch.float64))
