"""Guidance and inpainting against exact conditionals of Gaussian models."""
import math

import pytest
import torch

from scoresde.core import sde as S
from scoresde.core.targets import GaussianMixture
from scoresde.sampling.guidance import classifier_free, classifier_guidance, inpaint, inpaint_score


def image_gaussian(gen):
    """A Gaussian model of 2x2 one-channel images with a full covariance."""
    A = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    cov = 0.1 * A @ A.T + 0.05 * torch.eye(4, dtype=torch.float64)
    mean = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
    return GaussianMixture(torch.ones(1, dtype=torch.float64), mean[None], cov[None])


def image_score(mix, sde):
    flat = mix.score_fn(sde)
    return lambda x, t: flat(x.flatten(1), t).reshape(x.shape)


def exact_conditional(mix, y_known, known, unknown):
    m, C = mix.means[0], mix.covariances[0]
    K = C[unknown][:, known] @ torch.linalg.inv(C[known][:, known])
    return m[unknown] + K @ (y_known - m[known]), C[unknown][:, unknown] - K @ C[known][:, unknown]


@pytest.mark.parametrize("sampler, nfe", [("em", 400), ("heun", 60)])
def test_tweedie_inpainting_draws_the_exact_conditional(sampler, nfe, gen):
    sde = S.VP()
    mix = image_gaussian(gen)
    n = 3000
    y = torch.tensor([0.8, -0.5, 0.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 2, 2)
    known = y.reshape(1, 1, 2, 2).expand(n, 1, 2, 2)
    x = inpaint(sde, image_score(mix, sde), known, mask, sampler=sampler, nfe=nfe, generator=gen)
    u = x.flatten(1)[:, 2:]
    torch.testing.assert_close(x.flatten(1)[:, :2], y[:2].expand(n, 2))
    mean, cov = exact_conditional(mix, y[:2], [0, 1], [2, 3])
    sd = cov.diagonal().sqrt()
    assert ((u.mean(0) - mean).abs() / sd).max() < 4 / math.sqrt(n) + 0.03
    assert ((torch.cov(u.T) - cov).abs() / torch.outer(sd, sd)).max() < 0.08


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_tweedie_conditional_score_matches_closed_form(weight, gen):
    """For Gaussian data the wrapped score equals grad log p_t(x | x0[known] = y), computed in closed form; with a
    weight w it is grad log p_t(x) + w (grad log p_t(x | y) - grad log p_t(x)), the score of p_t(x) p(y | x_t)^w."""
    sde = S.VP()
    mix = image_gaussian(gen)
    y = torch.tensor([0.8, -0.5, 0.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 2, 2)
    x = torch.randn(5, 1, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.full((5,), 0.3, dtype=torch.float64)
    got = inpaint_score(sde, image_score(mix, sde), y.reshape(1, 1, 2, 2).expand(5, 1, 2, 2), mask,
                        weight=weight)(x, t)
    # x_t | x0[known] = y is Gaussian: mean alpha m_c, covariance alpha^2 C_c + sigma^2 I, with (m_c, C_c)
    # the conditional law of x0 (C_c zero on the known block)
    mean_u, cov_u = exact_conditional(mix, y[:2], [0, 1], [2, 3])
    m_c = torch.cat([y[:2], mean_u])
    C_c = torch.zeros(4, 4, dtype=torch.float64)
    C_c[2:, 2:] = cov_u
    a, s = sde.alpha(t[0]), sde.sigma(t[0])
    P = torch.linalg.inv(a**2 * C_c + s**2 * torch.eye(4, dtype=torch.float64))
    want = -(x.flatten(1) - a * m_c) @ P
    # the unconditional score of the same Gaussian, x_t ~ N(alpha m, alpha^2 C + sigma^2 I)
    m, C = mix.means[0], mix.covariances[0]
    free = -(x.flatten(1) - a * m) @ torch.linalg.inv(a**2 * C + s**2 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(got.flatten(1), free + weight * (want - free), rtol=1e-6, atol=1e-8)


def test_replacement_bias_does_not_shrink_with_nfe(gen):
    """Why inpainting defaults to "tweedie" (the test above calls `inpaint` without a method, and meets a
    4-sigma + 0.03 bound on the conditional mean): "replace" misses the exact conditional mean by more than
    4 Monte Carlo sigma + 0.05 at 100 and at 400 steps alike (Song et al.'s replacement is biased)."""
    sde, mix, n = S.VP(), image_gaussian(gen), 3000
    y = torch.tensor([0.8, -0.5, 0.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 2, 2)
    known = y.reshape(1, 1, 2, 2).expand(n, 1, 2, 2)
    mean, cov = exact_conditional(mix, y[:2], [0, 1], [2, 3])
    errors = []
    for nfe in (100, 400):
        x = inpaint(sde, image_score(mix, sde), known, mask, method="replace", sampler="em", nfe=nfe, generator=gen)
        errors.append(float(((x.flatten(1)[:, 2:].mean(0) - mean).abs() / cov.diagonal().sqrt()).max()))
    assert min(errors) > 4 / math.sqrt(n) + 0.05 and errors[1] > 0.7 * errors[0], errors


def test_replace_method_runs_and_keeps_known_pixels(gen):
    sde = S.VP()
    mix = image_gaussian(gen)
    known = torch.zeros(50, 1, 2, 2, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)[None]
    x = inpaint(sde, image_score(mix, sde), known, mask, method="replace", sampler="em", nfe=50, generator=gen)
    assert torch.isfinite(x).all() and (x[:, 0, 0, 0] == 0).all() and (x[:, 0, 1, 1] == 0).all()


def two_class_mixture():
    return GaussianMixture(torch.tensor([0.4, 0.6]), torch.tensor([[-1.0, 0.0], [1.0, 0.5]]),
                           torch.tensor([[[0.2, 0.05], [0.05, 0.1]], [[0.1, 0.0], [0.0, 0.3]]]))


def component(mix, k):
    return GaussianMixture(torch.ones(1, dtype=torch.float64), mix.means[k:k + 1], mix.covariances[k:k + 1])


def test_classifier_guidance_with_exact_posterior_gives_class_score(gen):
    """s_t(x) + grad log p_t(y | x) = grad log p_t(x | y): with the mixture's responsibilities as classifier."""
    sde = S.VP()
    mix = two_class_mixture()

    def log_probs(x, t):
        pt = mix.at_time(sde, t)
        comps = torch.stack([component(mix, k).at_time(sde, t).log_prob(x) for k in range(2)], 1)
        return comps + mix.weights.log() - pt.log_prob(x)[:, None]

    x = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(20, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    y = torch.randint(0, 2, (20,), generator=gen)
    got = classifier_guidance(mix.score_fn(sde), log_probs, y)(x, t)
    want = torch.where((y == 0)[:, None], component(mix, 0).score_fn(sde)(x, t), component(mix, 1).score_fn(sde)(x, t))
    torch.testing.assert_close(got, want)


def test_classifier_free_guidance_weights(gen):
    sde = S.VP()
    mix = two_class_mixture()
    cond = lambda x, t, y: (mix.score_fn(sde) if y is None else component(mix, 1).score_fn(sde))(x, t)
    x = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    t = torch.full((10,), 0.4, dtype=torch.float64)
    y = torch.ones(10, dtype=torch.long)
    torch.testing.assert_close(classifier_free(cond, y, 0.0)(x, t), cond(x, t, y))
    torch.testing.assert_close(classifier_free(cond, y, 2.0)(x, t), 3 * cond(x, t, y) - 2 * cond(x, t, None))


def test_inpaint_validation():
    with pytest.raises(ValueError, match="method must be one of tweedie, replace"):
        inpaint_score(S.VP(), lambda x, t: x, torch.zeros(2, 3), torch.ones(3), method="gibbs")
    with pytest.raises(ValueError, match="mask must have the shape"):
        inpaint_score(S.VP(), lambda x, t: x, torch.zeros(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match="weight applies to method 'tweedie' only"):
        inpaint_score(S.VP(), lambda x, t: x, torch.zeros(2, 3), torch.ones(3), method="replace", weight=2.0)
    with pytest.raises(ValueError, match="weight must be a finite number > 0"):
        inpaint_score(S.VP(), lambda x, t: x, torch.zeros(2, 3), torch.ones(3), weight=float("nan"))
    with pytest.raises(ValueError, match="cg_iters must be an integer >= 1"):
        inpaint_score(S.VP(), lambda x, t: x, torch.zeros(2, 3), torch.ones(3), cg_iters=0)
    with pytest.raises(ValueError, match="inpaint method 'smc' takes no option 'eta'; its options: particles, sigma_y"):
        inpaint(S.VP(), lambda x, t: x, torch.zeros(2, 3), torch.ones(3), method="smc", eta=1.0)
    with pytest.raises(ValueError, match="method 'em' takes no option 'eta'"):
        inpaint(S.VP(), lambda x, t: x, torch.zeros(2, 3), torch.ones(3), eta=1.0)


def test_cg_solves_spd_systems_and_stops_at_negative_curvature(gen):
    """Against torch.linalg.solve on random SPD matrices; on an indefinite one (a learned score's Jacobian need not be
    negative definite) each sample stops where p^T A p <= 0 and stays finite instead of dividing by ~0."""
    from scoresde.sampling.guidance import _cg

    d = 6
    m = torch.randn(3, d, d, generator=gen, dtype=torch.float64)
    spd = m @ m.transpose(1, 2) + 0.5 * torch.eye(d, dtype=torch.float64)
    b = torch.randn(3, d, generator=gen, dtype=torch.float64)
    q = _cg(lambda v: (spd @ v[..., None])[..., 0], b, iters=50, tol=1e-12)
    assert torch.allclose(q, torch.linalg.solve(spd, b), atol=1e-9)
    flip = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))  # b = (1, 1): p^T A p = 0 at the first step
    mats = torch.stack([flip, torch.eye(2, dtype=torch.float64)])
    q = _cg(lambda v: (mats @ v[..., None])[..., 0], torch.ones(2, 2, dtype=torch.float64), iters=10, tol=1e-12)
    assert torch.equal(q[0], torch.zeros(2, dtype=torch.float64))  # stopped before any step
    assert torch.allclose(q[1], torch.ones(2, dtype=torch.float64))  # the other sample is solved
