"""Likelihood through the probability-flow ODE against exact densities (DESIGN section 6)."""
import math

import pytest
import torch

from scoresde.core import sde as S
from scoresde.core.targets import GaussianMixture, random_mixture, ring
from scoresde.sampling.likelihood import (
    bits_per_dim,
    dequantize,
    evaluate_likelihood,
    is_8bit,
    log_likelihood,
    pixel_values,
)

F64 = torch.float64


def _gaussian(mean, var) -> GaussianMixture:
    mean, var = torch.as_tensor(mean, dtype=F64), torch.as_tensor(var, dtype=F64)
    return GaussianMixture(torch.ones(1), mean[None], torch.diag(var)[None])


@pytest.mark.parametrize("sde", [S.VP(), S.VE()], ids=["VP", "VE"])
@pytest.mark.parametrize("mix", [ring(), random_mixture(16, 8, seed=0)], ids=["ring2d", "mixture16d"])
def test_exact_divergence_matches_mixture_log_prob(sde, mix, gen):
    x = mix.sample(6, gen)
    logp, info = log_likelihood(sde, mix.score_fn(sde), x)
    exact = mix.at_time(sde, sde.t_min).log_prob(x)
    assert (logp - exact).abs().max() < 0.01 * mix.dim
    # The ODE alone (prior mismatch removed with the exact p_T) is tighter still.
    ode = mix.at_time(sde, sde.T).log_prob(info["x_T"]) + info["delta_logp"]
    assert (ode - exact).abs().max() < 0.002 * mix.dim
    assert torch.allclose(logp, info["prior_logp"] + info["delta_logp"])
    assert info["nfe"] > 10 and info["t_min"] == sde.t_min


@pytest.mark.parametrize("time_variable", ["t", "log_snr"])
def test_time_variables_agree_at_other_t_min(time_variable, gen):
    mix, sde = ring(), S.SubVP()
    x = mix.sample(4, gen)
    logp, _ = log_likelihood(sde, mix.score_fn(sde), x, t_min=0.05, time_variable=time_variable)
    assert (logp - mix.at_time(sde, 0.05).log_prob(x)).abs().max() < 0.02


@pytest.mark.parametrize("divergence", ["hutchinson-gaussian", "hutchinson-rademacher"])
def test_hutchinson_is_unbiased(divergence, gen):
    mix, sde = random_mixture(16, 8, seed=0), S.VP()
    reps = 48
    x = mix.sample(2, gen).repeat_interleave(reps, 0)  # every row gets its own probe
    est, _ = log_likelihood(sde, mix.score_fn(sde), x, divergence=divergence, n_probes=2, generator=gen)
    ref, _ = log_likelihood(sde, mix.score_fn(sde), x[::reps])
    est = est.reshape(2, reps)
    se = est.std(1) / math.sqrt(reps)
    assert (se > 1e-3).all()  # the estimator is random, so the check has power
    assert ((est.mean(1) - ref).abs() < 4 * se + 0.02).all()


def _gaussian_closed_form(sde, mean, var, x, t_min):
    """PF-ODE flow of N(m, diag c): x_t = alpha_t m + sqrt(v_t / v_0) (x - alpha_0 m), v_t = alpha_t^2 c + sigma_t^2."""
    t0, t1 = torch.tensor(t_min, dtype=F64), torch.tensor(sde.T, dtype=F64)
    v0, v1 = sde.alpha(t0) ** 2 * var + sde.sigma(t0) ** 2, sde.alpha(t1) ** 2 * var + sde.sigma(t1) ** 2
    x_T = sde.alpha(t1) * mean + (v1 / v0).sqrt() * (x - sde.alpha(t0) * mean)
    delta = 0.5 * torch.log(v1 / v0).sum()
    return sde.prior_logp(x_T) + delta, x_T


