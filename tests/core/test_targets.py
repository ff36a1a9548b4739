"""Analytic targets against autograd, closed forms and Monte Carlo."""
import math

import pytest
import torch

from scoresde.core import sde as S
from scoresde.core import targets as TG


def test_score_is_gradient_of_log_prob(gen):
    mix = TG.random_mixture(dim=5, n_components=4, seed=3)
    x = mix.sample(50, gen).requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(x).sum(), x)
    torch.testing.assert_close(mix.score(x.detach()), grad)


@pytest.mark.parametrize("sde", [S.VP(), S.VE(), S.SubVP(), S.ContractiveVP()], ids=type)
def test_time_marginal_score_and_density_batched_over_t(sde, gen):
    mix = TG.random_mixture(dim=3, n_components=3, seed=1)
    t = sde.t_min + (sde.T - sde.t_min) * torch.rand(40, generator=gen, dtype=torch.float64)
    pt = mix.at_time(sde, t)
    x = pt.sample(40, gen).requires_grad_(True)
    logp = pt.log_prob(x)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(pt.score(x.detach()), grad)
    # each row agrees with the explicit mixture at its own time
    for i in (0, 17, 39):
        a, s = sde.alpha(t[i]), sde.sigma(t[i])
        explicit = TG.GaussianMixture(mix.weights, a * mix.means, a**2 * mix.covariances + s**2 * torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(logp[i], explicit.log_prob(x[i:i + 1].detach())[0])


def test_log_prob_against_torch_distributions(gen):
    mix = TG.random_mixture(dim=4, n_components=3, seed=2)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(mix.weights),
        torch.distributions.MultivariateNormal(mix.means, mix.covariances))
    x = torch.randn(100, 4, generator=gen, dtype=torch.float64) * 3
    torch.testing.assert_close(mix.log_prob(x), ref.log_prob(x))


def test_sampling_moments(gen):
    mix = TG.random_mixture(dim=3, n_components=4, seed=5)
    n = 40000
    x = mix.sample(n, gen)
    sd = mix.covariance().diagonal().sqrt()
    assert ((x.mean(0) - mix.mean()).abs() / sd).max() < 5 / math.sqrt(n)
    assert ((torch.cov(x.T) - mix.covariance()).abs() / torch.outer(sd, sd)).max() < 0.05


def test_far_points_are_stable():
    mix = TG.ring()
    x = torch.tensor([[1e3, -1e3], [0.0, 0.0]], dtype=torch.float64)
    assert torch.isfinite(mix.log_prob(x)).all() and torch.isfinite(mix.score(x)).all()


def test_float32_inputs_keep_their_dtype(gen):
    mix = TG.grid()
    x = torch.randn(8, 2, generator=gen)
    assert mix.score(x).dtype == torch.float32 and mix.log_prob(x).dtype == torch.float32


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=[1.0], means=[1.0, 2.0], covariances=[[[1.0]]]), "means must have shape"),
    (dict(weights=[1.0, 1.0], means=[[0.0]], covariances=[[[1.0]]]), "weights must have shape"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covariances=[[[1.0]]]), "covariances must have shape"),
    (dict(weights=[-1.0], means=[[0.0]], covariances=[[[1.0]]]), "weights must be > 0"),
    (dict(weights=[1.0], means=[[float("nan")]], covariances=[[[1.0]]]), "must be finite"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covariances=[[[1.0, 0.5], [0.0, 1.0]]]), "symmetric"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covariances=[[[1.0, 2.0], [2.0, 1.0]]]), "positive definite"),
])
def test_validation(kwargs, message):
    kwargs = {k: torch.tensor(v, dtype=torch.float64) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        TG.GaussianMixture(**kwargs)


@pytest.mark.parametrize("name", sorted(TG.TOY_DATASETS))
def test_toy_datasets(name, gen):
    x = TG.TOY_DATASETS[name](2000, generator=gen)
    assert x.shape == (2000, 2) and torch.isfinite(x).all()
    assert x.abs().max() < 3 and x.std(0).min() > 0.3


def test_checkerboard_occupies_dark_squares(gen):
    x = TG.checkerboard(5000, generator=gen)
    cells = (torch.floor(x[:, 0] + 2) + torch.floor(x[:, 1] + 2)) % 2
    assert (cells == 0).all()
