"""Tests for scoresde.consistency against closed forms, Monte Carlo and the papers' formulas."""
import copy
import math

import pytest
import torch
from torch import nn

from scoresde.core import sde as S
from scoresde.core.targets import GaussianMixture
from scoresde.learning.networks import EMA
from scoresde.models.consistency import (
    ConsistencyOptions,
    cd_pair,
    consistency_loss,
    ct_pair,
    distance,
    improved_ct_steps,
    lognormal_index_probs,
)
from scoresde.sampling.consistency import (
    ConsistencyModel,
    consistency_sample,
    consistency_scalings,
    consistency_times,
    effective_sigma,
    multistep_times,
)
from scoresde.sampling.ode import pf_step

LINEAR = [S.VP(), S.VE(), S.VEEDM(), S.SubVP(), S.OU(), S.ContractiveOU(), S.ContractiveVP()]
D64 = torch.float64


class TinyNet(nn.Module):
    """A random non-zero network net(x, c) so that c_out F does not vanish."""

    def __init__(self, dim: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim + 1, dim, generator=g, dtype=D64))

    def forward(self, x, c):
        return torch.tanh(torch.cat([x, c[:, None]], 1) @ self.w) + 1.0


def gaussian_flow_map(sde, m, v):
    """Exact probability-flow map x_t -> x_{t_min} for N(m, diag(v)): per coordinate
    x_{t_min} = alpha_min m + sqrt(C_min / C_t) (x_t - alpha_t m), C_t = alpha_t^2 v + sigma_t^2."""
    def f(x, t):
        t = S.batch_time(t, x)
        tm = torch.full_like(t, sde.t_min)
        a, s, a0, s0 = (v_[:, None] for v_ in (sde.alpha(t), sde.sigma(t), sde.alpha(tm), sde.sigma(tm)))
        return a0 * m + torch.sqrt((a0**2 * v + s0**2) / (a**2 * v + s**2)) * (x - a * m)
    return f


