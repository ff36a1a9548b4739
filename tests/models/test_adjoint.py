"""Tests for adjoint matching (models.adjoint), DRaFT-K (models.reward_gradient), DPOK and the reward gradients,
each against an independent truth: Gaussian conditioning of a linear-Gaussian chain, autograd through a
hand-written chain, torch.distributions' KL and closed-form reward gradients."""
import math

import pytest
import torch

from scoresde.core.sde import VP, ContractiveVP
from scoresde.core.targets import GaussianMixture
from scoresde.learning.networks import MLP
from scoresde.models import adjoint as AD
from scoresde.models import alignment as A
from scoresde.models import reward_gradient as RG
from scoresde.models import rewards as R
from scoresde.sampling.grids import time_grid

C = torch.tensor([1.0, -0.5], dtype=torch.float64)
MEAN, VAR = [0.5, -0.3], 0.4


def gaussian(mean=MEAN, var=VAR) -> GaussianMixture:
    return GaussianMixture(torch.ones(1), torch.tensor([mean], dtype=torch.float64),
                           var * torch.eye(2, dtype=torch.float64)[None])


def chain_covariance(sde, grid, var):
    """Covariance (N+1, N+1) of one coordinate of (x_0, ..., x_N) for the EM chain of the exact score of
    N(., var): x_{k+1} = M_k x_k + const + g_k sqrt(h_k) z_k, built from the lower-triangular map of
    (x_0, z_0, ..., z_{N-1}) to the states; and the means' slope products M_k."""
    N = grid.numel() - 1
    L = torch.zeros(N + 1, N + 1, dtype=torch.float64)
    L[0, 0] = sde.prior_std
    M = []
    for k in range(N):
        t, h = grid[k], grid[k] - grid[k + 1]
        M.append(1 + h * (sde.b(t) - sde.diffusion(t) ** 2 / (sde.alpha(t) ** 2 * var + sde.sigma(t) ** 2)))
        L[k + 1] = M[-1] * L[k]
        L[k + 1, k + 1] = sde.diffusion(t) * h.sqrt()
    return L @ L.T


def chain_mean(sde, grid, mean, var):
    """E x_N of the same chain (per coordinate, vector `mean`)."""
    m = torch.zeros(len(mean), dtype=torch.float64)
    for k in range(grid.numel() - 1):
        t, h = grid[k], grid[k] - grid[k + 1]
        D = sde.alpha(t) ** 2 * var + sde.sigma(t) ** 2
        m = m + h * (sde.b(t) * m + sde.diffusion(t) ** 2 * (-(m - sde.alpha(t) * torch.tensor(mean)) / D))
    return m


def optimal_controls(sde, grid, var, beta):
    """The optimal discrete control delta_k = s - s_pre of the chain tilted by exp(c^T x_N / beta), by Gaussian
    conditioning: the tilted transition's mean moves by Cov(x_{k+1}, x_N | x_k) c / beta = g_k^2 h_k delta_k."""
    S, N = chain_covariance(sde, grid, var), grid.numel() - 1
    out = []
    for k in range(N):
        cov = S[k + 1, N] - S[k + 1, k] * S[k, N] / S[k, k]
        g2h = sde.diffusion(grid[k]) ** 2 * (grid[k] - grid[k + 1])
        out.append(cov / g2h * C / beta)
    return torch.stack(out)  # (N, 2)


def shifted(pre, grid, shifts):
    """The score callable s_pre(x, t) + shifts[k] at t = grid[k] (per-sample t)."""
    def score(x, t):
        k = (t[:, None] - grid[None, :-1]).abs().argmin(1)
        return pre(x, t) + shifts[k].to(x)
    return score


# ---------------------------------------------------------------- adjoint matching


