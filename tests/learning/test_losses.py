"""Score-matching losses: one scale across all four (T 4.1-4.3), exact pieces against autograd, training."""
import math

import pytest
import torch

from scoresde.core.sde import OU, VE, VP, ContractiveVP, Langevin, SubVP
from scoresde.core.targets import GaussianMixture
from scoresde.learning.losses import (
    LOSSES,
    denoising_score_matching,
    explicit_score_matching,
    implicit_score_matching,
    loss_weight,
    sample_time,
    sliced_score_matching,
)

F64 = torch.float64
NAMES = ["explicit", "implicit", "sliced", "denoising"]


def mixture() -> GaussianMixture:
    covs = torch.stack([torch.tensor([[0.5, 0.1], [0.1, 0.3]]), 0.4 * torch.eye(2)])
    return GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), covs)


def perturbed(score, sde):
    """A nonlinear, non-conservative perturbation of size 1/sigma (so lambda |delta|^2 = O(1) for sigma2)."""
    W = torch.tensor([[1.0, -0.7], [0.4, 0.9]], dtype=F64)
    return lambda x, t: score(x, t) + 0.7 * torch.sin(x @ W + 0.3) / sde.sigma(t)[:, None]


def paired_losses(name, score_fns, sde, x0, **kw):
    """Per-sample losses of several score functions on the same x0, t, noise and projections."""
    out = []
    for f in score_fns:
        extra = {"true_score": kw["true_score"]} if name == "explicit" else {}
        args = {k: v for k, v in kw.items() if k != "true_score"}
        out.append(LOSSES[name](f, sde, x0, generator=torch.Generator().manual_seed(7), **args, **extra))
    return out


@pytest.mark.parametrize("sde, weighting, importance", [
    (VP(), "sigma2", False), (SubVP(), "g2", False), (VE(sigma_max=5.0), "sigma2", False), (VP(), "g2", True),
    (VP(), lambda t: VP().sigma(t) ** 2 * (1 + t), True),
], ids=["vp-sigma2", "subvp-g2", "ve-sigma2", "vp-g2-importance", "vp-callable-importance"])
def test_differences_agree_across_losses(sde, weighting, importance):
    """L(s1) - L(s2) has the same mean for all four losses (each = explicit + const, T 4.1-4.3)."""
    g = torch.Generator().manual_seed(0)
    n, tgt = 20000, mixture()
    x0, noise = tgt.sample(n, g), torch.randn(n, 2, generator=g, dtype=F64)
    true = tgt.score_fn(sde)
    kw = dict(noise=noise, weighting=weighting, importance=importance, true_score=true)
    if not importance:
        kw["t"] = sde.t_min + (sde.T - sde.t_min) * torch.rand(n, generator=g, dtype=F64)
    s1, s2 = true, perturbed(true, sde)
    delta = {name: torch.sub(*paired_losses(name, [s1, s2], sde, x0, **kw)) for name in NAMES}
    ref = delta["explicit"]
    for name in NAMES[1:]:
        d = delta[name] - ref
        se = d.std() / math.sqrt(n)
        assert abs(d.mean()) < 4 * se, (name, d.mean().item(), se.item())
        assert abs(ref.mean()) > 10 * se, (name, ref.mean().item(), se.item())  # the check has power


def test_importance_sampling_keeps_the_mean():
    """E over importance-sampled t of r lambda L equals the uniform-t mean (independent draws)."""
    sde, tgt, n = VP(), mixture(), 40000
    true = tgt.score_fn(sde)
    s = perturbed(true, sde)
    x0 = tgt.sample(n, torch.Generator().manual_seed(1))
    u = explicit_score_matching(s, sde, x0, true_score=true, weighting="g2", generator=torch.Generator().manual_seed(2))
    q = explicit_score_matching(s, sde, x0, true_score=true, weighting="g2", importance=True,
                                generator=torch.Generator().manual_seed(3))
    se = math.sqrt(u.var() / n + q.var() / n)
    assert abs(u.mean() - q.mean()) < 4 * se
    assert q.var() < u.var()  # the point of importance sampling for the likelihood weighting


