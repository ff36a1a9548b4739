"""Tests for scoresde.alignment and scoresde.rewards, each against an independent truth."""
import math

import pytest
import torch
from torch import nn

from scoresde.core.sde import VP
from scoresde.core.targets import GaussianMixture
from scoresde.models import alignment as A
from scoresde.models import rewards as R
from scoresde.running.finetune import finetune_run
from scoresde.sampling.grids import time_grid

SDE = VP()


def gaussian(mean, var, d=2) -> GaussianMixture:
    return GaussianMixture(torch.ones(1), torch.tensor([mean], dtype=torch.float64).expand(1, d),
                           var * torch.eye(d, dtype=torch.float64)[None])


def affine_coefficients(sde, mean, var, t):
    """s(x, t) = slope x + intercept for the exact score of N(mean, var I) under a linear SDE."""
    a, s = sde.alpha(t), sde.sigma(t)
    slope = -1 / (a**2 * var + s**2)
    return slope, -slope * a * torch.as_tensor(mean, dtype=torch.float64)


def chain_moments(sde, grid, slope_fn, intercept_fn):
    """Mean (N+1, d) and variance (N+1,) per coordinate of the EM chain with an affine score, exactly."""
    m = torch.zeros_like(intercept_fn(grid[0]))
    v = torch.tensor(sde.prior_std**2, dtype=torch.float64)
    ms, vs = [m], [v]
    for k in range(grid.numel() - 1):
        t, h = grid[k], grid[k] - grid[k + 1]
        g2 = sde.diffusion(t) ** 2
        Ak = 1 + h * (sde.b(t) + g2 * slope_fn(t))
        m, v = Ak * m + h * g2 * intercept_fn(t), Ak**2 * v + g2 * h
        ms.append(m), vs.append(v)
    return torch.stack(ms), torch.stack(vs)


# ---------------------------------------------------------------- path KL


def joint_gaussian(sde, grid, slope_fn, intercept_fn):
    """Joint mean (d, N+1) and covariance (N+1, N+1) of (x_0, ..., x_N), one coordinate, built from the
    linear map of (x_0, z_0, ..., z_{N-1})."""
    N = grid.numel() - 1
    L = torch.zeros(N + 1, N + 1, dtype=torch.float64)
    L[0, 0] = sde.prior_std
    for k in range(N):
        t, h = grid[k], grid[k] - grid[k + 1]
        Ak = 1 + h * (sde.b(t) + sde.diffusion(t) ** 2 * slope_fn(t))
        L[k + 1] = Ak * L[k]
        L[k + 1, k + 1] = sde.diffusion(t) * h.sqrt()
    mean, _ = chain_moments(sde, grid, slope_fn, intercept_fn)
    return mean.T, L @ L.T


def gaussian_kl(m1, S1, m2, S2):
    """KL(N(m1, S1) || N(m2, S2)) for a batch of means (d, n) sharing the covariances."""
    n = S1.shape[0]
    S2inv = torch.linalg.inv(S2)
    diff = m2 - m1
    quad = torch.einsum("di,ij,dj->d", diff, S2inv, diff)
    return 0.5 * (torch.trace(S2inv @ S1) + quad - n + torch.logdet(S2) - torch.logdet(S1))


def test_path_kl_matches_joint_gaussian_kl(gen):
    """Girsanov path KL of two affine-score chains vs the KL of their joint Gaussian laws."""
    grid = time_grid(SDE, 8, kind="uniform")
    (m0, v0), (m1, v1) = ([0.5, -1.0], 0.3), ([-0.2, 0.4], 0.8)
    pre, model = gaussian(m0, v0).score_fn(SDE), gaussian(m1, v1).score_fn(SDE)
    kl, se = A.path_kl(SDE, model, pre, (40000, 2), grid, generator=gen)
    fn = lambda m, v: (lambda t: affine_coefficients(SDE, m, v, t)[0], lambda t: affine_coefficients(SDE, m, v, t)[1])
    muP, SP = joint_gaussian(SDE, grid, *fn(m1, v1))
    muQ, SQ = joint_gaussian(SDE, grid, *fn(m0, v0))
    exact = float(gaussian_kl(muP, SP, muQ, SQ).sum())
    assert exact > 0.5
    assert abs(kl - exact) < 4 * se + 1e-6 * exact, (kl, se, exact)