def test_lean_adjoint_is_autograd_through_the_pretrained_chain(gen):
    """Along the pretrained chain (model = pretrained) the lean adjoint is -grad_{x_k} r(x_N) / beta through the
    EM chain with its noise fixed: autograd through a hand-written chain, nonlinear score and reward."""
    sde, beta = VP(), 0.7
    mix = GaussianMixture(torch.tensor([0.6, 0.4], dtype=torch.float64),
                          torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=torch.float64),
                          torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]]], dtype=torch.float64))
    pre, grid = mix.score_fn(sde), time_grid(sde, 6, kind="uniform").double()
    reward = R.neg_distance([[0.5, 1.0], [-1.0, -1.0]])
    ro = A.rollout(sde, pre, pre, (5, 2), grid, gen, torch.float64)
    xs = [ro.states[0].clone().requires_grad_(True)]
    for k in range(6):
        t, h = grid[k], grid[k] - grid[k + 1]
        x = xs[-1]
        nxt = x + h * (sde.b(t) * x + sde.diffusion(t) ** 2 * pre(x, t.expand(5))) + sde.diffusion(t) * ro.noise[k]
        xs.append(nxt)
    torch.testing.assert_close(xs[-1].detach(), ro.terminal, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(reward(xs[-1]).sum(), xs, retain_graph=True)
    _, g_terminal = R.value_and_grad(reward, ro.terminal, "adjoint")
    adj = AD.lean_adjoint(sde, pre, ro, -g_terminal / beta)
    assert adj.shape == (7, 5, 2)
    for k in range(7):
        torch.testing.assert_close(adj[k], -grads[k] / beta, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_adjoint_loss_is_zero_exactly_at_the_optimal_control(gen, beta):
    """Gaussian data, linear reward: the lean adjoint is deterministic and -a_{k+1} is the optimal control of the
    chain (Gaussian conditioning); the loss is 0 there, and elsewhere the exact quadratic sum_k g^2 h |e_k|^2 / 2."""
    sde = VP()
    grid = time_grid(sde, 10, kind="uniform").double()
    pre = gaussian().score_fn(sde)
    delta = optimal_controls(sde, grid, VAR, beta)
    model = shifted(pre, grid, delta)
    ro = A.rollout(sde, model, pre, (64, 2), grid, gen, torch.float64)
    adj = AD.lean_adjoint(sde, pre, ro, -C.expand(64, 2) / beta)
    torch.testing.assert_close(-adj[1:], delta[:, None].expand(10, 64, 2), rtol=1e-9, atol=1e-12)
    assert float(AD.adjoint_loss(model, ro, adj)) < 1e-20
    err = torch.randn(10, 2, generator=gen, dtype=torch.float64) * 0.1
    w = sde.diffusion(grid[:-1]) ** 2 * (grid[:-1] - grid[1:]) / 2
    loss = float(AD.adjoint_loss(shifted(pre, grid, delta + err), ro, adj))
    assert loss > 0 and math.isclose(loss, float((w * err.pow(2).sum(1)).sum()), rel_tol=1e-9)
    assert float(AD.adjoint_loss(pre, ro, adj)) > 0


def test_adjoint_fixed_point_tends_to_the_exact_tilted_score():
    """As the grid is refined the fixed point s_pre - a_{k+1} tends to the score of the diffused tilt
    N(m + v c / beta, v I) (core.targets, `tilted_mixture`), the continuous-time optimum."""
    sde, beta = VP(), 1.0
    pre = gaussian().score_fn(sde)
    tilt = A.tilted_mixture(gaussian(), C, beta).score_fn(sde)
    errs = []
    for n in (50, 200):
        grid = time_grid(sde, n, kind="uniform").double()
        x = torch.zeros(n, 2, dtype=torch.float64)  # the shift is the same at every x
        want = tilt(x, grid[:-1]) - pre(x, grid[:-1])
        errs.append(float((optimal_controls(sde, grid, VAR, beta) - want).abs().max() / want.abs().max()))
    assert errs[1] < 0.02 and errs[1] < errs[0] / 3  # first order in h


@pytest.mark.parametrize("sde, memoryless", [(VP(), True), (ContractiveVP(), False)])
def test_memoryless_condition_and_the_value_function_bias(gen, sde, memoryless):
    """The chain run with the fixed point of adjoint matching (from `lean_adjoint`) ends at N(m_N + S c / beta, V_N),
    S = Var(x_N | x_0), V_N = Var x_N (both from the chain's covariance): the tilt's mean m_N + V_N c / beta when
    the chain forgets its start (VP: S / V_N = 1 to 1e-4), short by the factor S / V_N (0.84 here) on
    ContractiveVP (x_T keeps alpha(T) x0). Monte Carlo means, 5 standard errors."""
    beta, n, B = 1.0, 40, 40000
    grid = time_grid(sde, n, kind="uniform").double()
    pre = gaussian().score_fn(sde)
    base = A.rollout(sde, pre, pre, (2, 2), grid, gen, torch.float64)
    delta = -AD.lean_adjoint(sde, pre, base, -C.expand(2, 2) / beta)[1:, 0]
    x = A.rollout(sde, shifted(pre, grid, delta), pre, (B, 2), grid, gen, torch.float64).terminal
    S = chain_covariance(sde, grid, VAR)
    V, cond = S[n, n], S[n, n] - S[0, n] ** 2 / S[0, 0]
    m_N = chain_mean(sde, grid, MEAN, VAR)
    se = x.std(0) / math.sqrt(B)
    predicted, tilt = m_N + cond * C / beta, m_N + V * C / beta
    assert ((x.mean(0) - predicted).abs() < 5 * se).all()
    if memoryless:
        assert float(cond / V) > 1 - 1e-4
    else:
        assert float(cond / V) < 0.9 and ((x.mean(0) - tilt).abs() > 8 * se).all()


def test_adjoint_matching_reaches_the_tilt(gen):
    """Trained on the exact score of a 2-D mixture under VP with a linear reward: the terminal law is close to the
    closed-form tilt (MMD against the mixture, well inside the distance of the pretrained law)."""
    from scoresde.evaluation.metrics import mmd2

    sde, beta = VP(), 1.0
    mix = GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2]]),
                          0.12 * torch.eye(2).expand(3, 2, 2))
    c = torch.tensor([1.0, 0.5])
    opts = AD.AdjointOptions(beta=beta, steps=60, batch_size=128, n_time_steps=20, lr=1e-2, lr_final=1e-3)
    model, hist = AD.adjoint_matching(sde, mix.score_fn(sde), R.linear(c), opts, shape=(2,),
                                      network=MLP(2, hidden=32, depth=2), generator=gen)
    grid = time_grid(sde, 20, kind="uniform")
    tilt = A.tilted_mixture(mix, c, beta)
    after = A.rollout(sde, model, mix.score_fn(sde), (2000, 2), grid, gen).terminal.double()
    before = A.rollout(sde, mix.score_fn(sde), mix.score_fn(sde), (2000, 2), grid, gen).terminal.double()
    d_after, d_before = float(mmd2(after, tilt).value), float(mmd2(before, tilt).value)
    assert d_after < 0.1 * d_before
    last = hist[-1]
    assert last["reward_grad_evals"] == last["reward_evals"] == 60 * 128 and last["nfe"] == 60 * 128 * 20 * 3


