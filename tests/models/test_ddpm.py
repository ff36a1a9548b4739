"""Discrete DDPM and NCSN against Bayes' rule, closed forms and a known likelihood."""
import math

import pytest
import torch

from scoresde.core import sde as S
from scoresde.models.ddpm import (
    DDPMSchedule,
    ddpm_elbo,
    ddpm_sample,
    ddpm_simple_loss,
    discretized_gaussian_log_likelihood,
)
from scoresde.models.ncsn import geometric_sigmas, ncsn_loss


def two_point_eps(schedule):
    """Exact E[eps | x_t] for data uniform on {-1, +1}: E[x0 | x_t] = tanh(sqrt(abar) x_t / (1 - abar))."""
    abar = schedule.alphas_cumprod

    def eps(x, i):
        a = abar[i].reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        x0 = torch.tanh(a.sqrt() * x / (1 - a))
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


@pytest.mark.parametrize("schedule", [DDPMSchedule.linear(100), DDPMSchedule.cosine(100)], ids=["linear", "cosine"])
def test_posterior_is_bayes_rule(schedule, gen):
    """q(x_{t-1} | x_t, x0) from q(x_{t-1} | x0) N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) by conjugacy."""
    i = torch.arange(1, 100)
    x0 = torch.randn(99, 3, generator=gen, dtype=torch.float64)
    xt = torch.randn(99, 3, generator=gen, dtype=torch.float64)
    abar_prev = schedule.alphas_cumprod[i - 1][:, None]
    beta, alpha = schedule.betas[i][:, None], 1 - schedule.betas[i][:, None]
    precision = 1 / (1 - abar_prev) + alpha / beta
    mean = (abar_prev.sqrt() * x0 / (1 - abar_prev) + alpha.sqrt() * xt / beta) / precision
    m, v = schedule.posterior(x0, xt, i)
    torch.testing.assert_close(m, mean)
    torch.testing.assert_close(v, (1 / precision).expand_as(v))


def test_discretized_gaussian_sums_to_one():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None]
    for mean, std in [(0.0, 0.01), (0.3, 0.2), (-0.99, 1.5), (2.0, 0.05)]:
        p = discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=torch.float64),
                                                torch.tensor(std, dtype=torch.float64)).exp()
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)


def test_elbo_of_exact_denoiser_is_near_true_nll(gen):
    """Data uniform on {-1, +1} (1 dim), exact eps: the continuous part L_N + sum L_{t-1} tends to the
    entropy log 2, the decoder L_0 is -log Phi((1/255) / sqrt(beta_1)) exactly (x0-hat = +-1), and the
    whole -ELBO is an upper bound on -log p = log 2."""
    schedule = DDPMSchedule.linear(1000)
    x0 = (torch.randint(0, 2, (400, 1), generator=gen) * 2 - 1).double()
    terms = ddpm_elbo(two_point_eps(schedule), schedule, x0, generator=gen)
    total = terms["total"]
    torch.testing.assert_close(total, terms["prior"] + terms["kl"].sum(1) + terms["decoder"])
    decoder = -math.log(0.5 * (1 + math.erf(1 / 255 / math.sqrt(1e-4) / math.sqrt(2))))
    torch.testing.assert_close(terms["decoder"], torch.full((400,), decoder, dtype=torch.float64))
    continuous = terms["prior"] + terms["kl"].sum(1)
    mean, se = float(continuous.mean()), float(continuous.std()) / math.sqrt(400)
    assert abs(mean - math.log(2)) < 0.02 + 3 * se
    assert float(total.mean()) > math.log(2)
    torch.testing.assert_close(terms["bits_per_dim"], total / math.log(2))


def test_ancestral_sampling_of_exact_denoiser(gen):
    schedule = DDPMSchedule.linear(200)
    x = ddpm_sample(two_point_eps(schedule), schedule, (4000, 1), generator=gen, dtype=torch.float64)
    assert ((x.abs() - 1).abs() < 0.1).float().mean() > 0.97
    assert abs(float((x > 0).double().mean()) - 0.5) < 4 * 0.5 / math.sqrt(4000)