def test_sample_time_density():
    """Importance draws follow q prop. to g^2 / sigma^2: compare the CDF at a few points with quadrature."""
    sde = VP()
    t, r = sample_time(sde, 200000, weighting="g2", importance=True, generator=torch.Generator().manual_seed(0))
    assert t.min() >= sde.t_min and t.max() <= sde.T and (r > 0).all()
    grid = torch.linspace(sde.t_min, sde.T, 200001, dtype=F64)
    dens = sde.diffusion(grid) ** 2 / sde.sigma(grid) ** 2
    cdf = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(0.5 * (dens[1:] + dens[:-1]) * grid.diff(), 0)])
    cdf = cdf / cdf[-1]
    for q in [0.005, 0.02, 0.1, 0.5]:
        emp = (t <= q).double().mean()
        exact = cdf[torch.searchsorted(grid, torch.tensor(q, dtype=F64))]
        assert abs(emp - exact) < 5 * math.sqrt(exact * (1 - exact) / t.numel()) + 2e-3, (q, emp, exact)
    # r = (1 / (T - t_min)) / q(t): its mean under q is 1
    assert abs(r.mean() - 1) < 5 * r.std() / math.sqrt(r.numel())


def test_explicit_closed_form():
    """Zero for the exact score; lambda |c / sigma|^2 = |c|^2 (sigma2 weighting) for a shift c / sigma."""
    sde, tgt = VP(), mixture()
    true = tgt.score_fn(sde)
    x0 = tgt.sample(256, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    assert explicit_score_matching(true, sde, x0, true_score=true, generator=g).abs().max() < 1e-20
    c = torch.tensor([0.3, -1.2], dtype=F64)
    shifted = lambda x, t: true(x, t) + c / sde.sigma(t)[:, None]  # noqa: E731
    loss = explicit_score_matching(shifted, sde, x0, true_score=true, generator=g)
    torch.testing.assert_close(loss, torch.full_like(loss, float(c @ c)))
    uni = explicit_score_matching(shifted, sde, x0, true_score=true, generator=g, weighting="uniform",
                                  t=torch.full((256,), 0.3, dtype=F64))
    torch.testing.assert_close(uni, torch.full_like(uni, float(c @ c) / float(sde.sigma(torch.tensor(0.3))) ** 2))


class ConvScore(torch.nn.Module):
    """A small nonlinear score for images (batch, 1, 3, 3): conv + tanh, time-dependent."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=F64)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (1 + t[:, None, None, None]) - x


def mlp_score(d, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, d)).double()
    return lambda x, t: net(torch.cat([x, t[:, None]], 1))


def per_sample_jacobian(score_fn, x, t):
    """(batch, D, D) Jacobians of each sample's score, from torch.func (independent of the losses' VJP loop)."""
    def one(xi, ti):
        return score_fn(xi[None], ti[None])[0].flatten()
    jac = torch.func.vmap(torch.func.jacrev(one))(x, t)
    return jac.reshape(x.shape[0], x[0].numel(), x[0].numel())


@pytest.mark.parametrize("shape", [(64, 3), (8, 1, 3, 3)], ids=["vector", "image"])
def test_implicit_is_norm_plus_twice_jacobian_trace(shape):
    sde, g = VP(), torch.Generator().manual_seed(0)
    score_fn = mlp_score(3) if len(shape) == 2 else ConvScore()
    x0 = torch.randn(shape, generator=g, dtype=F64)
    t = torch.rand(shape[0], generator=g, dtype=F64) * 0.9 + 0.05
    noise = torch.randn(shape, generator=g, dtype=F64)
    loss = implicit_score_matching(score_fn, sde, x0, t=t, noise=noise, weighting="uniform")
    xt = sde.sample_marginal(x0, t, noise)
    s = score_fn(xt, t)
    trace = torch.diagonal(per_sample_jacobian(score_fn, xt, t), dim1=1, dim2=2).sum(1)
    torch.testing.assert_close(loss, s.flatten(1).pow(2).sum(1) + 2 * trace)
    with torch.no_grad():  # still exact under no_grad, returned detached
        again = implicit_score_matching(score_fn, sde, x0, t=t, noise=noise, weighting="uniform")
    assert not again.requires_grad
    torch.testing.assert_close(again, loss.detach())


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
def test_sliced_many_projections_approach_implicit(projection):
    """Variance-reduced sliced with M projections = implicit + noise of sd 2 lambda sqrt(Var(v^T J v) / M)."""
    sde, g, d, n, M = VP(), torch.Generator().manual_seed(0), 3, 16, 4000
    score_fn = mlp_score(d, seed=1)
    x0, noise = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)
    t = torch.rand(n, generator=g, dtype=F64) * 0.9 + 0.05
    kw = dict(t=t, noise=noise, weighting="uniform")
    imp = implicit_score_matching(score_fn, sde, x0, **kw)
    sl = sliced_score_matching(score_fn, sde, x0, **kw, n_projections=M, projection=projection,
                               variance_reduced=True, generator=torch.Generator().manual_seed(3))
    J = per_sample_jacobian(score_fn, sde.sample_marginal(x0, t, noise), t)
    S = 0.5 * (J + J.transpose(1, 2))
    off = S - torch.diag_embed(torch.diagonal(S, dim1=1, dim2=2))
    var = 2 * (off**2).sum((1, 2)) if projection == "rademacher" else 2 * (S**2).sum((1, 2))
    sd = 2 * torch.sqrt(var / M)
    assert ((sl - imp).abs() < 5 * sd).all(), ((sl - imp) / sd)
    assert ((sl - imp).abs() > 0).any()  # genuinely random, not a copy of the implicit loss


def test_variance_reduced_sliced_has_the_same_mean():
    sde, tgt, n = VP(), mixture(), 20000
    g = torch.Generator().manual_seed(0)
    x0 = tgt.sample(n, g)
    s = perturbed(tgt.score_fn(sde), sde)
    plain = sliced_score_matching(s, sde, x0, generator=torch.Generator().manual_seed(1))
    vr = sliced_score_matching(s, sde, x0, generator=torch.Generator().manual_seed(1), variance_reduced=True)
    d = plain - vr  # same t, x_t and v: only (v^T s)^2 versus |s|^2 differs
    assert abs(d.mean()) < 4 * d.std() / math.sqrt(n)
    assert d.abs().max() > 0.1


def test_sliced_multi_projection_averages_single_ones():
    """M projections = the mean of M single-projection losses drawn from the same generator stream."""
    sde, g = VP(), torch.Generator().manual_seed(0)
    score_fn = mlp_score(2, seed=2)
    x0, noise = torch.randn(32, 2, generator=g, dtype=F64), torch.randn(32, 2, generator=g, dtype=F64)
    t = torch.rand(32, generator=g, dtype=F64) * 0.9 + 0.05
    kw = dict(t=t, noise=noise, projection="rademacher")
    many = sliced_score_matching(score_fn, sde, x0, n_projections=3, generator=torch.Generator().manual_seed(4), **kw)
    g1 = torch.Generator().manual_seed(4)
    singles = torch.stack([sliced_score_matching(score_fn, sde, x0, generator=g1, **kw) for _ in range(3)])
    torch.testing.assert_close(many, singles.mean(0))


def gaussian_truth(sde, t0, mu, cov):
    """Closed form: X_t ~ N(alpha mu, alpha^2 Sigma + sigma^2 I), score = -P (x - alpha mu), P its precision."""
    a, s = float(sde.alpha(torch.tensor(t0))), float(sde.sigma(torch.tensor(t0)))
    P = torch.linalg.inv(a**2 * cov + s**2 * torch.eye(2, dtype=F64))
    return -P, P @ (a * mu)


@pytest.mark.parametrize("name", NAMES)
def test_training_recovers_gaussian_score(name):
    """Adam on an affine score s(x) = A x + b at a fixed t recovers the closed-form score of a 2-D Gaussian
    (relative error < 0.05; the empirical optimum from 16384 samples is off by O(1/sqrt(16384)))."""
    sde, t0, n = VP(), 0.2, 16384
    mu = torch.tensor([1.0, -0.5], dtype=F64)
    cov = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=F64)
    A_true, b_true = gaussian_truth(sde, t0, mu, cov)
    g = torch.Generator().manual_seed(0)
    x0 = mu + torch.randn(n, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    noise = torch.randn(n, 2, generator=g, dtype=F64)
    t = torch.full((n,), t0, dtype=F64)
    A = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    b = torch.zeros(2, dtype=F64, requires_grad=True)
    model = lambda x, t: x @ A.T + b  # noqa: E731
    kw = dict(t=t, noise=noise, weighting="uniform")
    if name == "explicit":
        kw["true_score"] = lambda x, t: x @ A_true.T + b_true
    if name == "sliced":
        kw["n_projections"] = 2
    steps = 300
    opt = torch.optim.Adam([A, b], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        LOSSES[name](model, sde, x0, generator=g, **kw).mean().backward()
        opt.step()
        sched.step()
    err = torch.linalg.norm(torch.cat([(A - A_true).flatten(), b - b_true]))
    scale = torch.linalg.norm(torch.cat([A_true.flatten(), b_true]))
    assert err / scale < 0.05, (name, (err / scale).item(), A.detach(), A_true)


@pytest.mark.parametrize("name", ["explicit", "implicit", "sliced"])
def test_langevin_simulates_the_ou_marginal(name):
    """Langevin with V = |x|^2 / 2 is OU. For s(x, t) = x (true score 0 for explicit) the per-sample means
    are closed forms of OU's marginal: E|x_t|^2 = alpha^2 E|x0|^2 + d sigma^2, plus 2d for the divergence."""
    tgt, n, d = mixture(), 4000, 2
    lang, ou = Langevin(lambda x: 0.5 * x.pow(2).sum(1), T=2.0), OU(T=2.0)
    g = torch.Generator().manual_seed(0)
    x0 = 3 * tgt.sample(n, g)  # far from the stationary N(0, I), so E|x_t|^2 changes with t
    t = 0.05 + 1.95 * torch.rand(n, generator=g, dtype=F64)
    kw = {"true_score": lambda x, t: torch.zeros_like(x)} if name == "explicit" else {}
    with torch.no_grad():
        loss = LOSSES[name](lambda x, t: x, lang, x0, t=t, weighting="g2", n_steps=200, generator=g, **kw)
    m2 = 9 * (torch.trace(tgt.covariance()) + tgt.mean().pow(2).sum())
    expected = 2 * (ou.alpha(t) ** 2 * m2 + d * ou.sigma(t) ** 2 + (0 if name == "explicit" else 2 * d))
    err = loss - expected
    assert abs(err.mean()) < 4 * err.std() / math.sqrt(n), (err.mean(), err.std() / math.sqrt(n))