def test_methods_that_need_a_gradient_refuse_a_reward_without_one():
    sde, pre = VP(), gaussian().score_fn(VP())

    def flat(x):
        with torch.no_grad():
            return x.sum(1)

    loop = dict(steps=1, batch_size=4, n_time_steps=3)
    for fn, opts, name in ((AD.adjoint_matching, AD.AdjointOptions(beta=1.0, **loop), "adjoint"),
                           (RG.draft, RG.DRaFTOptions(**loop), "draft")):
        with pytest.raises(ValueError, match=f"method '{name}' needs the reward's gradient"):
            fn(sde, pre, flat, opts, shape=(2,))
    for kwargs, match in (({}, "beta"), ({"beta": 0.0}, "beta must be > 0"), ({"beta": 1.0, "updates_per_batch": 0},
                                                                            "updates_per_batch")):
        with pytest.raises((TypeError, ValueError), match=match):
            AD.AdjointOptions(**kwargs)
    for kwargs, match in (({"k": 0}, "k must be an integer >= 1"), ({"k": 5, "n_time_steps": 4}, "k must be <= n_time_steps = 4"),
                          ({"beta": -1.0}, "beta must be > 0")):
        with pytest.raises(ValueError, match=match):
            RG.DRaFTOptions(**kwargs)
    for kwargs, match in (({"beta": 1.0, "clip": 0.0}, "clip"), ({"beta": 1.0, "batch_size": 4, "minibatches": 8},
                                                                  "minibatches must be <= batch_size = 4")):
        with pytest.raises(ValueError, match=match):
            A.DPOKOptions(**kwargs)
    with pytest.raises(ValueError, match="options must be an AdjointOptions"):
        AD.adjoint_matching(sde, pre, R.linear(C), A.DPOKOptions(beta=1.0), shape=(2,))