@pytest.mark.parametrize("time_variable", ["t", "log_snr"])
@pytest.mark.parametrize("sde", [S.VP(), S.VE(), S.ContractiveOU(), S.ContractiveVP()],
                         ids=["VP", "VE", "cOU", "cVP"])
def test_gaussian_closed_form(sde, time_variable, gen):
    mean, var = torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.tensor([0.3, 1.5, 0.05], dtype=F64)
    target = _gaussian(mean, var)
    x = target.sample(5, gen)
    logp, info = log_likelihood(sde, target.score_fn(sde), x, time_variable=time_variable, rtol=1e-7, atol=1e-7)
    want, x_T = _gaussian_closed_form(sde, mean, var, x, sde.t_min)
    assert torch.allclose(info["x_T"], x_T, rtol=1e-4, atol=1e-4 * sde.prior_std)
    assert torch.allclose(logp, want, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(divergence="exactly"), "divergence"), (dict(n_probes=0), "n_probes"),
    (dict(solver="euler"), "solver"), (dict(rtol=0.0), "rtol"), (dict(atol=float("nan")), "atol"),
    (dict(t_min=0.0), "t_min"), (dict(t_min=1.0), "t_min"), (dict(time_variable="sigma"), "time_variable"),
])
def test_bad_arguments(kwargs, match):
    mix = ring()
    with pytest.raises(ValueError, match=match):
        log_likelihood(S.VP(), mix.score_fn(S.VP()), torch.zeros(2, 2, dtype=F64), **kwargs)


@pytest.mark.parametrize("x, match", [(torch.zeros(3), "x must"), (torch.zeros(2, 2, dtype=torch.long), "x must"),
                                      (torch.full((2, 2), float("inf")), "finite")])
