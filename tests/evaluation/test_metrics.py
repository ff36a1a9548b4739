import math

import numpy as np
import ot
import pytest
import scipy.linalg
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm

from scoresde.core.targets import GaussianMixture, ring
from scoresde.evaluation.metrics import (
    Estimate,
    frechet_distance,
    frechet_distance_infinity,
    kl_gaussian,
    mmd2,
    mmd2_fourier,
    sliced_w2,
    tv,
    tv_grid,
    w2,
    w2_floor,
    w2_gaussian,
)


def _spd(rng, d, jitter=0.3):
    B = rng.normal(size=(d, d))
    return B @ B.T / d + jitter * np.eye(d)


def test_w2_gaussian_1d_and_diagonal_closed_form():
    # 1-D: W2^2 = (m1 - m2)^2 + (s1 - s2)^2; diagonal covariances add coordinate-wise.
    assert w2_gaussian([0.3], [[4.0]], [-1.0], [[0.25]]) == pytest.approx(math.sqrt(1.3**2 + 1.5**2), rel=1e-12)
    m1, m2 = np.array([1.0, 2.0, 0.0]), np.array([0.0, -1.0, 0.5])
    s1, s2 = np.array([1.0, 0.5, 2.0]), np.array([0.3, 1.5, 2.0])
    expect = math.sqrt(((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    assert w2_gaussian(m1, np.diag(s1**2), m2, np.diag(s2**2)) == pytest.approx(expect, rel=1e-12)
    assert w2_gaussian(m1, np.diag(s1**2), m1, np.diag(s1**2)) == pytest.approx(0.0, abs=1e-7)


def test_w2_gaussian_against_pot_on_large_samples():
    rng = np.random.default_rng(0)
    m1, m2 = np.array([0.0, 0.0]), np.array([1.5, -0.5])
    C1, C2 = _spd(rng, 2), _spd(rng, 2)
    n = 2000
    x = rng.multivariate_normal(m1, C1, size=n)
    y = rng.multivariate_normal(m2, C2, size=n)
    exact = w2_gaussian(m1, C1, m2, C2)
    # Empirical W2 is biased upward by about the floor; 2000 points in 2-D put it within a few percent.
    assert w2(x, y) == pytest.approx(exact, rel=0.05)
    # POT's own Gaussian OT (Bures-Wasserstein) agrees with the closed form.
    pot = float(ot.gaussian.bures_wasserstein_distance(m1, m2, C1, C2))
    assert exact == pytest.approx(pot, rel=1e-6)


def test_w2_matches_linear_sum_assignment():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(30, 3)) + 0.7
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    assert w2(x, y) == pytest.approx(math.sqrt(cost[r, c].mean()), rel=1e-10)
    assert w2(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(0.0, abs=1e-7)


def test_w2_floor_is_the_statistic_between_two_reference_draws(gen):
    target = ring()
    fl = w2_floor(lambda n: target.sample(n, gen), 300, repeats=3)
    assert isinstance(fl, Estimate) and fl.value > 0 and fl.stderr > 0
    # a sample shifted by 1 is far above the floor
    assert w2(target.sample(300, gen) + 1.0, target.sample(300, gen)) > fl.value + 10 * fl.stderr


def test_sliced_w2_is_the_mean_of_exact_1d_distances(gen):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 3)), 2 * rng.normal(size=(25, 3)) + 0.5  # unequal sizes
    dirs = rng.normal(size=(5, 3))
    u = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    per_dir = [ot.emd2(np.full(40, 1 / 40), np.full(25, 1 / 25), ot.dist((x @ v)[:, None], (y @ v)[:, None]))
               for v in u]
    assert sliced_w2(x, y, directions=dirs) == pytest.approx(math.sqrt(np.mean(per_dir)), rel=1e-9)
    assert sliced_w2(x, x, generator=gen) == pytest.approx(0.0, abs=1e-12)


def test_mmd2_exact_sampler_scores_zero_and_stderr_is_calibrated():
    target = ring()
    gen = torch.Generator().manual_seed(0)
    reps = 100
    null, alt, null_se, alt_se = [], [], [], []
    for _ in range(reps):
        x = target.sample(200, gen)
        e = mmd2(x, target)
        null.append(e.value), null_se.append(e.stderr)
        e = mmd2(x * 1.3, target)
        alt.append(e.value), alt_se.append(e.stderr)
    null, alt = np.array(null), np.array(alt)
    # the mean of the unbiased null estimates is 0 within 4 standard errors of that mean
    assert abs(null.mean()) < 4 * null.std(ddof=1) / math.sqrt(reps)
    assert abs(null[0]) < 3 * null_se[0]
    # the reported stderr matches the spread of the estimates (std of a std over 100 reps: ~10 percent)
    assert 0.75 < np.mean(alt_se) / alt.std(ddof=1) < 1.3
    assert 0.75 < np.mean(null_se) / null.std(ddof=1) < 1.6
    assert alt.mean() > 5 * np.mean(alt_se)


def test_mmd2_closed_form_matches_sample_target(gen):
    target = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[0.0, 1.0], [1.0, -1.0]]),
                             torch.stack([torch.eye(2) * 0.5, torch.tensor([[1.0, 0.3], [0.3, 0.4]])]))
    x = target.sample(400, gen) * 1.3 + 0.2
    exact = mmd2(x, target, bandwidths=[0.7, 2.0])
    sampled = mmd2(x, target.sample(3000, gen), bandwidths=[0.7, 2.0])
    assert exact.value == pytest.approx(sampled.value, abs=4 * sampled.stderr)
    assert exact.value > 4 * exact.stderr