# ---------------------------------------------------------------- DRaFT


def _net(seed: int) -> MLP:
    torch.manual_seed(seed)
    net = MLP(2, hidden=16, depth=1).double()
    torch.nn.init.normal_(net.out.weight, std=0.3)
    return net


@pytest.mark.parametrize("k, beta", [(8, None), (8, 0.5), (3, 0.5), (3, None)])
def test_draft_gradient_is_autograd_through_the_chain(gen, k, beta):
    """DRaFT-K's gradient equals autograd of -(r(x_N) - beta KL) through a hand-written EM chain with the same
    noise, the states up to x_{N-k} detached (k = N: the whole chain, plain reward backpropagation).""" 
    sde, n = VP(), 8
    grid = time_grid(sde, n, kind="uniform").double()
    model, frozen = _net(0), _net(1).requires_grad_(False)
    reward = R.region_mass([0.0, -1.0], [1.5, 1.0], sharpness=3.0)
    ro = A.rollout(sde, model, frozen, (16, 2), grid, gen, torch.float64)
    model.zero_grad()
    RG.draft_loss(sde, model, frozen, ro, reward, k, beta).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x, kl = ro.states[0], torch.zeros(16, dtype=torch.float64)
    for j in range(n):
        if j <= n - k:  # the states up to x_{N-k} are constants
            x = x.detach()
        t, h, g = grid[j], grid[j] - grid[j + 1], sde.diffusion(grid[j])
        s = model(x, t.expand(16))
        kl = kl + 0.5 * g**2 * h * (s - frozen(x, t.expand(16))).pow(2).sum(1)
        x = x + h * (sde.b(t) * x + g**2 * s) + g * ro.noise[j]
    torch.testing.assert_close(x.detach(), ro.terminal, rtol=1e-9, atol=1e-10)
    (-(reward(x) - (beta or 0.0) * kl).mean()).backward()
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-8, atol=1e-12)


def test_draft_trains_and_counts(gen):
    """A short DRaFT-1 run with a KL weight raises the reward; one gradient evaluation of the reward per sample."""
    sde, mix = VP(), gaussian()
    opts = RG.DRaFTOptions(k=1, beta=1.0, steps=15, batch_size=64, n_time_steps=8, lr=1e-2)
    _, hist = RG.draft(sde, mix.score_fn(sde), R.linear(C), opts, shape=(2,), generator=gen)
    assert hist[-1]["reward_mean"] > hist[0]["reward_mean"] + 4 * hist[0]["reward_std"] / 8
    assert hist[-1]["reward_grad_evals"] == 15 * 64 and hist[-1]["reward_evals"] == 2 * 15 * 64


# ---------------------------------------------------------------- DPOK


