import pytest
import torch
from torch import nn

from scoresde.core import precond as P
from scoresde.core.sde import OU, VE, VEEDM, VP, ContractiveVP, Langevin, SubVP
from scoresde.core.targets import GaussianMixture, ring

SDES = [VP(), SubVP(), VE(), VEEDM(), OU(), ContractiveVP()]


def _times(sde, n, gen):
    return sde.t_min + (sde.T - sde.t_min) * torch.rand(n, generator=gen, dtype=torch.float64)


def test_conversions_round_trip(gen):
    x = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    alpha = torch.rand(50, generator=gen, dtype=torch.float64) * 3 + 0.1
    sigma = torch.rand(50, generator=gen, dtype=torch.float64) * 5 + 0.01
    for src in P.KINDS:
        for dst in P.KINDS:
            back = P.convert(P.convert(v, src, dst, x, alpha, sigma), dst, src, x, alpha, sigma)
            torch.testing.assert_close(back, v, rtol=1e-10, atol=1e-10)
    # the direct eps <-> x0 formulas agree with the route through the score
    torch.testing.assert_close(P.eps_to_x0(v, x, alpha, sigma),
                               P.score_to_x0(P.eps_to_score(v, sigma), x, alpha, sigma))
    torch.testing.assert_close(P.x0_to_eps(v, x, alpha, sigma),
                               P.score_to_eps(P.x0_to_score(v, x, alpha, sigma), sigma))


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_exact_mixture_score_round_trips(sde, gen):
    mix = ring()
    t = _times(sde, 400, gen)
    x = mix.at_time(sde, t).sample(400, gen)
    s = mix.score_fn(sde)(x, t)
    a, sig = sde.alpha(t), sde.sigma(t)
    torch.testing.assert_close(P.eps_to_score(P.score_to_eps(s, sig), sig), s)
    torch.testing.assert_close(P.x0_to_score(P.score_to_x0(s, x, a, sig), x, a, sig), s, rtol=1e-9, atol=1e-9)


def test_tweedie_matches_gaussian_posterior_mean(gen):
    """For x0 ~ N(mu, c^2 I): E[x0 | x] = mu + alpha c^2 (x - alpha mu) / (alpha^2 c^2 + sigma^2) (conjugacy)."""
    mu, c = torch.tensor([[0.7, -1.2]], dtype=torch.float64), 0.6
    g = GaussianMixture(torch.ones(1), mu, c**2 * torch.eye(2)[None])
    sde = VP()
    t = _times(sde, 300, gen)
    x = g.at_time(sde, t).sample(300, gen)
    a, sig = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    post = mu + a * c**2 * (x - a * mu) / (a**2 * c**2 + sig**2)
    s = g.score_fn(sde)(x, t)
    torch.testing.assert_close(P.score_to_x0(s, x, a[:, 0], sig[:, 0]), post)
    torch.testing.assert_close(P.score_to_eps(s, sig[:, 0]), (x - a * post) / sig)


def test_edm_scalings_match_table_1_and_give_unit_variance(gen):
    sd = 0.5
    s = torch.exp(torch.linspace(-6, 4, 50, dtype=torch.float64))
    one = torch.ones_like(s)
    c_skip, c_out, c_in, c_noise = P.edm_scalings(one, s, sd)
    # Karras et al. 2206.00364 Table 1 (alpha = 1)
    torch.testing.assert_close(c_skip, sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(c_out, s * sd / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sd**2 + s**2).sqrt())
    torch.testing.assert_close(c_noise, s.log() / 4)
    # any alpha: with x0 of variance sd^2, x = alpha x0 + sigma z, the input c_in x and the
    # target (x0 - c_skip x) / c_out have unit variance (the EDM design criteria, 2206.00364 App. B.6)
    alpha = torch.rand(50, generator=gen, dtype=torch.float64) * 4 + 0.05
    c_skip, c_out, c_in, _ = P.edm_scalings(alpha, s, sd)
    torch.testing.assert_close(c_in**2 * (alpha**2 * sd**2 + s**2), one)
    var_target = ((1 - c_skip * alpha) ** 2 * sd**2 + c_skip**2 * s**2) / c_out**2
    torch.testing.assert_close(var_target, one)
    # and c_skip minimises that target variance: d/dc_skip [(1 - c a)^2 sd^2 + c^2 s^2] = 0
    torch.testing.assert_close(-alpha * (1 - c_skip * alpha) * sd**2 + c_skip * s**2, torch.zeros_like(s))
    with pytest.raises(ValueError, match="sigma_data"):
        P.edm_scalings(one, s, 0.0)


class _GaussianOracle(nn.Module):
    """The exact 'network' of each parametrization for data N(mu, c^2 I), written from the closed forms
    alone: posterior mean x0_hat = mu + alpha c^2 (x - alpha mu) / v, v = alpha^2 c^2 + sigma^2 (conjugacy),
    score -(x - alpha mu) / v, eps = (x - alpha x0_hat) / sigma, and EDM Table 1 (2206.00364) on y = x / alpha
    at noise level s = sigma / alpha. The conditioning it gets is inverted by hand (c_noise = log(s) / 4)."""

    def __init__(self, sde, parametrization, mu, c, sigma_data):
        super().__init__()
        self.sde, self.p, self.mu, self.c, self.sd = sde, parametrization, mu, c, sigma_data
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_in, cond):
        sde, p, mu, c, sd = self.sde, self.p, self.mu, self.c, self.sd
        if p in ("score", "vp_skip"):  # raw x and t in
            t, x = cond, x_in
            a, sig = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        else:
            s = torch.exp(4 * cond)  # s = sigma / alpha
            t = sde.inverse_log_snr(-torch.log(s))
            a, sig = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
            x = a * x_in * (s[:, None] ** 2 + sd**2).sqrt()  # c_in = 1 / sqrt(s^2 + sd^2) acts on y = x / alpha
        v = a**2 * c**2 + sig**2
        x0 = mu + a * c**2 * (x - a * mu) / v
        if p == "score":
            return -(x - a * mu) / v
        if p == "eps":
            return (x - a * x0) / sig
        if p in ("x0", "vp_skip"):
            return x0
        s = sig / a  # edm: D(y) = c_skip y + c_out F with D = x0_hat, Table 1
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
        return (x0 - c_skip * x / a) / c_out