def _mixture_pair_kernel_mean(p: GaussianMixture, q: GaussianMixture, h: float) -> float:
    """E exp(-|y - z|^2 / 2h^2) for independent y ~ p, z ~ q: the Gaussian integral
    sum_kj w_k v_j (2 pi h^2)^{d/2} N(mu_k - nu_j; 0, S_k + T_j + h^2 I), by scipy."""
    from scipy.stats import multivariate_normal
    d, total = p.dim, 0.0
    for wk, mk, Sk in zip(p.weights, p.means, p.covariances):
        for vj, nj, Tj in zip(q.weights, q.means, q.covariances):
            cov = (Sk + Tj).numpy() + h**2 * np.eye(d)
            total += float(wk * vj) * (2 * math.pi * h**2) ** (d / 2) * multivariate_normal(np.zeros(d), cov).pdf(
                (mk - nj).numpy())
    return total


def test_mmd2_fourier_matches_the_closed_form_between_two_mixtures(gen):
    p = GaussianMixture(torch.tensor([0.3, 0.7], dtype=torch.float64),
                        torch.tensor([[0.0, 1.0, 0.5], [1.0, -1.0, 0.0]], dtype=torch.float64),
                        torch.stack([torch.eye(3) * 0.5, torch.diag(torch.tensor([1.0, 0.4, 0.2]))]).double())
    q = GaussianMixture(p.weights.flip(0), p.means * 1.1 + 0.05, p.covariances * 0.9)
    h = [0.8, 2.0]
    truth = sum(_mixture_pair_kernel_mean(p, p, b) + _mixture_pair_kernel_mean(q, q, b)
                - 2 * _mixture_pair_kernel_mean(p, q, b) for b in h)
    e = mmd2_fourier(q.sample(20000, gen), p, bandwidths=h, generator=gen)
    assert e.value == pytest.approx(truth, abs=4 * e.stderr)
    assert truth > 20 * e.stderr
    x = q.sample(1500, gen)  # the same statistic as the pairwise U-statistic, up to the frequency noise
    assert mmd2_fourier(x, p, h, generator=gen).value == pytest.approx(mmd2(x, p, h).value, rel=0.1)


def test_mmd2_fourier_scores_zero_for_an_exact_sampler_with_a_calibrated_stderr():
    target, gen, reps = ring(), torch.Generator().manual_seed(1), 40
    est = [mmd2_fourier(target.sample(2000, gen), target, n_frequencies=256, generator=gen) for _ in range(reps)]
    values, se = np.array([e.value for e in est]), np.array([e.stderr for e in est])
    assert abs(values.mean()) < 4 * values.std(ddof=1) / math.sqrt(reps)
    assert 0.7 < np.median(se) / values.std(ddof=1) < 1.5
    with pytest.raises(ValueError, match="target must be a GaussianMixture"):
        mmd2_fourier(values[:, None], np.zeros((10, 1)))
    with pytest.raises(ValueError, match="n_frequencies"):
        mmd2_fourier(target.sample(10, gen), target, n_frequencies=1)


