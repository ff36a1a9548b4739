"""Tests for scoresde.alignment and scoresde.rewards, each against an independent truth."""
import math

import pytest
import torch
from torch import nn

from scoresde import alignment as A
from scoresde import rewards as R
from scoresde.samplers.grids import time_grid
from scoresde.sde import VP
from scoresde.targets import GaussianMixture

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


@pytest.mark.parametrize("grid_kind,n,baseline", [("uniform", 10, "none"), ("poly", 25, "mean")])
def test_policy_gradient_unbiased(gen, grid_kind, n, baseline):
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
        V = A.leave_one_out_mean(G) if baseline == "mean" else torch.zeros_like(G)
        (g,) = torch.autograd.grad(-A.policy_loss(model, ro, G - V, BETA), model.theta)
        grads.append(float(g))
    grads = torch.tensor(grads)
    mean, se = float(grads.mean()), float(grads.std() / math.sqrt(grads.numel()))
    assert abs(mean - float(exact)) < 4 * se, (mean, se, float(exact))
    assert se < 0.1 * abs(float(exact))
    assert abs(float(law_part)) > 5 * se
    print(grid_kind, float(exact), mean, se, float(law_part))