@pytest.mark.parametrize("parametrization", P.PARAMETRIZATIONS)
@pytest.mark.parametrize("sde", [VP(), VE(), VEEDM(), ContractiveVP()], ids=lambda s: type(s).__name__)
def test_score_model_with_exact_network_recovers_exact_score(sde, parametrization, gen):
    """ScoreModel around the exact network of its parametrization returns the closed-form Gaussian score,
    posterior mean and noise."""
    mu, c, sd = torch.tensor([[0.7, -1.2]], dtype=torch.float64), 0.6, 0.7
    model = P.ScoreModel(_GaussianOracle(sde, parametrization, mu, c, sd), sde, parametrization, sigma_data=sd)
    t = _times(sde, 200, gen).clamp(max=sde.T * 0.9)
    a, sig = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    v = a**2 * c**2 + sig**2
    x = a * mu + v.sqrt() * torch.randn(200, 2, generator=gen, dtype=torch.float64)
    score = -(x - a * mu) / v
    x0 = mu + a * c**2 * (x - a * mu) / v
    torch.testing.assert_close(model(x, t), score, rtol=1e-6, atol=1e-6 * score.abs().max().item())
    torch.testing.assert_close(model.output(x, t, "x0"), x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.output(x, t, "eps"), (x - a * x0) / sig, rtol=1e-6, atol=1e-6)


def test_score_model_input_is_unit_scale_for_every_sde(gen):
    """With x0 of mean square sigma_data^2 per coordinate the network input c_in x_t has unit second moment at all
    t, VE and contractive included: centred data of std sigma_data, and data of mean 0.3 and std 0.4 (Monte Carlo,
    20,000 draws: the second moment's standard error is about 0.01)."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x, c):
            seen.append(x)
            return torch.zeros_like(x)

    for sde in (VP(), VE(), ContractiveVP(), VEEDM()):
        model = P.ScoreModel(Probe(), sde, "eps", sigma_data=0.5)
        for tv in (sde.t_min, 0.5 * sde.T, sde.T):
            for mean, std in ((0.0, 0.5), (0.3, 0.4)):  # mean square 0.25 = sigma_data^2 both
                x0 = mean + std * torch.randn(20000, 2, generator=gen, dtype=torch.float64)
                xt = sde.sample_marginal(x0, torch.full((20000,), tv, dtype=torch.float64), torch.randn_like(x0))
                model(xt, torch.full((20000,), tv, dtype=torch.float64))
                assert abs(seen[-1].pow(2).mean().item() - 1) < 0.05


@pytest.mark.parametrize("c_noise", P.C_NOISE)
def test_score_model_conditions_the_network_on_its_c_noise(c_noise):
    """"time" hands the network t itself; "log_sigma" EDM's log(s) / 4 at s = sigma / alpha, here against VP's
    closed form sigma / alpha = sqrt(exp(B(t)) - 1), B(t) = beta_min t + (beta_max - beta_min) t^2 / 2."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x, c):
            seen.append(c)
            return torch.zeros_like(x)

    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    for parametrization in ("eps", "x0", "edm"):
        P.ScoreModel(Probe(), VP(), parametrization, c_noise=c_noise)(torch.zeros(4, 2, dtype=torch.float64), t)
        big_b = 0.1 * t + 19.9 * t**2 / 2
        expect = t if c_noise == "time" else 0.25 * torch.log(torch.sqrt(torch.expm1(big_b)))
        torch.testing.assert_close(seen[-1], expect, rtol=1e-12, atol=1e-12)


def test_score_model_bad_input():
    with pytest.raises(ValueError, match="c_noise must be one of 'log_sigma', 'time', got 't'"):
        P.ScoreModel(nn.Linear(2, 2), VP(), "eps", c_noise="t")
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="parametrization must be one of"):
        P.ScoreModel(net, VP(), "v")
    with pytest.raises(ValueError, match="only 'score'"):
        P.ScoreModel(net, Langevin(lambda x: 0.5 * x.pow(2).sum(1)), "eps")
    with pytest.raises(ValueError, match="sigma_data"):
        P.ScoreModel(net, VP(), "edm", sigma_data=-1.0)
    with pytest.raises(ValueError, match="dst must be one of"):
        P.convert(torch.zeros(1, 2), "score", "v", torch.zeros(1, 2), 1.0, 1.0)
    # 'score' parametrization works without (alpha, sigma), e.g. for Langevin
    m = P.ScoreModel(lambda_net := _Echo(), Langevin(lambda x: 0.5 * x.pow(2).sum(1)), "score")
    x = torch.randn(4, 2)
    assert torch.equal(m(x, torch.rand(4)), x) and lambda_net is m.net


class _Echo(nn.Module):
    def forward(self, x, c):
        return x