def _tv_1d_gauss(m1, s1, m2, s2):
    """TV of two 1-D Gaussians from the crossing points of their densities."""
    # log p - log q = 0 is a quadratic a x^2 + b x + c = 0
    a = 0.5 / s2**2 - 0.5 / s1**2
    b = m1 / s1**2 - m2 / s2**2
    c = 0.5 * m2**2 / s2**2 - 0.5 * m1**2 / s1**2 + math.log(s2 / s1)
    roots = np.sort(np.roots([a, b, c]).real) if a != 0 else np.array([-c / b])
    edges = np.concatenate([[-np.inf], roots, [np.inf]])
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        P = norm.cdf(hi, m1, s1) - norm.cdf(lo, m1, s1)
        Q = norm.cdf(hi, m2, s2) - norm.cdf(lo, m2, s2)
        total += abs(P - Q)
    return 0.5 * total


@pytest.mark.parametrize("m2,s2", [(1.0, 2.0), (0.5, 1.0), (0.0, 0.7)])
def test_tv_against_1d_closed_form(gen, m2, s2):
    p = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    q = torch.distributions.Normal(torch.tensor(m2, dtype=torch.float64), torch.tensor(s2, dtype=torch.float64))
    x = p.sample((100_000,))
    est = tv(p.log_prob, q.log_prob, x)
    assert abs(est.value - _tv_1d_gauss(0.0, 1.0, m2, s2)) < 4 * est.stderr


def test_tv_in_2d_against_quadrature(gen):
    rng = np.random.default_rng(3)
    p = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), torch.from_numpy(_spd(rng, 2)))
    q = torch.distributions.MultivariateNormal(torch.tensor([0.8, -0.3], dtype=torch.float64),
                                               torch.from_numpy(_spd(rng, 2)))
    g = torch.linspace(-9, 9, 1201, dtype=torch.float64)
    mesh = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    h = float(g[1] - g[0])
    quadrature = 0.5 * float((p.log_prob(mesh).exp() - q.log_prob(mesh).exp()).abs().sum()) * h * h
    est = tv(p.log_prob, q.log_prob, p.sample((100_000,)))
    assert abs(est.value - quadrature) < 4 * est.stderr


def test_tv_grid_floor_and_value(gen):
    p = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    x = p.sample((50_000,))[:, None]
    exact_sampler = tv_grid(x, lambda z: p.log_prob(z[:, 0]), bins=60, bounds=[(-5, 5)])
    assert 0.5 * exact_sampler.floor < exact_sampler.value < 2 * exact_sampler.floor
    shifted = tv_grid(x + 0.5, lambda z: p.log_prob(z[:, 0]), bins=60, bounds=[(-5, 5)])
    truth = _tv_1d_gauss(0.5, 1.0, 0.0, 1.0)
    assert abs(shifted.value - truth) < 3 * shifted.floor + 0.01
    two_d = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    res = tv_grid(two_d.sample((20_000,)), two_d.log_prob, bins=30, bounds=[(-5, 5), (-5, 5)])
    assert 0.5 * res.floor < res.value < 2 * res.floor


def test_tv_grid_stays_a_distance_for_densities_sharper_than_the_cells(gen):
    """A density far narrower than a cell: the midpoint rule puts mass 399 in the centre cell; rescaled to 1,
    samples of that density are at TV ~0 from it and samples far away at TV 1 (the bound)."""
    p = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64))
    log_q = lambda z: p.log_prob(z[:, 0])
    near = tv_grid(p.sample((1000,))[:, None], log_q, bins=3, bounds=[(-1.5, 1.5)], subcells=1)
    far = tv_grid(torch.full((1000, 1), 1.0, dtype=torch.float64), log_q, bins=3, bounds=[(-1.5, 1.5)], subcells=1)
    assert near.value < 1e-12 and far.value == pytest.approx(1.0)


