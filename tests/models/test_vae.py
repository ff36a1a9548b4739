"""VAE bounds against the exact likelihood of a linear-Gaussian model."""
import math

import pytest
import torch

from scoresde.models.vae import MLPVAE, ConvVAE


def linear_vae(gen):
    torch.manual_seed(0)
    vae = MLPVAE(dim=3, latent_dim=2, hidden=()).double()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        vae.log_scale.fill_(math.log(0.3))
    return vae


def exact_log_prob(vae, x):
    """A linear decoder x = W z + b + s e has marginal N(b, W W^T + s^2 I)."""
    lin = vae.decoder[0]
    cov = lin.weight @ lin.weight.T + vae.log_scale.exp() ** 2 * torch.eye(3, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(lin.bias, cov).log_prob(x)


def test_bounds_below_exact_and_tighten_with_k(gen):
    vae = linear_vae(gen)
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        exact = exact_log_prob(vae, x)
        elbo = torch.stack([vae.elbo(x, gen) for _ in range(100)])
        iw1 = torch.stack([vae.log_likelihood_bound(x, 1, gen) for _ in range(100)])
    # closed-form-KL ELBO and its Monte Carlo form (k = 1) estimate the same mean
    se = math.sqrt(float(elbo.var()) / elbo.numel() + float(iw1.var()) / iw1.numel())
    assert abs(float(elbo.mean() - iw1.mean())) < 4 * se
    with torch.no_grad():
        bounds = {k: torch.stack([vae.log_likelihood_bound(x, k, gen) for _ in range(10)]).mean(0) for k in (1, 10, 100)}
    for k in (1, 10, 100):
        assert float(bounds[k].mean()) <= float(exact.mean())
    assert float(bounds[1].mean()) < float(bounds[10].mean()) < float(bounds[100].mean())
    assert float((exact - bounds[100]).mean()) < 0.5 * float((exact - bounds[1]).mean())


def test_elbo_is_exact_at_the_exact_posterior(gen):
    """W with orthogonal columns makes the posterior diagonal; with the encoder set to it the bound is exact."""
    vae = linear_vae(gen)
    W = torch.tensor([[1.5, 0.0], [0.0, -0.7], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64)
    s2 = float(vae.log_scale.detach().exp() ** 2)
    cov = torch.diag(1 / (1 + (W**2).sum(0) / s2))
    with torch.no_grad():
        vae.decoder[0].weight.copy_(W)
        vae.decoder[0].bias.copy_(b)
        enc = vae.encoder[0]
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[:2] = cov @ W.T / s2
        enc.bias[:2] = -(cov @ W.T @ b) / s2
        enc.bias[2:] = cov.diagonal().log()
        x = torch.randn(50, 3, generator=gen, dtype=torch.float64)
        exact = exact_log_prob(vae, x)
        # log p(x, z) - log q(z | x) = log p(x) for every draw z
        torch.testing.assert_close(vae.log_likelihood_bound(x, 3, gen), exact)
        # the closed-form-KL ELBO is exact in expectation only
        elbo = torch.stack([vae.elbo(x, gen) for _ in range(400)])
        assert float((elbo.mean(0) - exact).abs().max()) < 5 * float(elbo.std(0).max()) / 20


def test_conv_vae_bits_per_dim_and_training_step(gen):
    torch.manual_seed(0)
    vae = ConvVAE(channels=1, size=8, latent_dim=4, base=8)
    x = (torch.randint(0, 256, (16, 1, 8, 8), generator=gen).float() / 127.5 - 1)
    bpd = vae.bits_per_dim(x, k=2, generator=gen)
    assert bpd.shape == (16,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    opt = torch.optim.Adam(vae.parameters(), 1e-2)
    first = None
    for _ in range(30):
        loss = vae.loss(x, gen).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert vae.sample(3, gen).shape == (3, 1, 8, 8)


def test_validation():
    with pytest.raises(ValueError, match="likelihood must be"):
        MLPVAE(2, likelihood="bernoulli")
    with pytest.raises(ValueError, match="size must be divisible by 4"):
        ConvVAE(size=10)
    with pytest.raises(ValueError, match="bits_per_dim needs likelihood='discretized'"):
        MLPVAE(2).bits_per_dim(torch.zeros(1, 2))