# ---------------------------------------------------------------- policy gradient unbiasedness

M0, V0, U, PHI_SCALE = [0.3, -0.5], 0.5, torch.tensor([1.0, -0.5], dtype=torch.float64), 0.8
C, Z, BETA = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.5, 0.0], dtype=torch.float64), 2.0


def phi(t):
    return PHI_SCALE * SDE.alpha(t)


class AffineFamily(nn.Module):
    """s_theta(x, t) = s_pre(x, t) + theta phi(t) (x + u): one parameter in both slope and intercept."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))
        self.pre = gaussian(M0, V0).score_fn(SDE)

    def forward(self, x, t):
        return self.pre(x, t) + self.theta * phi(t)[:, None] * (x + U)


def reward(x):
    return x @ C - 0.5 * (x - Z).pow(2).sum(1)


def exact_objective(theta_law, theta_cost, grid):
    """J for the discretised chain: E r(x_N) - beta sum_k (g_k^2 / 2) h_k E|theta phi (x_k + u)|^2; the law of
    x_k uses theta_law, the integrand theta_cost (equal for J itself)."""
    slope = lambda t: affine_coefficients(SDE, M0, V0, t)[0] + theta_law * phi(t)
    intercept = lambda t: affine_coefficients(SDE, M0, V0, t)[1] + theta_law * phi(t) * U
    m, v = chain_moments(SDE, grid, slope, intercept)
    d = m.shape[1]
    Er = m[-1] @ C - 0.5 * ((m[-1] - Z).pow(2).sum() + d * v[-1])
    h, g2 = grid[:-1] - grid[1:], SDE.diffusion(grid[:-1]) ** 2
    second = (m[:-1] + U).pow(2).sum(1) + d * v[:-1]
    penalty = (0.5 * g2 * h * (theta_cost * phi(grid[:-1])) ** 2 * second).sum()
    return Er, penalty


def exact_J(theta, grid):
    Er, penalty = exact_objective(theta, theta, grid)
    return Er - BETA * penalty


@pytest.mark.parametrize("grid_kind,n,baseline", [("uniform", 10, "none"), ("poly", 25, "mean"), ("poly", 25, "critic")])
def test_policy_gradient_unbiased(gen, grid_kind, n, baseline):
    """The estimator's mean is the exact gradient of J on the discretised chain; "critic": the batch mean plus a
    function of (x_j, t_j) (as the learned correction, fitted on earlier batches) keeps it unbiased."""
    grid = time_grid(SDE, n, kind=grid_kind)
    theta0 = 0.4
    th = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    (exact,) = torch.autograd.grad(exact_J(th, grid), th)
    # the penalty's score-function share (through the law of x_k) must be large enough to be detected
    (law_part,) = torch.autograd.grad(BETA * exact_objective(th, theta0, grid)[1], th)
    model = AffineFamily(theta0)
    grads = []
    for _ in range(48):
        ro = A.rollout(SDE, model, model.pre, (512, 2), grid, gen, torch.float64)
        G = A.returns_to_go(ro, reward(ro.terminal), BETA)
        V = A.leave_one_out_mean(G) if baseline != "none" else torch.zeros_like(G)
        if baseline == "critic":
            V = V + 0.5 * (ro.states[:-1] @ C) * phi(ro.times[:-1])[:, None]
        (g,) = torch.autograd.grad(-A.policy_loss(model, ro, G - V, BETA), model.theta)
        grads.append(float(g))
    grads = torch.tensor(grads)
    mean, se = float(grads.mean()), float(grads.std() / math.sqrt(grads.numel()))
    assert abs(mean - float(exact)) < 4 * se, (mean, se, float(exact))
    assert se < 0.1 * abs(float(exact))
    assert abs(float(law_part)) > 5 * se
    print(grid_kind, float(exact), mean, se, float(law_part))


# ---------------------------------------------------------------- tilted target (DESIGN 9)

MIX = GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2]]),
                      0.12 * torch.eye(2).expand(3, 2, 2))
C_TILT = torch.tensor([1.0, 0.5])


def component_weights(x, mixture):
    """Mean responsibilities of the components of `mixture` over the samples x."""
    comps = [GaussianMixture(torch.ones(1), mixture.means[k:k + 1], mixture.covariances[k:k + 1]) for k in range(3)]
    log_c = torch.stack([mixture.weights[k].log() + comps[k].log_prob(x.double()) for k in range(3)], 1)
    return torch.softmax(log_c, 1)


def tilt_run(beta, steps, n_time_steps, gen, baseline="value"):
    """Fine-tune a residual MLP on the exact mixture score; return the fine-tuned samples and history."""
    from scoresde.learning.networks import MLP
    from scoresde.sampling import sample

    pre = MIX.score_fn(SDE)
    opts = A.FinetuneOptions(beta=beta, steps=steps, batch_size=256, n_time_steps=n_time_steps, lr=1e-2, lr_final=3e-4,
                             baseline=baseline)
    model, hist = A.finetune(SDE, pre, R.linear(C_TILT), opts, shape=(2,), network=MLP(2, hidden=64, depth=2),
                             generator=gen)
    with torch.no_grad():
        x = sample(SDE, model, (4000, 2), method="em", nfe=n_time_steps, denoise=False, grid="uniform", generator=gen)
    kl, kl_se = A.path_kl(SDE, model, pre, (4000, 2), time_grid(SDE, n_time_steps, kind="uniform"), gen, torch.float32)
    return x.double(), kl, kl_se, hist


def check_tilt(x, beta, tol_mean, tol_weight):
    """Sample mean and component weights against the closed-form tilt, within tolerance + 3 standard errors."""
    tilt = A.tilted_mixture(MIX, C_TILT, beta)
    n = x.shape[0]
    mean_se = x.std(0) / math.sqrt(n)
    assert ((x.mean(0) - tilt.mean()).abs() < tol_mean + 3 * mean_se).all(), (x.mean(0), tilt.mean())
    resp = component_weights(x, tilt)
    w_se = resp.std(0) / math.sqrt(n)
    assert ((resp.mean(0) - tilt.weights).abs() < tol_weight + 3 * w_se).all(), (resp.mean(0), tilt.weights)


def objective_gap(x, kl, beta):
    """beta log Z - (E r - beta KL): the optimum of J is beta log Z (DESIGN 9)."""
    logZ = torch.logsumexp(MIX.weights.log() + MIX.means @ C_TILT.double() / beta
                           + (MIX.covariances @ C_TILT.double()) @ C_TILT.double() / (2 * beta**2), 0)
    return float(beta * logZ) - (float((x @ C_TILT.double()).mean()) - beta * kl)


def test_tilted_mixture_closed_form(gen):
    """The closed form against importance weighting of pretrained samples by exp(c^T x / beta)."""
    beta = 0.7
    tilt = A.tilted_mixture(MIX, C_TILT, beta)
    x = MIX.sample(400000, gen)
    w = torch.softmax(x @ C_TILT.double() / beta, 0)
    assert torch.allclose((w[:, None] * x).sum(0), tilt.mean(), atol=0.01)
    assert torch.allclose((w[:, None] * component_weights(x, MIX)).sum(0), tilt.weights, atol=0.01)
    with pytest.raises(ValueError, match="beta"):
        A.tilted_mixture(MIX, C_TILT, 0.0)


def test_finetune_reaches_tilt_reduced(gen):
    """Reduced budget (N = 20; 250 iterations at beta = 1, 100 at beta = 4): the tilt within an optimisation
    tolerance of 0.1 in the mean and 0.06 in the weights (the pretrained law is 0.8 and 0.37 away at beta = 1);
    J within 0.05 of its optimum beta log Z; the larger beta keeps a lower reward and a smaller KL."""
    x1, kl1, se1, hist = tilt_run(1.0, 250, 20, gen)
    check_tilt(x1, 1.0, tol_mean=0.1, tol_weight=0.06)
    assert objective_gap(x1, kl1, 1.0) < 0.05  # pretrained: 0.47; Monte Carlo error about 0.015
    assert hist[0]["kl"] == 0.0 and hist[-1]["nfe"] == 250 * 2 * 256 * 20
    x4, kl4, se4, _ = tilt_run(4.0, 100, 20, gen)
    check_tilt(x4, 4.0, tol_mean=0.1, tol_weight=0.06)
    r1, r4 = float((x1 @ C_TILT.double()).mean()), float((x4 @ C_TILT.double()).mean())
    assert r1 > r4 + 0.2 and kl1 > kl4 + 3 * (se1 + se4)


def test_finetune_critic_reaches_tilt(gen):
    """The critic baseline (batch mean plus a learned V(x, t), no reward evaluations beyond the terminal ones):
    the beta = 4 tilt of the reduced test at its tolerances, one reward evaluation per chain and iteration."""
    x, kl, _, hist = tilt_run(4.0, 100, 20, gen, baseline="critic")
    check_tilt(x, 4.0, tol_mean=0.1, tol_weight=0.06)
    assert objective_gap(x, kl, 4.0) < 0.05
    assert hist[-1]["reward_evals"] == 100 * 256


@pytest.mark.slow
def test_finetune_reaches_tilt_full(gen):
    """N = 50, 400 iterations, three betas: tolerance 0.06 (mean) and 0.04 (weights); reward and KL monotone in 1/beta."""
    out = []
    for beta in (0.5, 1.0, 3.0):
        x, kl, se, _ = tilt_run(beta, 400, 50, gen)
        check_tilt(x, beta, tol_mean=0.06, tol_weight=0.04)
        assert objective_gap(x, kl, beta) < 0.02
        out.append((float((x @ C_TILT.double()).mean()), kl))
    assert out[0][0] > out[1][0] > out[2][0] and out[0][1] > out[1][1] > out[2][1]


# ---------------------------------------------------------------- pieces: likelihood ratio, DDPO, rewards, inputs


def test_rollout_is_the_samplers_em_chain():
    """The rollout's chain is the EM sampler's (`stochastic.em_step`, same draws): identical states; the
    stored dB reproduces each transition as its Gaussian mean + g dB."""
    from scoresde.sampling.stochastic import em_step

    sde = SDE
    grid = time_grid(SDE, 6, kind="uniform").double()
    score = gaussian([0.2, 0.1], 0.5).score_fn(SDE)
    ro = A.rollout(sde, score, score, (32, 2), grid, torch.Generator().manual_seed(4), torch.float64)
    g = torch.Generator().manual_seed(4)
    x = sde.prior_sample((32, 2), generator=g, dtype=torch.float64)
    for k in range(6):
        assert torch.equal(ro.states[k], x)
        x = em_step(sde, score, x, grid[k], grid[k + 1], g)
        t = grid[k].expand(32)
        mean = ro.states[k] - (grid[k] - grid[k + 1]) * (sde.drift(t, ro.states[k]) - sde.diffusion(t)[:, None] ** 2
                                                          * score(ro.states[k], t))
        torch.testing.assert_close(ro.states[k + 1], mean + ro.diffusion[k] * ro.noise[k], rtol=1e-12, atol=1e-12)
    assert torch.equal(ro.states[-1], x)


def test_log_ratio_is_gaussian_transition_ratio(gen):
    """Rollout.log_ratio against torch.distributions.Normal log-densities of the EM transitions."""
    grid = time_grid(SDE, 6, kind="uniform")
    old, new = gaussian([0.2, 0.1], 0.5).score_fn(SDE), gaussian([-0.3, 0.4], 0.9).score_fn(SDE)
    ro = A.rollout(SDE, old, old, (64, 2), grid, gen, torch.float64)
    s_new = torch.stack([new(ro.states[k], ro.times[k].expand(64)) for k in range(6)])
    x, x_next, t = ro.states[:-1], ro.states[1:], ro.times[:-1]
    h = (grid[:-1] - grid[1:])[:, None, None]
    g = SDE.diffusion(t)[:, None, None]
    drift = lambda s: x + (SDE.b(t)[:, None, None] * x + g**2 * s) * h  # noqa: E731
    logp = lambda s: torch.distributions.Normal(drift(s), g * h.sqrt()).log_prob(x_next).sum(-1)  # noqa: E731
    assert torch.allclose(ro.log_ratio(s_new), logp(s_new) - logp(ro.scores), rtol=1e-8, atol=1e-9)
    assert torch.allclose(ro.log_ratio(ro.scores), torch.zeros(6, 64, dtype=torch.float64))


def test_ddpo_raises_reward(gen):
    """DDPO on the tilted-mixture problem: the reward climbs well past the pretrained one; KL is recorded."""
    from scoresde.learning.networks import MLP

    opts = A.DDPOOptions(steps=40, batch_size=128, n_time_steps=10, lr=1e-2)
    _, hist = A.ddpo(SDE, MIX.score_fn(SDE), R.linear(C_TILT), opts, shape=(2,), network=MLP(2, hidden=32, depth=1),
                     generator=gen)
    first, last = hist[0], hist[-1]
    assert first["kl"] == 0.0 and last["kl"] > 0.05
    assert last["reward_mean"] > first["reward_mean"] + 5 * first["reward_std"] / math.sqrt(128)
    assert last["nfe"] == 40 * 2 * 128 * 10 and set(last) >= {"reward_std", "kl_stderr", "diversity", "wall_time"}


def test_rewards_against_numpy():
    import numpy as np
    from scipy.special import expit, log_softmax

    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xn = x.numpy()
    assert np.allclose(R.linear([1.0, -2.0, 0.5])(x).numpy(), xn @ np.array([1.0, -2.0, 0.5]))
    pts = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, -1.0]])
    brute = -np.min(np.linalg.norm(xn[:, None] - pts[None], axis=-1), axis=1)
    assert np.allclose(R.neg_distance(pts)(x).numpy(), brute)
    assert np.allclose(R.neg_distance(pts[1])(x).numpy(), -np.linalg.norm(xn - pts[1], axis=1))
    lo, hi = np.array([-1.0, 0.0, -0.5]), np.array([0.5, 2.0, 0.5])
    box = np.prod(expit(4 * (xn - lo)) * expit(4 * (hi - xn)), axis=1)
    assert np.allclose(R.region_mass(lo, hi, sharpness=4)(x).numpy(), box)
    W = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert np.allclose(R.class_log_prob(lambda z: z @ W, 2)(x).numpy(), log_softmax(xn @ W.numpy(), axis=1)[:, 2])
    assert R.REWARDS["region"] is R.region_mass


def test_reward_and_input_validation():
    with pytest.raises(ValueError, match="low < high"):
        R.region_mass([0.0, 1.0], [1.0, 0.5])
    with pytest.raises(ValueError, match="label"):
        R.class_log_prob(lambda z: z, -1)
    pre, rew = MIX.score_fn(SDE), R.linear(C_TILT)
    for kwargs, match in (({"beta": -1.0}, r"beta must be > 0 \(the KL weight\), got -1.0"),
                          ({"beta": 0.0}, r"beta must be > 0 \(the KL weight\), got 0.0"),
                          ({"beta": float("inf")}, r"beta must be > 0 \(the KL weight\), got inf"),
                          ({"beta": 1.0, "baseline": "actor"}, "baseline must be one of 'value', 'critic', 'mean', 'none'"),
                          ({"beta": 1.0, "steps": 0}, "steps must be an integer >= 1"),
                          ({"beta": 1.0, "batch_size": 1}, "batch_size must be an integer >= 2"),
                          ({"beta": 1.0, "steps": 2.5}, "steps must be an integer"),
                          ({"beta": 1.0, "lr": 0.0}, "lr must be a finite number > 0"),
                          ({"beta": 1.0, "lr_final": -1.0}, "lr_final"), ({"beta": 1.0, "clip": 0.0}, "clip"),
                          ({"beta": 1.0, "updates_per_batch": 0}, "updates_per_batch"),
                          ({"beta": 1.0, "grid": torch.tensor([1.0, 0.5])}, "grid")):
        with pytest.raises(ValueError, match=match):
            A.FinetuneOptions(n_time_steps=4, **kwargs)
    with pytest.raises(TypeError, match="beta"):
        A.FinetuneOptions()
    for kwargs, match in (({"clip": 0.0}, "clip"), ({"adv_clip": -1.0}, "adv_clip"),
                          ({"batch_size": 4, "minibatches": 5}, "minibatches must be <= batch_size = 4")):
        with pytest.raises(ValueError, match=match):
            A.DDPOOptions(**kwargs)
    with pytest.raises(ValueError, match="options must be a FinetuneOptions"):
        A.finetune(SDE, pre, rew, A.DDPOOptions(), shape=(2,))
    with pytest.raises(ValueError, match="shape"):
        A.finetune(SDE, pre, rew, A.FinetuneOptions(beta=1.0))
    with pytest.raises(ValueError, match="reward"):
        A.finetune(SDE, pre, lambda x: x, A.FinetuneOptions(beta=1.0, steps=1, batch_size=4, n_time_steps=2),
                   shape=(2,))


def test_clipped_updates_and_network_pretrained(gen):
    """Several clipped updates per batch on a network pretrained (a copy is trained, the original untouched)."""
    from scoresde.learning.networks import MLP

    net = MLP(2, hidden=16, depth=1)
    nn.init.normal_(net.out.weight, std=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    opts = A.FinetuneOptions(beta=1.0, steps=3, batch_size=32, n_time_steps=5, updates_per_batch=3, clip=0.5,
                             baseline="none")
    model, hist = A.finetune(SDE, net, R.linear(C_TILT), opts, generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert hist[0]["kl"] == 0.0 and hist[-1]["nfe"] == 3 * (2 + 3) * 32 * 5


def test_mean_pairwise_distance():
    from scipy.spatial.distance import pdist

    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(3))
    assert math.isclose(A.mean_pairwise_distance(x), float(pdist(x.double().numpy()).mean()), rel_tol=1e-10)


def test_parse_reward():
    r = R.parse_reward("distance", {"points": "0,1;1,0"})
    assert torch.allclose(r(torch.tensor([[0.0, 1.0], [3.0, 0.0]])), torch.tensor([0.0, -2.0]))
    assert torch.allclose(R.parse_reward("linear", ["c=1,2"])(torch.ones(1, 2)), torch.tensor([3.0]))
    assert torch.allclose(R.parse_reward("region", ["low=0,0", "high=1,1", "sharpness=100"])(torch.tensor([[0.5, 0.5]])),
                          torch.tensor([1.0]))
    with pytest.raises(ValueError, match="key=value"):
        R.parse_reward("linear", ["c"])
    with pytest.raises(ValueError, match="unknown reward"):
        R.parse_reward("speed", {})
    with pytest.raises(ValueError, match="numbers"):
        R.parse_reward("linear", {"c": "a,b"})


def test_finetune_run_writes_loadable_run(tmp_path):
    """A tiny trained run fine-tuned into a new folder that `load_run` reads back with the new weights."""
    from scoresde.running.config import load_config
    from scoresde.running.runs import load_run
    from scoresde.running.train import Trainer

    cfg = load_config(None, [f"out={tmp_path}", "name=base", "steps=20", "eval_every=0", "progress=false",
                             "net_args.hidden=16", "net_args.depth=1", "n_train=500", "n_test=200", "nfe=20"])
    Trainer(cfg).run()
    opts = A.FinetuneOptions(beta=0.5, steps=3, batch_size=16, n_time_steps=5, lr=1e-2)
    out = finetune_run(tmp_path / "base", tmp_path / "tuned", R.parse_reward("linear", {"c": "0,1"}), opts, n_samples=100)
    for path in out["paths"].values():
        assert path.is_file()
    tuned, base = load_run(tmp_path / "tuned"), load_run(tmp_path / "base")
    diff = [not torch.equal(a, b) for a, b in zip(tuned.model.state_dict().values(), base.model.state_dict().values())]
    assert any(diff) and tuned.step == base.step + 3
    with pytest.raises(ValueError, match="out_dir"):
        finetune_run(tmp_path / "base", tmp_path / "base", R.parse_reward("linear", {"c": "0,1"}), opts)


def test_cli_finetune(tmp_path):
    from typer.testing import CliRunner

    from scoresde.cli import app
    from scoresde.running.config import load_config
    from scoresde.running.train import Trainer

    cfg = load_config(None, [f"out={tmp_path}", "name=base", "steps=10", "eval_every=0", "progress=false",
                             "net_args.hidden=16", "net_args.depth=1", "n_train=300", "n_test=100", "nfe=10"])
    Trainer(cfg).run()
    args = ["finetune", str(tmp_path / "base"), "--reward", "region", "--param", "low=0,0", "--param", "high=1,1",
            "--beta", "0.5", "--steps", "2", "--batch-size", "8", "--n-time-steps", "4", "--n", "50"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "mean reward" in res.output and (tmp_path / "base-finetuned" / "finetune_curves.png").is_file()
    bad = CliRunner().invoke(app, args[:3] + ["speed", "--beta", "1"])
    assert bad.exit_code == 2 and "unknown reward" in bad.output