@pytest.mark.parametrize("sde", LINEAR, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_boundary_condition_exact(sde, dtype, gen):
    model = ConsistencyModel.from_net(TinyNet().to(dtype), sde, sigma_data=0.7)
    x = 3 * torch.randn(64, 2, generator=gen, dtype=dtype)
    assert torch.equal(model(x, sde.t_min), x)
    assert torch.equal(model(x, torch.full((64,), sde.t_min, dtype=dtype)), x)
    # away from t_min the network does contribute
    assert (model(x, sde.T) - x).abs().max() > 1e-3


@pytest.mark.parametrize("sde", LINEAR, ids=lambda s: type(s).__name__)
def test_parametrisation_continuous_in_t(sde, gen):
    model = ConsistencyModel.from_net(TinyNet(), sde, sigma_data=0.5)
    x = torch.randn(8, 2, generator=gen, dtype=D64)
    # at the boundary |f(x, t_min + h) - x| -> 0 like C h: the difference quotients settle to a finite C
    hs = torch.logspace(-3, -12, 10, dtype=D64) * (sde.T - sde.t_min)
    err = torch.stack([(model(x, sde.t_min + h) - x).abs().max() for h in hs]).detach()
    slope = err / hs
    assert torch.all(err[1:] < err[:-1]) and err[-1] < 1e-8
    assert abs(slope[-1] / slope[-2] - 1) < 1e-2 and slope[-1] < 1e4
    # and at interior times
    for t in torch.tensor([0.1, 0.5, 0.9], dtype=D64) * sde.T:
        jump = (model(x, t * (1 + 1e-9)) - model(x, t)).abs().max()
        assert jump < 1e-6


def test_reduces_to_cm_edm_form(gen):
    """For VE-EDM (alpha = 1, sigma = t) the model is CM's (2303.01469 eq. 26 and appendix C, sigma_min = eps):
    f = sd^2/((t - eps)^2 + sd^2) x + sd (t - eps)/sqrt(sd^2 + t^2) F(x / sqrt(t^2 + sd^2), log(t) / 4)."""
    sde, sd, eps = S.VEEDM(), 0.5, S.VEEDM().t_min
    t = torch.tensor([0.002, 0.01, 0.3, 2.0, 80.0], dtype=D64)
    c_skip, c_out = consistency_scalings(sde, t, sd)
    torch.testing.assert_close(c_skip, sd**2 / ((t - eps) ** 2 + sd**2))
    torch.testing.assert_close(c_out, sd * (t - eps) / torch.sqrt(sd**2 + t**2))
    net = TinyNet()
    x = 10 * torch.randn(5, 2, generator=gen, dtype=D64)
    want = c_skip[:, None] * x + c_out[:, None] * net(x / torch.sqrt(t**2 + sd**2)[:, None], torch.log(t) / 4)
    torch.testing.assert_close(ConsistencyModel.from_net(net, sde, sd)(x, t), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sde", LINEAR, ids=lambda s: type(s).__name__)
def test_consistency_times_are_the_rho_schedule_in_sigma_over_alpha(sde):
    n, rho = 9, 7.0
    t = consistency_times(sde, n, rho)
    assert t[0] == sde.t_min and t[-1] == sde.T and torch.all(t[1:] > t[:-1])
    s = effective_sigma(sde, t)
    lo, hi = s[0] ** (1 / rho), s[-1] ** (1 / rho)
    want = (lo + torch.arange(n + 1, dtype=D64) / n * (hi - lo)) ** rho
    torch.testing.assert_close(s, want, rtol=1e-8, atol=0)


def test_t618_point_mass_ct_vs_cd_pairs_monte_carlo(gen):
    """T 6.18: VE with g = sqrt(2t), p_0 = delta_{x0}. The exact score is -(x - x0)/t^2 and the
    flow is x_t = x0 + t z, so one Euler teacher step is exact: the CD pair is (x0 + t' z, x0 + t z).
    CT with independent noise z' ("wrong coupling") gives x0 + t z', and
        E|x_t^CT - x_t^CD|^2 = 2 t^2 d,   E|x_{t'} - x_t^CT|^2 = (t'^2 + t^2) d,   E|x_{t'} - x_t^CD|^2 = (t' - t)^2 d;
    with the coupled noise of consistency training the two pairs coincide."""
    sde, d, n = S.VEEDM(), 3, 40000
    x0 = torch.tensor([0.5, -1.0, 2.0], dtype=D64).expand(n, d)
    score = lambda x, t: -(x - x0) / t[:, None] ** 2
    t, t_next = torch.full((n,), 0.8, dtype=D64), torch.full((n,), 1.1, dtype=D64)
    z, z2 = torch.randn(2, n, d, generator=gen, dtype=D64)
    xn_cd, x_cd = cd_pair(sde, score, x0, t, t_next, z, solver="euler")
    xn_ct, x_ct = ct_pair(sde, x0, t, t_next, z, noise_t=z2)
    torch.testing.assert_close(xn_cd, xn_ct)
    for dist, want, var in [((x_ct - x_cd), 2 * 0.8**2 * d, 8 * d * 0.8**4),
                            ((xn_ct - x_ct), (1.1**2 + 0.8**2) * d, 2 * d * (1.1**2 + 0.8**2) ** 2),
                            ((xn_cd - x_cd), (1.1 - 0.8) ** 2 * d, 2 * d * (1.1 - 0.8) ** 4)]:
        est = dist.pow(2).sum(1).mean()
        assert abs(est - want) < 5 * math.sqrt(var / n), (est, want)
    _, x_ct_coupled = ct_pair(sde, x0, t, t_next, z)
    torch.testing.assert_close(x_ct_coupled, x_cd, rtol=0, atol=1e-12)


def test_ct_vs_cd_pair_gaussian_closed_form(gen):
    """Generalisation of T 6.18 to p_0 = N(m, s0^2 I) under VE-EDM with coupled noise and an Euler step
    of the exact score -(x - m)/(s0^2 + t'^2):  x_t^CD - x_t^CT = (t - t')/(s0^2 + t'^2) (t'(x0 - m) - s0^2 z),
    so E|x_t^CD - x_t^CT|^2 = d (t' - t)^2 s0^2 / (s0^2 + t'^2) (zero for a point mass)."""
    sde, d, n, s0 = S.VEEDM(), 2, 40000, 0.6
    m = torch.tensor([1.0, -2.0], dtype=D64)
    target = GaussianMixture(torch.ones(1), m[None], s0**2 * torch.eye(d, dtype=D64)[None])
    x0 = target.sample(n, gen)
    z = torch.randn(n, d, generator=gen, dtype=D64)
    tp, tn = 1.3, 0.9
    t, t_next = torch.full((n,), tn, dtype=D64), torch.full((n,), tp, dtype=D64)
    _, x_cd = cd_pair(sde, target.score_fn(sde), x0, t, t_next, z, solver="euler")
    _, x_ct = ct_pair(sde, x0, t, t_next, z)
    sq = (x_cd - x_ct).pow(2).sum(1)
    v = (tp - tn) ** 2 * s0**2 / (s0**2 + tp**2)
    assert abs(sq.mean() - d * v) < 5 * math.sqrt(2 * d * v**2 / n)


@pytest.mark.parametrize("sde", [S.VP(), S.VEEDM(), S.ContractiveVP()], ids=lambda s: type(s).__name__)
def test_pf_step_converges_to_exact_flow(sde):
    """Heun is second order, Euler first order, against the Gaussian closed-form flow."""
    m, v = torch.tensor([0.5, -1.0], dtype=D64), torch.tensor([0.3, 2.0], dtype=D64)
    target = GaussianMixture(torch.ones(1), m[None], torch.diag(v)[None])
    phi = gaussian_flow_map(sde, m, v)
    x = target.at_time(sde, 0.5 * sde.T).sample(16, torch.Generator().manual_seed(3))
    t0, t1 = 0.5 * sde.T, 0.3 * sde.T
    # exact flow t0 -> t1 composed through t_min: Phi_{t1}^{-1}(Phi_{t0}(x)) is affine, invert per coordinate
    tb = lambda t: torch.full((16,), t, dtype=D64)
    y = phi(x, tb(t0))
    a1, s1 = sde.alpha(tb(t1))[:, None], sde.sigma(tb(t1))[:, None]
    a0, s0 = sde.alpha(tb(sde.t_min))[:, None], sde.sigma(tb(sde.t_min))[:, None]
    exact = a1 * m + torch.sqrt((a1**2 * v + s1**2) / (a0**2 * v + s0**2)) * (y - a0 * m)
    errs = {}
    for solver in ("euler", "heun"):
        errs[solver] = []
        for k in (8, 16):
            ts = torch.linspace(t0, t1, k + 1, dtype=D64)
            z = x
            for a, b in zip(ts[:-1], ts[1:]):
                z = pf_step(sde, target.score_fn(sde), z, a, b, solver)
            errs[solver].append(float((z - exact).abs().max()))
    assert 1.6 < errs["euler"][0] / errs["euler"][1] < 2.4
    assert 3.2 < errs["heun"][0] / errs["heun"][1] < 4.8


def test_distance():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=D64)
    b = torch.zeros(2, 2, dtype=D64)
    torch.testing.assert_close(distance(a, b, "l2"), torch.tensor([25.0, 0.0], dtype=D64))
    torch.testing.assert_close(distance(a, b, "pseudo_huber", c=1.0), torch.tensor([math.sqrt(26) - 1, 0.0], dtype=D64))
    c_default = 0.00054 * math.sqrt(2)
    torch.testing.assert_close(distance(a, b, "pseudo_huber"), torch.tensor([math.sqrt(25 + c_default**2) - c_default, 0.0],
                                                                            dtype=D64))
    with pytest.raises(ValueError, match="distance"):
        distance(a, b, "l1")
    with pytest.raises(ValueError, match="c must"):
        distance(a, b, "pseudo_huber", c=0.0)


def test_improved_ct_curriculum():
    """iCT (2310.14189 Sec. 3.4): with s0 = 10, s1 = 1280 and K = 400k, N doubles every 50k steps, 8 stages."""
    K = 400_000
    stages = [improved_ct_steps(k, K) for k in range(0, K, 50_000)]
    assert stages == [10, 20, 40, 80, 160, 320, 640, 1280]
    assert improved_ct_steps(49_999, K) == 10 and improved_ct_steps(K - 1, K) == 1280
    assert improved_ct_steps(10 * K, K) == 1280
    with pytest.raises(ValueError, match="s0"):
        improved_ct_steps(0, K, s0=20, s1=10)


def test_lognormal_index_probs_match_monte_carlo(gen):
    """p(n) = P(log s in [log s_n, log s_{n+1}) | log s in the grid), log s ~ N(P_mean, P_std^2)."""
    sde = S.VEEDM()
    s = effective_sigma(sde, consistency_times(sde, 20))
    p = lognormal_index_probs(s)
    draws = -1.1 + 2.0 * torch.randn(400_000, generator=gen, dtype=D64)
    draws = draws[(draws >= s[0].log()) & (draws < s[-1].log())]
    counts = torch.bucketize(draws, s.log(), right=True) - 1
    freq = torch.bincount(counts, minlength=20).to(D64) / len(draws)
    assert torch.all((freq - p).abs() < 5 * torch.sqrt(p * (1 - p) / len(draws)) + 1e-12)


class Oracle(nn.Module):
    """A module computing a fixed function, with one dummy parameter for the EMA machinery."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.w = fn, nn.Parameter(torch.zeros((), dtype=D64))

    def forward(self, x, t):
        return self.fn(x, t) + self.w


@pytest.mark.parametrize("mode", ["cd", "ct"])
def test_loss_vanishes_at_the_exact_consistency_function_of_a_point_mass(mode, gen):
    """Under VE-EDM with p_0 = delta_{x0}, f(x, t) = x0 + (t_min / t)(x - x0) is the exact consistency
    function, Euler steps are exact and CT pairs equal CD pairs: both losses are 0. Any mismatch of the
    times t_n, t_{n+1} with the points would not be."""
    sde = S.VEEDM()
    x0 = torch.tensor([[0.3, -0.7]], dtype=D64).expand(256, 2)
    exact = Oracle(lambda x, t: x0[: len(x)] + (sde.t_min / t)[:, None] * (x - x0[: len(x)]))
    score = lambda x, t: -(x - x0[: len(x)]) / t[:, None] ** 2
    opts = ConsistencyOptions(mode, n_steps=12, solver="euler")
    teacher = score if mode == "cd" else None
    assert consistency_loss(sde, opts, exact, exact, x0, 0, teacher=teacher, generator=gen).abs().max() < 1e-20
    wrong = Oracle(lambda x, t: x)  # the identity: loss = (t_{n+1} - t_n)^2 |z|^2
    assert consistency_loss(sde, opts, wrong, wrong, x0, 0, teacher=teacher, generator=gen).mean() > 1e-6
    # the target is what is passed: the exact model against the identity as theta^- is not consistent
    assert consistency_loss(sde, opts, exact, wrong, x0, 0, teacher=teacher, generator=gen).mean() > 1e-6


def test_gradient_flows_through_the_model_only(gen):
    """With target = model (iCT's stop-gradient target) the gradient is that of d(f_theta(x_{n+1}), const):
    the same as with a frozen copy of the model as target."""
    sde = S.VEEDM()
    model = ConsistencyModel.from_net(TinyNet(), sde)
    frozen = copy.deepcopy(model).requires_grad_(False)
    x0 = torch.randn(8, 2, generator=gen, dtype=D64)
    opts = ConsistencyOptions("ct", n_steps=5)
    grads = []
    for target in (model, frozen):
        model.zero_grad()
        consistency_loss(sde, opts, model, target, x0, 0, generator=torch.Generator().manual_seed(1)).sum().backward()
        grads.append(model.model.net.w.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
    assert frozen.model.net.w.grad is None


def test_step_sets_the_curriculum(gen):
    """The step passed in selects N(k) of iCT's curriculum: the times drawn are exactly the first N(k)
    points of the N(k)-interval grid (t_n) and the last N(k) (t_{n+1})."""
    sde = S.VEEDM()
    opts = ConsistencyOptions("ct", n_steps=2, max_steps=16, curriculum="improved", total_steps=100)
    seen = {"model": [], "target": []}

    def spy(key):
        return lambda x, t: (seen[key].append(t), x)[1]

    x0 = torch.zeros(4000, 1, dtype=D64)
    for step, n in ((0, 2), (24, 2), (25, 4), (50, 8), (99, 16)):  # K' = floor(100 / (log2 8 + 1)) = 25
        assert opts.intervals(step) == n
        seen = {"model": [], "target": []}
        consistency_loss(sde, opts, spy("model"), spy("target"), x0, step, generator=gen)
        grid = consistency_times(sde, n)
        torch.testing.assert_close(seen["target"][0].unique(), grid[:-1], rtol=0, atol=0)
        torch.testing.assert_close(seen["model"][0].unique(), grid[1:], rtol=0, atol=0)


def test_loss_with_an_ema_target_matches_its_own_ema_loop(gen):
    """The caller's EMA target: after k optimiser steps theta^- = EMA_k, so two identical loops, one
    passing a copy of the EMA weights and one recomputing theta^- = decay theta^- + (1 - decay) theta by
    hand, give the same losses."""
    sde = S.VP()
    x0 = torch.randn(16, 2, generator=gen, dtype=D64)
    opts = ConsistencyOptions("ct", n_steps=6)
    losses = []
    for by_hand in (False, True):
        torch.manual_seed(0)
        model = ConsistencyModel.from_net(TinyNet(), sde)
        target = copy.deepcopy(model).requires_grad_(False)
        ema = EMA(model, 0.9)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g, out = torch.Generator().manual_seed(3), []
        for step in range(3):
            loss = consistency_loss(sde, opts, model, target, x0, step, generator=g).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
            if by_hand:
                with torch.no_grad():
                    for p_t, p in zip(target.parameters(), model.parameters()):
                        p_t.mul_(0.9).add_(0.1 * p)
            else:
                ema.update()
                target.load_state_dict(ema.shadow)
        losses.append(out)
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert len(set(losses[0])) == 3


@pytest.mark.parametrize("sde", [S.VP(), S.VEEDM(), S.ContractiveOU()], ids=lambda s: type(s).__name__)
def test_sampling_with_exact_flow_map_has_the_exact_law(sde, gen):
    """With f = the exact Gaussian flow map, one-step and multistep sampling from X_T ~ p_T both return
    X_{t_min} ~ N(alpha_min m, alpha_min^2 v + sigma_min^2): the renoising step is the exact kernel."""
    m, v = torch.tensor([0.5, -1.0], dtype=D64), torch.tensor([0.3, 2.0], dtype=D64)
    target = GaussianMixture(torch.ones(1), m[None], torch.diag(v)[None])
    phi, n = gaussian_flow_map(sde, m, v), 40000
    x_T = target.at_time(sde, sde.T).sample(n, gen)
    tm = torch.tensor(sde.t_min, dtype=D64)
    mean, var = sde.alpha(tm) * m, sde.alpha(tm) ** 2 * v + sde.sigma(tm) ** 2
    seen = []
    for steps in (1, 3):
        x = consistency_sample(phi, sde, x_T, steps=steps, generator=gen, callback=lambda i, t, x: seen.append(i))
        assert torch.all((x.mean(0) - mean).abs() < 5 * torch.sqrt(var / n))
        assert torch.all((x.var(0) / var - 1).abs() < 5 * math.sqrt(2 / n))
    assert seen == [0, 0, 1, 2]
    ts = multistep_times(sde, 3)
    assert ts[0] == sde.T and torch.all(ts[1:] < ts[:-1]) and ts[-1] > sde.t_min
    with pytest.raises(ValueError, match="times"):
        consistency_sample(phi, sde, x_T, times=torch.tensor([0.5, 0.7]) * sde.T)


def test_registered_sampler_method(gen):
    """samplers.sample(method="consistency", nfe=k, denoise=False) is k-step consistency sampling,
    and a ScoreModel with parametrization x0 (a consistency run's checkpoint) is wrapped."""
    from scoresde.core.precond import ScoreModel
    from scoresde.sampling import sample

    sde = S.VP()
    cm = ConsistencyModel.from_net(TinyNet(), sde, 0.5)
    x_T = sde.prior_sample((100, 2), dtype=D64, generator=gen)
    for k in (1, 2, 4):
        want = consistency_sample(cm, sde, x_T, steps=k, generator=torch.Generator().manual_seed(k))
        for model in (cm, cm.model):
            got = sample(sde, model, None, x_T=x_T, method="consistency", nfe=k, denoise=False,
                         generator=torch.Generator().manual_seed(k))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="denoise"):
        sample(sde, cm, None, x_T=x_T, method="consistency", nfe=2, denoise=True)
    with pytest.raises(ValueError, match="x0"):
        sample(sde, ScoreModel(TinyNet(), sde, "eps"), None, x_T=x_T, method="consistency", nfe=2, denoise=False)


def test_distillation_learns_exact_gaussian_flow_map():
    """CD from the exact score of a 2-D Gaussian under VP (Heun teacher, N = 18, 500 Adam steps): the
    model's one-step map matches the closed-form flow map x_t -> x_{t_min} with relative RMS error
    < 4% over t on the grid and x_t ~ p_t (it starts at 75%; the posterior mean E[x0 | x_t], which a
    denoiser would learn instead, is off by far more at large t)."""
    from scoresde.learning.networks import MLP

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    sde = S.VP()
    m, v = torch.tensor([0.5, -1.0], dtype=D64), torch.tensor([0.3, 2.0], dtype=D64)
    target = GaussianMixture(torch.ones(1), m[None], torch.diag(v)[None])
    model = ConsistencyModel.from_net(MLP(2, hidden=64, depth=2, emb_dim=32), sde, sigma_data=1.0)
    opts = ConsistencyOptions("cd", n_steps=18, solver="heun")
    ema = EMA(model, 0.95)
    theta_minus = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(500):
        loss = consistency_loss(sde, opts, model, theta_minus, target.sample(256, gen).float(), step,
                                teacher=target.score_fn(sde), generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        theta_minus.load_state_dict(ema.shadow)
    t = consistency_times(sde, 18)[1:].repeat_interleave(200)
    x_t = target.at_time(sde, t).sample(len(t), gen)
    exact = gaussian_flow_map(sde, m, v)(x_t, t)
    with torch.no_grad():
        err = (model(x_t.float(), t.float()).double() - exact).pow(2).sum(1).mean().sqrt()
    assert err / exact.pow(2).sum(1).mean().sqrt() < 0.04
    posterior_mean = target.at_time(sde, t).score(x_t)  # Tweedie, for contrast
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    denoiser_err = ((x_t + s**2 * posterior_mean) / a - exact).pow(2).sum(1).mean().sqrt()
    assert denoiser_err > 5 * err


def test_bad_input():
    sde = S.VP()
    with pytest.raises(ValueError, match="sigma_data"):
        ConsistencyModel.from_net(TinyNet(), sde, sigma_data=0.0)
    with pytest.raises(ValueError, match="linear SDE|LinearSDE"):
        ConsistencyModel.from_net(TinyNet(), S.Langevin(lambda x: x.pow(2).sum(1)))
    with pytest.raises(ValueError, match="t must lie"):
        ConsistencyModel.from_net(TinyNet(), sde)(torch.zeros(3, 2, dtype=D64), 0.0)
    x0, f = torch.zeros(3, 2), lambda x, t: x
    with pytest.raises(ValueError, match="teacher must be a score_fn for mode 'cd'"):
        consistency_loss(sde, ConsistencyOptions("cd"), f, f, x0, 0)
    with pytest.raises(ValueError, match="teacher"):
        consistency_loss(sde, ConsistencyOptions("ct"), f, f, x0, 0, teacher=f)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        consistency_loss(sde, ConsistencyOptions("ct"), f, f, x0, -1)
    for bad, match in [(dict(mode="xx"), "mode must be one of 'cd', 'ct'"),
                       (dict(curriculum="improved"), "total_steps"), (dict(total_steps=0), "total_steps"),
                       (dict(solver="rk4"), "solver"), (dict(distance="l1"), "distance"), (dict(index="x"), "index"),
                       (dict(weighting="x"), "weighting"), (dict(n_steps=0), "n_steps must be an integer >= 1"),
                       (dict(n_steps=8, max_steps=4), "max_steps must be an integer >= 8"),
                       (dict(huber_c=0.0), "huber_c"), (dict(p_std=-1.0), "p_std"), (dict(rho=float("nan")), "rho")]:
        with pytest.raises(ValueError, match=match):
            ConsistencyOptions(**bad)
    with pytest.raises(ValueError, match="solver"):
        pf_step(sde, lambda x, t: x, torch.zeros(2, 2), 0.5, 0.4, "rk4")
    with pytest.raises(ValueError, match="n_steps"):
        consistency_times(sde, 0)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_pf_step_is_the_samplers_step(solver, gen):
    """The distillation teacher's step (per-sample times) and the ODE samplers' step on a grid are one
    scheme: chaining pf_step along the grid reproduces ode_euler / heun (no final denoise)."""
    from scoresde.sampling.ode import heun, ode_euler

    sde = S.VP()
    target = GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0]], dtype=D64), torch.diag(torch.tensor([0.3, 2.0],
                                                                                                           dtype=D64))[None])
    ts = torch.linspace(sde.T, 0.05, 9, dtype=D64)
    x_T = sde.prior_sample((16, 2), dtype=D64, generator=gen)
    x = x_T
    for a, b in zip(ts[:-1], ts[1:]):
        x = pf_step(sde, target.score_fn(sde), x, a.expand(16), b.expand(16), solver)
    sampler = {"euler": ode_euler, "heun": heun}[solver]
    torch.testing.assert_close(x, sampler(sde, target.score_fn(sde), x_T, ts, denoise=False), rtol=1e-13, atol=1e-13)