def test_dpok_step_kl_is_the_kl_of_the_gaussian_transitions(gen):
    """DPOK's per-step KL (Rollout.cost) equals torch.distributions' KL between the fine-tuned and the pretrained
    EM transitions N(x + h (b x + g^2 s), g^2 h I), summed over coordinates."""
    from torch.distributions import Normal, kl_divergence

    sde = VP()
    grid = time_grid(sde, 6, kind="uniform").double()
    model, pre = _net(2), gaussian().score_fn(sde)
    ro = A.rollout(sde, model, pre, (9, 2), grid, gen, torch.float64)
    for k in range(6):
        t, h, g, x = grid[k], grid[k] - grid[k + 1], sde.diffusion(grid[k]), ro.states[k]
        mean = lambda s: x + h * (sde.b(t) * x + g**2 * s)  # noqa: E731
        with torch.no_grad():
            p, q = Normal(mean(model(x, t.expand(9))), g * h.sqrt()), Normal(mean(pre(x, t.expand(9))), g * h.sqrt())
        torch.testing.assert_close(ro.cost()[k], kl_divergence(p, q).sum(1), rtol=1e-9, atol=1e-12)


def test_dpok_kl_weight_trades_reward_for_kl(gen):
    """DPOK raises the reward; a 20x larger KL weight ends at a smaller path KL."""
    sde, mix = VP(), gaussian()
    out = {}
    for beta in (0.1, 2.0):
        opts = A.DPOKOptions(beta=beta, steps=25, batch_size=64, n_time_steps=8, lr=1e-2, clip=0.2)
        _, hist = A.dpok(sde, mix.score_fn(sde), R.linear(C), opts, shape=(2,),
                         generator=torch.Generator().manual_seed(3))
        out[beta] = hist
    first, low, high = out[0.1][0], out[0.1][-1], out[2.0][-1]
    assert low["reward_mean"] > first["reward_mean"] + 4 * first["reward_std"] / 8
    assert high["kl"] < low["kl"] and low["reward_evals"] == 25 * 64 and low["reward_grad_evals"] == 0


# ---------------------------------------------------------------- reward gradients


def test_reward_gradients_against_closed_forms():
    """grad_x of every reward by `value_and_grad` against its closed form (scipy's expit / softmax)."""
    import numpy as np
    from scipy.special import expit, softmax

    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xn = x.numpy()
    c = np.array([1.0, -2.0, 0.5])
    _, g = R.value_and_grad(R.linear(c), x, "adjoint")
    assert np.allclose(g.numpy(), np.broadcast_to(c, xn.shape))
    p = np.array([1.0, 1.0, -1.0])
    _, g = R.value_and_grad(R.neg_distance(p), x, "adjoint")
    assert np.allclose(g.numpy(), -(xn - p) / np.linalg.norm(xn - p, axis=1, keepdims=True))
    lo, hi, k = np.array([-1.0, 0.0, -0.5]), np.array([0.5, 2.0, 0.5]), 4.0
    a, b = expit(k * (xn - lo)), expit(k * (hi - xn))
    box = np.prod(a * b, axis=1, keepdims=True)
    _, g = R.value_and_grad(R.region_mass(lo, hi, sharpness=k), x, "adjoint")
    assert np.allclose(g.numpy(), box * k * ((1 - a) - (1 - b)))
    W = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, g = R.value_and_grad(R.class_log_prob(lambda z: z @ W, 2), x, "adjoint")
    Wn = W.numpy()
    assert np.allclose(g.numpy(), Wn[:, 2] - softmax(xn @ Wn, axis=1) @ Wn.T)
    img = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r, g = R.value_and_grad(R.ink(threshold=0.2, sharpness=3.0), img, "adjoint")
    s = expit(3.0 * (img.numpy() - 0.2))
    assert np.allclose(r.numpy(), s.reshape(5, -1).mean(1)) and np.allclose(g.numpy(), 3.0 * s * (1 - s) / 16)
    with pytest.raises(ValueError, match="sharpness"):
        R.ink(sharpness=0.0)
    with pytest.raises(ValueError, match="reward must return shape"):
        R.value_and_grad(lambda z: z, x, "adjoint")
