"""Tests for scoresde.models.cross_entropy (reward-weighted denoising score matching), each against an independent
truth: the exact Gaussian moments of the EM chain and the closed-form tilted mixture."""
import math

import pytest
import torch

from scoresde.core.errors import InvalidValueError, NonFiniteError
from scoresde.core.sde import VP, Langevin
from scoresde.learning.networks import MLP
from scoresde.models import alignment as A
from scoresde.models import rewards as R
from scoresde.models.cross_entropy import CrossEntropyOptions, cross_entropy, log_weights
from scoresde.sampling.grids import time_grid
from test_alignment import C_TILT, MIX, affine_coefficients, chain_moments, check_tilt, gaussian, objective_gap

SDE = VP()


def weighted_moments(x, lw):
    """Self-normalised weighted mean and variance per coordinate, and the mean's delta-method standard error."""
    w = torch.softmax(lw.double(), 0)[:, None]
    m = (w * x).sum(0)
    return m, (w * (x - m) ** 2).sum(0), ((w**2 * (x - m) ** 2).sum(0)).sqrt()


def test_log_weights_turn_any_proposal_into_the_tilt_of_the_pretrained_chain(gen):
    """Chains of another Gaussian's score, weighted by eq. C2, have the moments of the tilt N(m_N + V_N c / beta,
    V_N) of the pretrained chain's terminal law, whose m_N, V_N come from the exact affine recursion; without the
    Girsanov term the same chains miss it by many standard errors (the test can fail)."""
    grid = time_grid(SDE, 10, kind="uniform").double()
    (m0, v0), beta, c = ([0.5, -1.0], 0.3), 0.8, torch.tensor([1.0, -0.5], dtype=torch.float64)
    pre, proposal = gaussian(m0, v0).score_fn(SDE), gaussian([-0.2, 0.4], 0.6).score_fn(SDE)
    ro = A.rollout(SDE, proposal, pre, (200000, 2), grid, gen, torch.float64)
    r = ro.terminal @ c
    m, v = chain_moments(SDE, grid, lambda t: affine_coefficients(SDE, m0, v0, t)[0],
                         lambda t: affine_coefficients(SDE, m0, v0, t)[1])
    tilt_mean, tilt_var = m[-1] + v[-1] * c / beta, v[-1]
    mean, var, se = weighted_moments(ro.terminal, log_weights(ro, r, beta))
    assert ((mean - tilt_mean).abs() < 4 * se).all(), (mean, tilt_mean, se)
    assert ((var - tilt_var).abs() < 0.03 * tilt_var).all(), (var, tilt_var)
    naive, _, naive_se = weighted_moments(ro.terminal, r / beta)
    assert ((naive - tilt_mean).abs() > 10 * naive_se).any()


def ce_run(beta, steps, n_time_steps, gen, **knobs):
    from scoresde.sampling import sample

    opts = CrossEntropyOptions(beta=beta, steps=steps, n_time_steps=n_time_steps, **{"batch_size": 256, "lr": 1e-2,
                                                                                       "lr_final": 1e-3, **knobs})
    torch.manual_seed(0)  # the network's initialisation
    model, hist = cross_entropy(SDE, MIX.score_fn(SDE), R.linear(C_TILT), opts, shape=(2,),
                                network=MLP(2, hidden=64, depth=2), generator=gen)
    with torch.no_grad():
        x = sample(SDE, model, (4000, 2), method="em", nfe=n_time_steps, denoise=False, grid="uniform", generator=gen)
    kl, _ = A.path_kl(SDE, model, MIX.score_fn(SDE), (4000, 2), time_grid(SDE, n_time_steps, kind="uniform"), gen,
                      torch.float32)
    return x.double(), kl, hist


def test_cross_entropy_reaches_tilt(gen):
    """Reduced budget (N = 20, 100 iterations, one reward evaluation per chain) at beta = 1: the closed-form tilt
    within the tolerances of `finetune`'s reduced test (the pretrained law is 0.8 away in the mean, 0.37 in the
    weights), J within 0.05 of its optimum beta log Z, and the pool's effective sample size rising."""
    x, kl, hist = ce_run(1.0, 100, 20, gen)
    check_tilt(x, 1.0, tol_mean=0.1, tol_weight=0.06)
    assert objective_gap(x, kl, 1.0) < 0.05
    assert hist[-1]["reward_evals"] == 100 * 256 and hist[-1]["reward_grad_evals"] == 0
    assert hist[-1]["ess"] / (100 * 256) > 1.3 * hist[0]["ess"] / 256  # 0.57 of the chains at the start


def test_cross_entropy_pool_keeps_the_last_rollouts(gen):
    """With nearly flat weights (beta 1e6, a model that barely moves) the effective sample size counts the pooled
    chains: pool = 1 the current rollout's 256, the default all of them (768 after three rollouts)."""
    _, _, one = ce_run(1e6, 3, 4, gen, pool=1, fit_steps=1, lr=1e-5, lr_final=None)
    _, _, every = ce_run(1e6, 3, 4, gen, fit_steps=1, lr=1e-5, lr_final=None)
    assert all(250 < h["ess"] <= 256 + 1e-9 for h in one), [h["ess"] for h in one]
    assert [round(h["ess"] / 256) for h in every] == [1, 2, 3], [h["ess"] for h in every]


def test_cross_entropy_bad_inputs(gen):
    with pytest.raises(InvalidValueError, match="beta"):
        CrossEntropyOptions(beta=0.0)
    for name, value in (("fit_steps", 0), ("fit_batch", 0), ("pool", 0), ("fit_steps", 1.5)):
        with pytest.raises(InvalidValueError, match=name):
            CrossEntropyOptions(beta=1.0, **{name: value})
    with pytest.raises(InvalidValueError, match="linear SDE"):
        cross_entropy(Langevin(lambda x: 0.5 * x.pow(2).sum(1)), MIX.score_fn(SDE), R.linear(C_TILT), CrossEntropyOptions(beta=1.0), shape=(2,))
    with pytest.raises(InvalidValueError, match="CrossEntropyOptions"):
        cross_entropy(SDE, MIX.score_fn(SDE), R.linear(C_TILT), A.FinetuneOptions(beta=1.0), shape=(2,))
    nan_reward = lambda x: torch.full(x.shape[:1], math.nan)  # noqa: E731
    with pytest.raises(NonFiniteError, match="reward"):
        cross_entropy(SDE, MIX.score_fn(SDE), nan_reward, CrossEntropyOptions(beta=1.0, steps=2, batch_size=8,
                                                                              n_time_steps=3), shape=(2,), generator=gen)