def test_langevin_refusals():
    lang = Langevin(lambda x: 0.5 * x.pow(2).sum(1))
    x0 = torch.zeros(4, 2, dtype=F64)
    score = lambda x, t: -x  # noqa: E731
    with pytest.raises(ValueError, match="Gaussian transition kernel"):
        denoising_score_matching(score, lang, x0, weighting="g2")
    with pytest.raises(ValueError, match="sigma2.*lacks"):
        implicit_score_matching(score, lang, x0)
    with pytest.raises(ValueError, match="noise cannot be given"):
        sliced_score_matching(score, lang, x0, weighting="uniform", noise=torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="importance sampling needs sigma"):
        implicit_score_matching(score, lang, x0, weighting="uniform", importance=True)


def test_weightings():
    """sigma2 against sigma(t)^2 = 1 - exp(-int_0^t beta) by quadrature (VP); g2 against the variance ODE of a
    linear SDE, g^2 = d(sigma^2)/dt + 2 b sigma^2 with b = -f(t, x) / x, by autograd (VP, sub-VP, VE,
    contractive VP); callables as given."""
    from scipy.integrate import quad

    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    vp = VP()
    var = [1 - math.exp(-quad(lambda u: 0.1 + 19.9 * u, 0, float(s))[0]) for s in t]
    torch.testing.assert_close(loss_weight(vp, t, "sigma2"), torch.tensor(var, dtype=F64))
    for sde in (vp, SubVP(), VE(), ContractiveVP()):
        tt = t.clone().requires_grad_(True)
        var = sde.sigma(tt) ** 2
        dvar = torch.autograd.grad(var.sum(), tt)[0]
        b = -sde.drift(t, torch.ones(3, 1, dtype=F64))[:, 0]
        torch.testing.assert_close(loss_weight(sde, t, "g2"), dvar + 2 * b * var.detach(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(loss_weight(vp, t, "uniform"), torch.ones(3, dtype=F64))
    torch.testing.assert_close(loss_weight(vp, t, lambda t: t**2), t**2)
    torch.testing.assert_close(loss_weight(vp, t, lambda t: 2.0), torch.full((3,), 2.0, dtype=F64))


def test_min_snr_is_hang_et_al_x0_form():
    """Min-SNR-5 on the eps loss equals Hang et al.'s form min(SNR, 5) |x0_hat - x0|^2 (2303.09556 eq. 7), with
    x0_hat from the score by Tweedie's formula, for VP, sub-VP and VE (SNR on both sides of 5)."""
    from scoresde.core.precond import score_to_x0

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    t = torch.tensor([0.01, 0.05, 0.2, 0.4, 0.7, 1.0], dtype=F64)
    score = lambda x, t: -x / 1.3 + 0.2 * torch.sin(x)  # noqa: E731
    for sde in (VP(), SubVP(), VE()):
        loss = denoising_score_matching(score, sde, x0, t=t, noise=noise, weighting="min_snr")
        a, s = sde.alpha(t), sde.sigma(t)
        xt = a[:, None] * x0 + s[:, None] * noise
        snr = (a / s) ** 2
        assert (snr > 5).any() and (snr < 5).any()
        x0_hat = score_to_x0(score(xt, t), xt, a, s)
        torch.testing.assert_close(loss, torch.clamp(snr, max=5.0) * (x0_hat - x0).pow(2).sum(1))


@pytest.mark.parametrize("importance", [False, True])
def test_edm_weighting_is_edm_objective(importance):
    """E_t[lambda_edm(t) |s + z / sigma|^2] over t ~ U (or EDM's lognormal, the importance draw) equals EDM's objective
    E[lambda(s) |x0_hat - x0|^2] with ln s ~ N(-1.2, 1.2^2) drawn directly (Karras et al. 2206.00364 eq. 2, Table 1),
    restricted to the SDE's noise range: two Monte Carlo means within 4 combined standard errors."""
    from scoresde.core.precond import score_to_x0

    sde, n = VP(), 400000
    g = torch.Generator().manual_seed(3)
    score = lambda x, t: -x / 1.3 + 0.2 * torch.sin(x)  # noqa: E731
    x0 = 0.7 * torch.randn(n, 2, generator=g, dtype=F64)
    ours = denoising_score_matching(score, sde, x0, weighting="edm", importance=importance, generator=g)
    log_s = -1.2 + 1.2 * torch.randn(n, generator=g, dtype=F64)
    inside = (log_s >= -sde.log_snr(sde.t_min)) & (log_s <= -sde.log_snr(sde.T))
    t = sde.inverse_log_snr(-log_s[inside])
    a, s = sde.alpha(t), sde.sigma(t)
    xt = a[:, None] * x0[inside] + s[:, None] * torch.randn(t.shape[0], 2, generator=g, dtype=F64)
    sig = s / a
    edm = (sig**2 + 0.25) / (sig * 0.5) ** 2 * (score_to_x0(score(xt, t), xt, a, s) - x0[inside]).pow(2).sum(1)
    edm = torch.where(inside, torch.zeros(n, dtype=F64).index_put((inside.nonzero()[:, 0],), edm), 0.0)
    se = math.sqrt(ours.var() / n + edm.var() / n)
    assert abs(ours.mean() - edm.mean()) < 4 * se, (ours.mean(), edm.mean(), se)


def test_bad_inputs():
    sde, x0 = VP(), torch.zeros(4, 2, dtype=F64)
    score = lambda x, t: -x  # noqa: E731
    t = torch.full((4,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="weighting must be one of sigma2, g2, uniform, min_snr, edm"):
        denoising_score_matching(score, sde, x0, weighting="snr")
    with pytest.raises(ValueError, match=r"weighting\(t\) must return a scalar or shape \(4,\)"):
        denoising_score_matching(score, sde, x0, weighting=lambda t: torch.ones(4, 2))
    with pytest.raises(ValueError, match="finite values >= 0"):
        denoising_score_matching(score, sde, x0, weighting=lambda t: -t)
    with pytest.raises(ValueError, match="projection must be one of gaussian, rademacher"):
        sliced_score_matching(score, sde, x0, projection="sphere")
    with pytest.raises(ValueError, match="n_projections must be an integer >= 1"):
        sliced_score_matching(score, sde, x0, n_projections=0)
    with pytest.raises(ValueError, match=r"t must have shape \(4,\)"):
        denoising_score_matching(score, sde, x0, t=torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"t must lie in \(0, T = 1.0\]"):
        denoising_score_matching(score, sde, x0, t=torch.full((4,), 1.5))
    with pytest.raises(ValueError, match=r"t must lie in \(0, T"):
        implicit_score_matching(score, sde, x0, t=torch.zeros(4))
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        denoising_score_matching(score, sde, x0, noise=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x0 must be a floating tensor of shape"):
        denoising_score_matching(score, sde, torch.zeros(4))
    with pytest.raises(ValueError, match="x0 must be a floating tensor of shape"):
        denoising_score_matching(score, sde, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"score_fn\(x, t\) must return a tensor of the shape of x"):
        implicit_score_matching(lambda x, t: x[:, :1], sde, x0, t=t)
    with pytest.raises(ValueError, match=r"true_score\(x, t\) must return"):
        explicit_score_matching(score, sde, x0, true_score=lambda x, t: x.sum(1), t=t)
    with pytest.raises(ValueError, match="pass either t or importance=True"):
        denoising_score_matching(score, sde, x0, t=t, importance=True)
    import scoresde.models  # noqa: F401  (registers the families' losses: ddpm, ncsn, vae)

    with pytest.raises(KeyError, match="valid: ddpm, denoising, explicit, implicit, ncsn, sliced, vae"):
        LOSSES["hyvarinen"]
