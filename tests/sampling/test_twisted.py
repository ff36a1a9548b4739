"""Twisted SMC inpainting against the exact conditional of a Gaussian mixture (closed form)."""
import pytest
import torch

from scoresde.core import sde as S
from scoresde.core.errors import InvalidValueError, NonFiniteError
from scoresde.core.targets import GaussianMixture
from scoresde.sampling.guidance import inpaint

F64 = torch.float64
KNOWN, UNKNOWN = [0, 1], [2, 3]
SIGMA_Y = 0.05


def two_modes() -> GaussianMixture:
    """2x2 images from two modes that the known pixels (0, 1) tell apart only weakly and the unknown ones (2, 3)
    well: the conditional's mode weights are what a Gaussian approximation of x_0 | x_t gets wrong."""
    means = torch.tensor([[0.0, 0.0, 1.5, 1.5], [0.6, 0.6, -1.5, -1.5]], dtype=F64)
    a = torch.eye(4, dtype=F64) + 0.6 * torch.eye(4, dtype=F64).roll(2, 0)  # pixel i correlated with i + 2
    return GaussianMixture(torch.tensor([0.7, 0.3], dtype=F64), means, 0.08 * torch.stack([a, a]))


def exact_upper_mode_weight(mix: GaussianMixture, y: torch.Tensor) -> float:
    """P(mode 0 | y), y = x[KNOWN] + N(0, SIGMA_Y^2 I): Bayes' rule with the modes' Gaussian marginals of y."""
    logs = []
    for w, m, c in zip(mix.weights, mix.means, mix.covariances):
        cov = c[KNOWN][:, KNOWN] + SIGMA_Y**2 * torch.eye(2, dtype=F64)
        law = torch.distributions.MultivariateNormal(m[KNOWN], cov)
        logs.append(w.log() + law.log_prob(y))
    return float(torch.softmax(torch.stack(logs), 0)[0])


def image_score(mix, sde):
    flat = mix.score_fn(sde)
    return lambda x, t: flat(x.flatten(1), t).reshape(x.shape)


def test_twisted_smc_draws_the_exact_conditional_mode_weights_as_particles_grow():
    """The exact P(mode 0 | y) is 0.353. One particle (the twisted proposal alone, no weights) and the Tweedie
    h-transform (its Gaussian x_0 | x_t) land near 0.67 and 0.51; 64 weighted particles per image recover it."""
    sde, mix = S.VP(), two_modes()
    y = torch.tensor([0.4, 0.4], dtype=F64)
    want = exact_upper_mode_weight(mix, y)
    n = 1000
    known = torch.cat([y, torch.zeros(2, dtype=F64)]).reshape(1, 1, 2, 2).expand(n, 1, 2, 2).clone()
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64).reshape(1, 2, 2)
    share = lambda x: float((x.flatten(1)[:, 2] > 0).double().mean())
    se = (want * (1 - want) / n) ** 0.5  # 0.015
    run = lambda **kw: inpaint(sde, image_score(mix, sde), known, mask, nfe=100, sigma_y=SIGMA_Y,
                               generator=torch.Generator().manual_seed(0), **kw)
    many = run(method="smc", particles=64)
    assert abs(share(many) - want) < 3 * se + 0.01, (share(many), want)
    assert torch.equal(many.flatten(1)[:, :2], known.flatten(1)[:, :2])
    one = run(method="smc", particles=1)
    assert share(one) - want > 0.2, share(one)
    tweedie = inpaint(sde, image_score(mix, sde), known, mask, nfe=100, generator=torch.Generator().manual_seed(0))
    assert share(tweedie) - want > 0.1, share(tweedie)


def test_twisted_smc_refuses_what_it_cannot_do():
    sde, mix = S.VP(), two_modes()
    known = torch.zeros(2, 1, 2, 2, dtype=F64)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64).reshape(1, 2, 2)
    score = image_score(mix, sde)
    for kw, match in [({"sampler": "heun"}, "sampler must be one of em, ei"), ({"particles": 0}, "particles"),
                      ({"ess_min": 2.0}, "ess_min must be in"), ({"sigma_y": -1.0}, "sigma_y"),
                      ({"cg_iters": 3}, "cg_iters applies to method 'tweedie' only")]:
        with pytest.raises(InvalidValueError, match=match):
            inpaint(sde, score, known, mask, method="smc", nfe=4, **kw)
    with pytest.raises(InvalidValueError, match="mask must have the shape"):
        inpaint(sde, score, known, torch.ones(3, 3, dtype=F64), method="smc", nfe=4)
    with pytest.raises(NonFiniteError, match="twisted inpainting at nfe=4: the particles' weights are not finite"):
        inpaint(sde, lambda x, t: x * float("nan"), known, mask, method="smc", nfe=4)
