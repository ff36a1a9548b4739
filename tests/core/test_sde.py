"""Forward SDEs against independent truths: quadrature, ODEs for the moments, simulation, autograd."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from scoresde.core import sde as S
from scoresde.core.targets import GaussianMixture

LINEAR = {
    "OU": S.OU(),
    "VE": S.VE(),
    "VEEDM": S.VEEDM(),
    "VP": S.VP(),
    "SubVP": S.SubVP(),
    "ContractiveOU": S.ContractiveOU(),
    "ContractiveVP": S.ContractiveVP(),
}


def f64(v):
    return torch.tensor(v, dtype=torch.float64)


def quad_alpha_sigma(sde, t):
    """alpha = exp(-int_0^t b), sigma^2 = int_0^t exp(-2 int_u^t b) g(u)^2 du by nested quadrature."""
    b = lambda u: float(sde.b(f64(u)))
    g2 = lambda u: float(sde.diffusion(f64(u))) ** 2
    Bint = lambda a, c: integrate.quad(b, a, c, epsabs=1e-13, epsrel=1e-12)[0]
    alpha = math.exp(-Bint(0, t))
    var = integrate.quad(lambda u: math.exp(-2 * Bint(u, t)) * g2(u), 0, t, epsabs=1e-13, epsrel=1e-11, limit=200)[0]
    return alpha, math.sqrt(var)


@pytest.mark.parametrize("name", LINEAR)
def test_alpha_sigma_match_quadrature(name):
    sde = LINEAR[name]
    for frac in (0.05, 0.3, 0.7, 1.0):
        t = sde.t_min + frac * (sde.T - sde.t_min)
        alpha, sigma = quad_alpha_sigma(sde, t)
        assert float(sde.alpha(f64(t))) == pytest.approx(alpha, rel=1e-8)
        assert float(sde.sigma(f64(t))) == pytest.approx(sigma, rel=1e-7)


@pytest.mark.parametrize("name", LINEAR)
def test_moment_odes_by_autograd(name):
    """alpha' = -b alpha and (sigma^2)' = -2 b sigma^2 + g^2."""
    sde = LINEAR[name]
    t = torch.linspace(sde.t_min + 0.01 * sde.T, sde.T, 17, dtype=torch.float64).requires_grad_(True)
    a, s2 = sde.alpha(t) + 0 * t, sde.sigma(t) ** 2  # + 0 * t: constant alpha has no graph
    (da,) = torch.autograd.grad(a.sum(), t)
    (ds2,) = torch.autograd.grad(s2.sum(), t)
    with torch.no_grad():
        b, g2 = sde.b(t), sde.diffusion(t) ** 2
        torch.testing.assert_close(da, -b * a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ds2, -2 * b * s2 + g2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", LINEAR)
def test_marginal_matches_euler_maruyama(name, gen):
    sde = LINEAR[name]
    n, d = 20000, 1
    x0 = torch.full((n, d), 0.7, dtype=torch.float64)
    t = 0.5 * sde.T
    xt = S.simulate(sde, x0, t, n_steps=400, generator=gen)
    mean, std = sde.marginal(x0[:1], t)
    se_mean = float(std[0, 0]) / math.sqrt(n)
    se_var = float(std[0, 0]) ** 2 * math.sqrt(2 / (n - 1))
    # 5 standard errors plus the Euler-Maruyama weak error (order h = t / 400)
    assert abs(xt.mean() - mean[0, 0]).item() < 5 * se_mean + 0.01 * float(std[0, 0])
    assert abs(xt.var() - std[0, 0] ** 2).item() < 5 * se_var + 0.02 * float(std[0, 0]) ** 2


@pytest.mark.parametrize("name", LINEAR)
def test_conditional_score_is_gradient_of_log_density(name, gen):
    sde = LINEAR[name]
    x0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t = sde.t_min + (sde.T - sde.t_min) * torch.rand(5, generator=gen, dtype=torch.float64)
    xt = sde.sample_marginal(x0, t, torch.randn(5, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mean, std = sde.marginal(x0, t)
    logp = torch.distributions.Normal(mean, std).log_prob(xt).sum()
    (grad,) = torch.autograd.grad(logp, xt)
    torch.testing.assert_close(sde.conditional_score(xt.detach(), x0, t), grad)


@pytest.mark.parametrize("name", LINEAR)
def test_log_snr_inverse(name):
    sde = LINEAR[name]
    t = torch.linspace(sde.t_min, sde.T, 11, dtype=torch.float64)
    lam = sde.log_snr(t)
    torch.testing.assert_close(lam, torch.log(sde.alpha(t) / sde.sigma(t)))
    assert (lam.diff() < 0).all()
    torch.testing.assert_close(sde.inverse_log_snr(lam), t, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", LINEAR)
def test_prior(name, gen):
    sde = LINEAR[name]
    x = sde.prior_sample((4000, 2), generator=gen, dtype=torch.float64)
    assert x.std().item() == pytest.approx(sde.prior_std, rel=0.05)
    ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(x).sum(1)
    torch.testing.assert_close(sde.prior_logp(x), ref)
    # the prior is the law of X_T with the alpha(T) x0 term dropped
    assert sde.prior_std == pytest.approx(float(sde.sigma(f64(sde.T))), rel=0.02) or name in ("VP", "SubVP", "OU")


def test_shapes_broadcast_over_images(gen):
    sde = S.VP()
    x0 = torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.rand(4, generator=gen)
    mean, std = sde.marginal(x0, t)
    assert mean.shape == std.shape == x0.shape
    assert sde.drift(t, x0).shape == x0.shape
    assert sde.prior_logp(x0).shape == (4,)
    assert sde.marginal(x0, 0.5)[0].shape == x0.shape  # scalar time


@pytest.mark.parametrize("bad, message", [
    (lambda: S.VP(beta_min=1.0, beta_max=1.0), "beta_max must be > beta_min"),
    (lambda: S.VP(beta_min=-1.0), "beta_min must be a finite number >= 0"),
    (lambda: S.SubVP(beta_max=float("nan")), "beta_max must be a finite number"),
    (lambda: S.ContractiveVP(beta_min=5.0, beta_max=2.0), "beta_max must be > beta_min"),
    (lambda: S.VE(sigma_min=0.0), "sigma_min must be a finite number > 0"),
    (lambda: S.VE(sigma_min=2.0, sigma_max=1.0), "sigma_max must be > sigma_min"),
    (lambda: S.ContractiveOU(theta=0.0), "theta must be a finite number > 0"),
    (lambda: S.ContractiveOU(g=-1.0), "g must be a finite number > 0"),
    (lambda: S.OU(T=0.001, t_min=0.01), "T must be > t_min"),
    (lambda: S.VEEDM(t_min=-1.0), "t_min must be a finite number >= 0"),
    (lambda: S.VP(T=float("inf")), "T must be a finite number"),
    (lambda: S.Langevin(potential=3.0), "potential must be a callable"),
])
def test_validation_messages(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_langevin_general_potential(gen):
    """Double-well V = (|x|^2 - 1)^2 / 4: drift by autograd, simulation keeps e^{-V} stationary."""
    V = lambda x: 0.25 * (x.pow(2).sum(1) - 1) ** 2
    sde = S.Langevin(V)
    x = torch.randn(4, 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sde.drift(0.0, x), -(x.pow(2) - 1) * x)
    with pytest.raises(NotImplementedError, match="no closed-form Gaussian marginal"):
        sde.marginal(x, 0.5)
    with pytest.raises(NotImplementedError, match="pass x_T"):
        sde.prior_sample((3, 1))
    # stationarity: start from e^{-V} (inverse CDF on a grid) and check E x^2 after simulation
    grid = np.linspace(-3, 3, 20001)
    dens = np.exp(-0.25 * (grid**2 - 1) ** 2)
    cdf = np.cumsum(dens) / dens.sum()
    u = torch.rand(20000, generator=gen, dtype=torch.float64).numpy()
    x0 = torch.from_numpy(np.interp(u, cdf, grid))[:, None]
    m2 = float((grid**2 * dens).sum() / dens.sum())
    x1 = S.simulate(sde, x0, 1.0, n_steps=200, generator=gen)
    se = float(x1.pow(2).std()) / math.sqrt(20000)
    assert abs(float(x1.pow(2).mean()) - m2) < 5 * se + 0.01


def test_langevin_with_quadratic_potential_is_ou(gen):
    sde = S.Langevin(lambda x: 0.5 * x.pow(2).sum(1))
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sde.drift(0.3, x), S.OU().drift(0.3, x))
    torch.testing.assert_close(sde.diffusion(0.3), S.OU().diffusion(torch.tensor(0.3)))


def _mixture():
    return GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]),
                           torch.tensor([[[0.1, 0.05], [0.05, 0.2]], [[0.2, -0.1], [-0.1, 0.15]]]))


def _reverse(sde, drift, x, n_steps, gen, stochastic):
    """Euler(-Maruyama) on a grid quadratic in t (finer near t_min), from T down to t_min."""
    u = torch.linspace(1, 0, n_steps + 1, dtype=torch.float64)
    ts = sde.t_min + (sde.T - sde.t_min) * u**2
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t - t_next
        x = x - drift(t, x) * h
        if stochastic:
            x = x + sde.diffusion(t) * h.sqrt() * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


@pytest.mark.parametrize("name", ["VP", "VE", "SubVP", "ContractiveOU", "ContractiveVP"])
@pytest.mark.parametrize("stochastic", [True, False], ids=["reverse-sde", "probability-flow"])
def test_time_reversal_recovers_mixture(name, stochastic, gen):
    """Reverse SDE / probability-flow ODE with the exact score from the exact p_T gives back p_0."""
    sde = {"VE": S.VE(sigma_max=10.0)}.get(name, LINEAR[name])
    mix = _mixture()
    n = 6000
    x = mix.at_time(sde, sde.T).sample(n, gen)
    make = S.reverse_drift if stochastic else S.probability_flow_drift
    x = _reverse(sde, make(sde, mix.score_fn(sde)), x, 400, gen, stochastic)
    target = mix.at_time(sde, sde.t_min)
    ref_mean = target.alpha * mix.mean()
    ref_cov = target.alpha**2 * mix.covariance() + target.sigma**2 * torch.eye(2, dtype=torch.float64)
    sd = ref_cov.diagonal().sqrt()
    assert ((x.mean(0) - ref_mean).abs() / sd).max() < 5 / math.sqrt(n) + 0.02
    assert ((torch.cov(x.T) - ref_cov).abs() / torch.outer(sd, sd)).max() < 7 / math.sqrt(n) + 0.03
    # the mixture weight: mass on the side of the heavier component
    assert float((x[:, 0] > 0).double().mean()) == pytest.approx(0.7, abs=0.03)


def test_registry_lists_valid_names():
    assert isinstance(S.SDES["vp"](), S.VP)
    with pytest.raises(KeyError, match="unknown SDE 'vpp'; valid: contractive_ou, contractive_vp, langevin, ou, subvp, ve, ve_edm, vp"):
        S.SDES["vpp"]