def test_kl_gaussian_against_torch():
    rng = np.random.default_rng(4)
    m1, m2, C1, C2 = rng.normal(size=3), rng.normal(size=3), _spd(rng, 3), _spd(rng, 3)
    ref = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(torch.from_numpy(m1), torch.from_numpy(C1)),
        torch.distributions.MultivariateNormal(torch.from_numpy(m2), torch.from_numpy(C2)))
    assert kl_gaussian(m1, C1, m2, C2) == pytest.approx(float(ref), rel=1e-10)


def test_frechet_distance_is_the_fid_formula():
    rng = np.random.default_rng(5)
    fx, fy = rng.normal(size=(500, 4)), rng.normal(size=(400, 4)) @ _spd(rng, 4) + 0.3
    mx, my, cx, cy = fx.mean(0), fy.mean(0), np.cov(fx.T), np.cov(fy.T)
    fid = ((mx - my) ** 2).sum() + np.trace(cx + cy - 2 * scipy.linalg.sqrtm(cx @ cy).real)
    assert frechet_distance(fx, fy) == pytest.approx(fid, rel=1e-8)
    assert frechet_distance(fx, fy) == pytest.approx(w2_gaussian(mx, cx, my, cy) ** 2, rel=1e-10)


def test_frechet_distance_infinity_removes_the_small_sample_bias_of_the_fid():
    """40 sets of 100 Gaussian features in 8-D against a reference of 100,000: the plain distance sits above the
    closed-form W2^2 of the two Gaussians by several standard errors, the extrapolated one within 3 of it (the
    reference's own bias, about 2 d / 100,000, is far below either)."""
    rng = np.random.default_rng(1)
    d = 8
    a, b = rng.normal(size=(2, d, d)) / np.sqrt(d)
    c1, c2, m2 = a @ a.T + 0.1 * np.eye(d), (a @ a.T + b @ b.T) / 2 + 0.05 * np.eye(d), np.full(d, 0.05)
    truth = w2_gaussian(np.zeros(d), c1, m2, c2) ** 2
    ref = rng.normal(size=(100_000, d)) @ np.linalg.cholesky(c1).T
    sets = [rng.normal(size=(100, d)) @ np.linalg.cholesky(c2).T + m2 for _ in range(40)]
    plain = np.array([frechet_distance(f, ref) for f in sets])
    extrapolated = np.array([frechet_distance_infinity(f, ref) for f in sets])
    se = lambda a: a.std(ddof=1) / np.sqrt(len(a))
    assert plain.mean() - truth > 4 * se(plain)
    assert abs(extrapolated.mean() - truth) < 3 * se(extrapolated)
    assert frechet_distance_infinity(sets[0], ref) == frechet_distance_infinity(sets[0], ref)  # seeded subsets
    with pytest.raises(ValueError, match=r"feats_x needs more than 2 \(d \+ 1\)"):
        frechet_distance_infinity(sets[0][:17], ref)
    with pytest.raises(ValueError, match="sizes"):
        frechet_distance_infinity(sets[0], ref, sizes=1)


def test_bad_inputs_raise_naming_the_parameter():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="y must have dimension 2"):
        w2(x, np.zeros((10, 3)))
    with pytest.raises(ValueError, match="x must have a floating dtype"):
        w2(np.zeros((10, 2), dtype=np.int64), x)
    with pytest.raises(ValueError, match="x must have shape"):
        sliced_w2(np.zeros(10), x)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd2(x + np.arange(10)[:, None], ring(), bandwidths=[-1.0])
    with pytest.raises(ValueError, match="target has dimension"):
        mmd2(np.zeros((10, 3)), ring())
    with pytest.raises(ValueError, match="covariance must be symmetric"):
        w2_gaussian([0, 0], [[1, 0.5], [0, 1]], [0, 0], np.eye(2))
    with pytest.raises(ValueError, match="log_q"):
        tv(lambda z: z[:, 0], lambda z: z, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="dimension"):
        tv_grid(np.zeros((10, 3)), lambda z: z[:, 0])