def test_discrete_chain_approaches_vp_sde():
    """abar at step round(N t) from beta_t = beta(t/N)/N tends to alpha(t)^2 = exp(-B(t)) at rate 1/N."""
    sde = S.VP()
    errors = []
    for n in (200, 800, 3200):
        abar = DDPMSchedule.from_vp(sde, n).alphas_cumprod
        t = torch.tensor([0.1, 0.25, 0.5], dtype=torch.float64)
        errors.append(float((abar[(t * n).long() - 1] - sde.alpha(t) ** 2).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3
    assert 3 < errors[1] / errors[2] < 5  # first order in 1/N


def test_simple_loss_prefers_exact_eps(gen):
    schedule = DDPMSchedule.linear(100)
    x0 = (torch.randint(0, 2, (2000, 1), generator=gen) * 2 - 1).double()
    i = torch.randint(0, 100, (2000,), generator=gen)
    noise = torch.randn(2000, 1, generator=gen, dtype=torch.float64)
    exact = ddpm_simple_loss(two_point_eps(schedule), schedule, x0, i=i, noise=noise)
    zero = ddpm_simple_loss(lambda x, i: torch.zeros_like(x), schedule, x0, i=i, noise=noise)
    assert exact.shape == (2000,) and float(exact.mean()) < float(zero.mean())
    torch.testing.assert_close(zero, noise.pow(2).sum(1))


def test_ncsn_loss_closed_form_for_gaussian_data(gen):
    """Data N(0, s0^2 I), exact score -x / (s0^2 + sigma^2): E loss = (d/2) s0^2 / (s0^2 + sigma^2)."""
    s0, d, n = 0.7, 3, 20000
    sigmas = geometric_sigmas(5.0, 0.1, 10)
    level = torch.randint(0, 10, (n,), generator=gen)
    x0 = s0 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    loss = ncsn_loss(lambda x, s: -x / (s0**2 + s[:, None] ** 2), sigmas, x0, level=level, generator=gen)
    expected = 0.5 * d * s0**2 / (s0**2 + sigmas[level] ** 2)
    diff = loss - expected
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(n)


def test_geometric_sigmas_and_validation():
    s = geometric_sigmas(50.0, 0.01, 5)
    torch.testing.assert_close(s[1:] / s[:-1], torch.full((4,), (0.01 / 50) ** 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        geometric_sigmas(0.1, 1.0)
    with pytest.raises(ValueError, match="n_levels must be >= 2"):
        geometric_sigmas(1.0, 0.1, 1)
    with pytest.raises(ValueError, match="betas must lie in"):
        DDPMSchedule(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="variance must be"):
        DDPMSchedule.linear(10).reverse_variance("fixed")


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_reverse_variances_are_diffusers_fixed_large_and_fixed_small(schedule):
    """`ddpm_sample`'s variance "beta" (its default) is diffusers' "fixed_large" beta_t and "posterior" is
    "fixed_small" beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, which is smaller for t >= 2
    (Ho et al. sec. 3.2); at t = 1 beta-tilde is 0 and "posterior" uses beta_1 (the decoder's variance)."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)
    ours = DDPMSchedule.linear(1000) if schedule == "linear" else DDPMSchedule.cosine(1000)
    large = torch.stack([ref._get_variance(t, variance_type="fixed_large") for t in range(1000)]).double()
    small = torch.stack([ref._get_variance(t, variance_type="fixed_small") for t in range(1000)]).double()
    beta, posterior = ours.reverse_variance("beta"), ours.reverse_variance("posterior")
    # diffusers divides float32 alphas_cumprod: beta carries an absolute error of a few float32 ulps of abar
    torch.testing.assert_close(beta, large, rtol=0, atol=3e-7)
    torch.testing.assert_close(posterior[1:], small[1:], rtol=0, atol=3e-7)
    assert (posterior[1:] < beta[1:]).all() and posterior[0] == beta[0]