def test_bad_inputs(x, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(S.VP(), lambda x, t: -x, x)
    langevin = S.Langevin(lambda x: 0.5 * x.pow(2).sum(1))
    with pytest.raises(ValueError, match="LinearSDE"):
        log_likelihood(langevin, lambda x, t: -x, torch.zeros(2, 2))


def test_dequantize_cells(gen):
    k = torch.randint(0, 256, (50, 3, 4, 4), generator=gen, dtype=torch.uint8)
    x = dequantize(k, torch.Generator().manual_seed(0))
    centre = k.double() / 127.5 - 1
    assert ((x - centre).abs() <= 0.5 / 127.5).all()
    assert (x - centre).std() == pytest.approx(1 / (127.5 * math.sqrt(12)), rel=0.05)
    assert torch.equal(dequantize(centre.float(), torch.Generator().manual_seed(0)), x)
    for bad in (k.double() / 255.0, torch.full((2, 3), 256), torch.zeros(2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="images"):
            dequantize(bad)


def _discrete_bpd(k, mean, std):
    """Exact -log2 P(k) / D for a Gaussian density N(mean, std^2) on x, cells centred on k / 127.5 - 1."""
    normal = torch.distributions.Normal(mean, std)
    lo, hi = (k.double() - 0.5) / 127.5 - 1, (k.double() + 0.5) / 127.5 - 1
    logp = torch.log(normal.cdf(hi) - normal.cdf(lo)).flatten(1).sum(1)
    return -logp / (k[0].numel() * math.log(2))


def test_bits_per_dim_offset_matches_discrete_probability(gen):
    """Without decoder the bound is E_u log p_{t_min} at dequantised points; for a broad Gaussian the Jensen
    gap is ~1e-5 bits, so the offset log2(127.5) must be right to pass (log2(128) would be 5.6e-3 off)."""
    sde, s, t_min, reps = S.VP(), 0.4, 1e-3, 64
    t = torch.tensor(t_min, dtype=F64)
    target = _gaussian(torch.zeros(12), torch.full((12,), s**2))
    k = ((target.sample(2, gen) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).reshape(2, 3, 2, 2)
    images = k.repeat_interleave(reps, 0)  # average over the dequantisation noise u
    bpd, info = bits_per_dim(sde, lambda x, t: target.score_fn(sde)(x.flatten(1), t).reshape(x.shape), images,
                             decoder="none", generator=gen, rtol=1e-7, atol=1e-7)
    assert bpd.shape == (2 * reps,) and torch.isfinite(info["logp_x"]).all()
    bpd = bpd.reshape(2, reps)
    std_t = torch.sqrt(sde.alpha(t) ** 2 * s**2 + sde.sigma(t) ** 2)
    err = (bpd.mean(1) - _discrete_bpd(k, 0.0, std_t)).abs()
    assert (err < 4 * bpd.std(1) / math.sqrt(reps) + 1e-4).all() and (err < 2e-3).all()


@pytest.mark.parametrize("levels", [256, 17])
def test_gaussian_decoder_bound_closed_form(levels, gen):
    """E_{u,z}[log p_{t_min}(alpha x + sigma z)] + D log alpha for a Gaussian target, in closed form, with cells
    of width 1 / h, h = (L - 1) / 2, centred on the levels k / h - 1 (8-bit: h = 127.5; 17 levels: h = 8)."""
    sde, s, t_min, reps = S.VP(), 0.5, 0.05, 64
    t = torch.tensor(t_min, dtype=F64)
    a, sig = sde.alpha(t), sde.sigma(t)
    h = (levels - 1) / 2
    target = _gaussian(torch.zeros(6), torch.full((6,), s**2))
    k = ((target.sample(1, gen) + 1) * h).round().clamp(0, levels - 1).repeat(reps, 1)
    images = k.to(torch.uint8) if levels == 256 else k / h - 1
    bpd, _ = bits_per_dim(sde, target.score_fn(sde), images, levels=levels, t_min=t_min, generator=gen)
    d, v = 6, a**2 * s**2 + sig**2
    centre = k[0] / h - 1
    sq = (centre**2).sum() + d / (12 * h**2)  # E_u |x|^2 under dequantisation
    elbo = -0.5 * d * torch.log(2 * math.pi * v) - (a**2 * sq + d * sig**2) / (2 * v) + d * torch.log(a)
    want = -elbo / (d * math.log(2)) + math.log2(h)
    assert abs(bpd.mean() - want) < 4 * bpd.std() / math.sqrt(reps)
    if levels == 256:  # the decoded model N(0, s^2 + 2 sigma^2 / alpha^2) has a higher likelihood than its bound
        exact = _discrete_bpd(k[:1].to(torch.uint8), 0.0, torch.sqrt(s**2 + 2 * sig**2 / a**2))
        assert want > exact
    with pytest.raises(ValueError, match="17 grey levels"):
        bits_per_dim(sde, target.score_fn(sde), torch.full((2, 6), 0.01, dtype=F64), levels=17)
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        bits_per_dim(sde, target.score_fn(sde), images, levels=1)


def test_bits_per_dim_of_uniform_noise_under_untrained_network(gen):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    net = net.double()

    def score_fn(x, t):
        return net(torch.cat([x, t.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])], 1))

    images = torch.randint(0, 256, (3, 3, 8, 8), generator=gen, dtype=torch.uint8)
    bpd, info = bits_per_dim(S.VP(), score_fn, images, divergence="hutchinson-rademacher", generator=gen,
                             rtol=1e-3, atol=1e-3)
    assert torch.isfinite(bpd).all() and (bpd > 0).all()
    assert info["nfe"] > 0 and bpd.shape == (3,)


def test_evaluate_likelihood_on_vectors_matches_exact_mean(gen):
    mix, sde = ring(), S.VP()
    x = mix.sample(40, gen)
    out = evaluate_likelihood(sde, mix.score_fn(sde), x, batch_size=16, generator=gen, rtol=1e-4, atol=1e-4)
    nll = -mix.at_time(sde, sde.t_min).log_prob(x)
    assert out["divergence"] == "exact" and not out["eight_bit"] and "bpd" not in out
    assert out["nll"] == pytest.approx(float(nll.mean()), abs=0.01)
    assert out["nll_ci"] == pytest.approx(1.96 * float(nll.std()) / math.sqrt(40), rel=0.05)
    assert out["nll_per_dim"] == pytest.approx(out["nll"] / 2) and out["n"] == 40


def test_evaluate_likelihood_on_8bit_images(gen):
    s = 0.4
    target = _gaussian(torch.zeros(48), torch.full((48,), s**2))
    images = (((target.sample(6, gen) + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1).float().reshape(6, 3, 4, 4)
    sde = S.VP()

    def score_fn(x, t):
        return target.score_fn(sde)(x.flatten(1), t).reshape(x.shape)

    out = evaluate_likelihood(sde, score_fn, images, batch_size=4, generator=gen)
    assert out["eight_bit"] and out["divergence"] == "hutchinson-rademacher"  # 48 > 32 dimensions
    assert out["nll"] == pytest.approx(out["bpd"] * 48 * math.log(2))
    # Gaussian decoder bound for N(0, s^2): near the exact discrete bpd (Rademacher probes are exact on a diagonal Jacobian)
    exact = float(_discrete_bpd(pixel_values(images).to(torch.uint8), 0.0, s).mean())
    assert out["bpd"] == pytest.approx(exact, abs=0.05) and out["bpd_ci"] > 0
    assert not is_8bit(images + 1e-2) and is_8bit(images)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_likelihood(sde, score_fn, images, batch_size=0)


def test_cli_likelihood_on_a_tiny_run(tmp_path):
    import json

    from typer.testing import CliRunner

    from scoresde.cli import app
    from scoresde.running.config import Config
    from scoresde.running.train import Trainer

    cfg = Config(name="r", out=str(tmp_path), data="ring", steps=10, batch_size=32, warmup=2, checkpoint_every=10,
                 eval_every=0, log_every=5, progress=False, n_train=100, n_test=20,
                 net_args={"hidden": 16, "depth": 1, "emb_dim": 8})
    Trainer(cfg).run()
    res = CliRunner().invoke(app, ["likelihood", str(tmp_path / "r"), "--n", "8"])
    assert res.exit_code == 0, res.output
    assert "NLL =" in res.output and "not 8-bit" in res.output
    out = json.loads((tmp_path / "r" / "likelihood.json").read_text())
    assert out["n"] == 8 and out["divergence"] == "exact" and math.isfinite(out["nll"])
    bad = CliRunner().invoke(app, ["likelihood", str(tmp_path / "r"), "--data", "mixture16"])
    assert bad.exit_code == 2 and "shape" in bad.output


def test_default_tolerance_is_accurate_in_the_tails(gen):
    """The default rtol = atol (benchmarks/likelihood_tolerance.py): points 3-4 component standard deviations
    out, in a batch of typical points, within 0.01 nats of the exact log p_{t_min} (the prior mismatch removed
    by the exact p_T), several times closer than with the former default 1e-5."""
    mix, sde = ring(), S.VP()
    k = torch.arange(8) % 8
    tail = mix.means[k] + torch.tensor([3.0] * 4 + [4.0] * 4, dtype=F64)[:, None] * 0.15 * torch.randn(8, 2, generator=gen,
                                                                                                         dtype=F64)
    x = torch.cat([mix.sample(24, gen), tail])
    exact = mix.at_time(sde, sde.t_min).log_prob(x)
    errors = []
    for tol in ({}, {"rtol": 1e-5, "atol": 1e-5}):
        _, info = log_likelihood(sde, mix.score_fn(sde), x, **tol)
        errors.append(float((mix.at_time(sde, sde.T).log_prob(info["x_T"]) + info["delta_logp"] - exact).abs().max()))
    assert errors[0] < 0.01 and errors[0] < errors[1] / 4, errors
