"""SDE-DPM-Solver++ (dpm2m_sde, dpm3m_sde), EDM's stochastic sampler (edm_sde) and the Brownian noise option,
against quadrature, exact Gaussian laws, heun, diffusers and the Brownian path's additivity."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from scoresde.core.gaussian import backward_sde_law
from scoresde.core.sde import VE, VEEDM, VP, ContractiveVP, SubVP
from scoresde.core.targets import GaussianMixture, ring
from scoresde.sampling import METHODS, euler_maruyama, exponential_integrator, sample, time_grid
from scoresde.sampling.edm import edm_sde
from scoresde.sampling.noise import brownian_increments, step_noise
from scoresde.sampling.sde_multistep import sde_adams_weights, sde_dpm_solver_multistep

F64 = torch.float64
MEAN = torch.tensor([0.6, -0.3], dtype=F64)
COV = torch.tensor([[0.30, 0.12], [0.12, 0.10]], dtype=F64)
DATA = GaussianMixture(torch.ones(1), MEAN[None], COV[None])


def exact_law(sde, t):
    """p_t = N(alpha m, alpha^2 C + sigma^2 I) of Gaussian data N(m, C)."""
    t = torch.tensor(t, dtype=F64)
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    return a * MEAN, a**2 * COV + s**2 * torch.eye(2, dtype=F64)


def output_law(run, sde, n_steps, start=None):
    """Exact mean and covariance of run(x_T, noise) for x_T ~ start (default p_T) and i.i.d. standard normal z_i.

    With the exact score of Gaussian data every sampler here is affine in (x_T, z_0, ..., z_{n-1}), row by row;
    its linear parts are read off by probing: one row at the mean of p_T, one per direction of x_T, one per
    (step, direction) of the noise. No formula of the solver is used."""
    d = 2
    m_T, C_T = start or exact_law(sde, sde.T)
    rows = 1 + d + n_steps * d
    x_T = m_T.expand(rows, d).clone()
    x_T[1:1 + d] += torch.eye(d, dtype=F64)
    unit = torch.zeros(n_steps, rows, d, dtype=F64)
    for i in range(n_steps):
        unit[i, 1 + d + i * d:1 + d + (i + 1) * d] = torch.eye(d, dtype=F64)
    y = run(x_T, lambda i: unit[i])
    base, jac = y[0], (y[1:] - y[0]).T  # jac[:, :d] acts on x_T, then d columns per step's z
    J_x, J_z = jac[:, :d], jac[:, d:]
    return base, J_x @ C_T @ J_x.T + J_z @ J_z.T


def off_start(sde):
    """A start law off p_T (mean shifted, covariance scaled) and the exact law at t_end of the reverse SDE
    (T 2.7) from it (`core.gaussian.backward_sde_law`, moment ODEs at rtol 1e-10)."""
    m_T, C_T = exact_law(sde, sde.T)
    start = (m_T + torch.tensor([0.5, -0.8], dtype=F64) * C_T.diagonal().sqrt(), 1.3 * C_T)

    def law(t_end):
        mean, cov = backward_sde_law(sde, MEAN.numpy(), COV.numpy(), start=tuple(v.numpy() for v in start),
                                     t_end=t_end)
        return torch.from_numpy(mean), torch.from_numpy(cov)

    return start, law


def law_errors(method_fn, sde, steps, t_end, kind="logsnr", off=False, **kw):
    """(mean error, covariance error) at t_end after each number of `steps` without the final denoise: from p_T
    against p_{t_end}, or with `off` from `off_start` against the reverse SDE's exact law."""
    start, law = off_start(sde) if off else (None, lambda t: exact_law(sde, t))
    m_end, C_end = law(t_end)
    score = DATA.score_fn(sde)
    out = []
    for n in steps:
        ts = time_grid(sde, n, kind, t_end=t_end, dtype=F64)
        mean, cov = output_law(lambda x, z: method_fn(sde, score, x, ts, noise=z, denoise=False, **kw), sde, n,
                               start)
        out.append(((mean - m_end).norm().item(), (cov - C_end).norm().item()))
    return np.array(out)


def rates(errors):
    return np.log2(errors[:-1] / errors[1:])


# ---- SDE-DPM-Solver++ weights ------------------------------------------------------------------

@pytest.mark.parametrize("lam_from, lam_to, nodes", [
    (-1.0, -0.3, [-1.0]), (0.2, 1.5, [0.2, -0.4]), (2.0, 2.05, [2.0, 1.9, 1.7]), (-3.0, 1.0, [-3.0, -5.0, -6.0]),
    (0.5, 0.6, [0.5, 0.45, 0.3]),
], ids=["1-step", "2-step", "3-step-small-h", "3-step-large-h", "3-step-uneven"])
def test_sde_adams_weights_against_quadrature(lam_from, lam_to, nodes):
    """w_j = 2 alpha' int e^{2(u - lam_to)} L_j(u) du over the step (scipy quad), L_j the Lagrange basis through
    the nodes: the exact integral of the interpolated data prediction against the reverse SDE's kernel."""
    a_next = 0.8
    w = sde_adams_weights(a_next, lam_from, lam_to, nodes)

    def basis(j, u):
        return math.prod((u - nodes[m]) / (nodes[j] - nodes[m]) for m in range(len(nodes)) if m != j)

    ref = [2 * a_next * integrate.quad(lambda u: math.exp(2 * (u - lam_to)) * basis(j, u), lam_from, lam_to,
                                       epsabs=0, epsrel=1e-13)[0] for j in range(len(nodes))]
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-15)


def test_two_step_weights_are_diffusers_heun_form():
    """diffusers' sde-dpmsolver++ solver_type "heun": alpha' (1 - e^{-2h}) D0 + alpha' ((1 - e^{-2h}) / (-2h) + 1) D1,
    D0 = x0, D1 = (x0 - x0_prev) / r, r = (lam - lam_prev) / h."""
    a, lam, lam_prev, lam_next = 0.7, 0.3, -0.2, 0.9
    h, r = lam_next - lam, (lam - lam_prev) / (lam_next - lam)
    c0, c1 = a * -math.expm1(-2 * h), a * (-math.expm1(-2 * h) / (-2 * h) + 1)
    w = sde_adams_weights(a, lam, lam_next, [lam, lam_prev])
    np.testing.assert_allclose(w, [c0 + c1 / r, -c1 / r], rtol=1e-12)


# ---- diffusers' DPMSolverMultistepScheduler, step for step --------------------------------------

@pytest.mark.parametrize("order, steps, lower_order_final", [(2, 10, False), (2, 20, True), (1, 8, False)])
def test_dpm_sde_matches_diffusers_step_for_step(order, steps, lower_order_final):
    """On the discrete VP schedule (the VP times whose log-SNR are the scheduler's), with the same z per step,
    sde_dpm_solver_multistep follows diffusers' "sde-dpmsolver++" (solver_type "heun": the exact integral of the
    linear interpolant; the default "midpoint" weighs D1 by alpha' (1 - e^{-2h}) / 2 instead) to float32 rounding.
    diffusers' last step goes to sigma = 0, i.e. Tweedie's denoise, our final denoise; before it diffusers keeps
    the full order (its lower_order_final acts below 15 steps, and only from order 3), as ours does with
    lower_order_final=False."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                  algorithm_type="sde-dpmsolver++", solver_order=order,
                                                  solver_type="heun", lower_order_final=lower_order_final)
    sched.set_timesteps(steps)
    sde, target = VP(), ring()
    noise_to_signal = sched.sigmas[:-1].double()  # diffusers' sigma is sigma / alpha
    ts = sde.inverse_log_snr(-torch.log(noise_to_signal))
    x_T = sde.prior_sample((64, 2), torch.Generator().manual_seed(0), F64)
    z = torch.randn(steps, 64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    ours = []
    sde_dpm_solver_multistep(sde, target.score_fn(sde), x_T, ts, order=order, noise=lambda i: z[i],
                             lower_order_final=False,
                             callback=lambda i, t, x: ours.append(x))
    x, theirs = x_T.float(), []
    for i, step_t in enumerate(sched.timesteps):
        t = ts[i].expand(64)
        eps = -sde.sigma(t)[:, None] * target.score_fn(sde)(x.double(), t)  # epsilon prediction
        x = sched.step(eps.float(), step_t, x, variance_noise=z[i].float()).prev_sample
        theirs.append(x.double())
    assert len(ours) == steps + 1
    for i in range(steps):
        torch.testing.assert_close(theirs[i], ours[i + 1], rtol=2e-4, atol=2e-4, msg=f"step {i}")


# ---- weak order on Gaussian data: exact output laws ---------------------------------------------

@pytest.mark.parametrize("order", [1, 2, 3])
def test_output_law_probe_matches_monte_carlo(order):
    """The probed law (output_law) against simulated draws of the same sampler with Gaussian noise: the mean
    and covariance agree within 4 standard errors, so the probe's exact moments are the sampler's law."""
    sde, n_steps, n = VP(), 6, 40000
    ts = time_grid(sde, n_steps, "logsnr", t_end=0.05, dtype=F64)
    score = DATA.score_fn(sde)
    mean, cov = output_law(lambda x, z: sde_dpm_solver_multistep(sde, score, x, ts, order=order, noise=z,
                                                                 denoise=False), sde, n_steps)
    m_T, C_T = exact_law(sde, sde.T)
    gen = torch.Generator().manual_seed(order)
    x_T = m_T + torch.randn(n, 2, generator=gen, dtype=F64) @ torch.linalg.cholesky(C_T).T
    x = sde_dpm_solver_multistep(sde, score, x_T, ts, order=order, generator=gen, denoise=False)
    mc_mean, mc_cov = x.mean(0), torch.cov(x.T)
    se_mean = (mc_cov.diagonal() / n).sqrt()
    se_cov = ((mc_cov.diagonal()[:, None] * mc_cov.diagonal()[None] + mc_cov**2) / n).sqrt()
    assert ((mc_mean - mean).abs() < 4 * se_mean).all(), (mc_mean, mean)
    assert ((mc_cov - cov).abs() < 4 * se_cov).all(), (mc_cov, cov)


LADDER = [16, 32, 64, 128]
SDE_ENDS = [(VP(), 0.05), (VE(), 0.02), (ContractiveVP(), 0.05)]


def fitted_order(errors):
    """Minus the least-squares slope of log2 error against log2 steps over LADDER."""
    return -np.polyfit(np.log2(LADDER), np.log2(errors), 1)[0]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sde, t_end", SDE_ENDS, ids=["VP", "VE", "ContractiveVP"])
def test_sde_dpm_solver_is_exact_in_the_mean(order, sde, t_end):
    """From a start off p_T, the output mean equals the exact reverse SDE's (moment ODEs) at any step count:
    x0_hat(x_t) = E[x0 | x_t] is a martingale along the exact reverse SDE (tower property), so every node's
    expected data prediction is the same vector and the weights integrate a constant exactly."""
    errors = law_errors(sde_dpm_solver_multistep, sde, [3, 17], t_end, off=True, order=order)
    assert (errors[:, 0] < 1e-9).all(), errors


@pytest.mark.parametrize("order, expected", [(1, 1.0), (2, 2.0), (3, 2.0)])
@pytest.mark.parametrize("sde, t_end", SDE_ENDS, ids=["VP", "VE", "ContractiveVP"])
def test_weak_order_of_sde_dpm_solver(order, expected, sde, t_end):
    """The covariance error against the exact law (from off p_T: the reverse SDE's moment ODEs) falls with
    weak order 1 for order 1 and 2 for orders 2 and 3 (observed slopes 0.86-0.96 and 1.86-2.36 over 16-128
    steps on VP, VE, contractive VP): the cubic interpolant's third order does not survive the noise."""
    errors = law_errors(sde_dpm_solver_multistep, sde, LADDER, t_end, off=True, order=order)
    observed = fitted_order(errors[:, 1])
    assert expected - 0.4 < observed < expected + 0.5, (errors[:, 1], observed)


@pytest.mark.parametrize("sde, t_end", SDE_ENDS[:2], ids=["VP", "VE"])
def test_weak_order_of_edm_sde(sde, t_end):
    """From p_T, with a churn that stays active (S_churn = 2: gamma = 2 / N), the mean and covariance errors
    fall with weak order 2 (Heun's), and differ from heun's: the churn is exact in law, Heun's step is not.
    VE keeps the mean exactly (no drift; the exact score has mean 0 under p_t, so no step moves the mean)."""
    errors = law_errors(edm_sde, sde, LADDER, t_end, kind="edm", S_churn=2.0)
    plain = law_errors(edm_sde, sde, LADDER, t_end, kind="edm", S_churn=0.0)
    assert 1.6 < fitted_order(errors[:, 1]) < 2.6, errors
    assert not np.allclose(errors[:, 1], plain[:, 1], rtol=1e-3)
    if errors[0, 0] > 1e-12:
        assert 1.6 < fitted_order(errors[:, 0]) < 2.6, errors


# ---- edm_sde ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde", [VP(), VE(), VEEDM(), ContractiveVP()], ids=lambda s: type(s).__name__)
def test_edm_sde_without_churn_is_heun_bit_for_bit(sde):
    """S_churn = 0, or a band S_tmin..S_tmax that no grid point is in, leaves heun's steps untouched."""
    score = ring().score_fn(sde)
    x_T = sde.prior_sample((32, 2), torch.Generator().manual_seed(0), F64)
    for nfe in (9, 12):
        ref = sample(sde, score, None, method="heun", nfe=nfe, x_T=x_T)
        assert torch.equal(sample(sde, score, None, method="edm_sde", nfe=nfe, x_T=x_T, S_churn=0.0), ref)
        out_of_band = sample(sde, score, None, method="edm_sde", nfe=nfe, x_T=x_T, S_tmin=1e6, S_tmax=1e7,
                             generator=torch.Generator().manual_seed(1))
        assert torch.equal(out_of_band, ref)
    assert not METHODS["edm_sde"].stochastic({"S_churn": 0.0}) and METHODS["edm_sde"].stochastic({})


def test_edm_sde_churn_is_the_forward_transition():
    """With a zero score on VE-EDM (alpha = 1, sigma = t, no drift) a step is the churn alone followed by a
    stationary flow, so one churned step from x = 0 gives x = sqrt(t_hat^2 - t^2) S_noise z with
    t_hat = (1 + gamma) t, gamma = min(S_churn / N, sqrt(2) - 1) (EDM Alg. 2 lines 4-6)."""
    sde = VEEDM()
    ts = torch.tensor([20.0, 10.0, 5.0], dtype=F64)
    z = torch.randn(2, 8, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = edm_sde(sde, lambda x, t: torch.zeros_like(x), torch.zeros(8, 1, dtype=F64), ts, S_churn=0.5, S_noise=1.1,
                S_tmin=15.0, noise=lambda i: z[i], denoise=False)  # the second step starts below S_tmin: no churn
    gamma = 0.25
    torch.testing.assert_close(x, 1.1 * math.sqrt((1 + gamma) ** 2 - 1) * 20.0 * z[0], rtol=1e-12, atol=0)


# ---- noise="brownian" ---------------------------------------------------------------------------

def test_brownian_increments_add_up_over_a_refinement():
    """Same seed: the increment over each coarse step is the sum of those over the fine steps inside it, on
    uneven grids, whatever order the queries come in; the normalised increments are N(0, 1)."""
    x = torch.zeros(20000, 2, dtype=F64)
    fine = torch.linspace(1.0, 0.03, 25, dtype=F64) ** 1.7
    coarse = fine[::6]
    increments = {}
    for name, grid in (("fine", fine), ("coarse", coarse)):
        w = brownian_increments(x, 1.0, torch.Generator().manual_seed(4))
        increments[name] = [w(float(a), float(b)) for a, b in zip(grid[:-1], grid[1:])]
    for j in range(len(coarse) - 1):
        torch.testing.assert_close(increments["coarse"][j], sum(increments["fine"][6 * j:6 * j + 6]),
                                   rtol=0, atol=1e-12)
    z = step_noise("brownian", x, fine, 1.0, torch.Generator().manual_seed(4))
    draws = torch.stack([z(i) for i in range(len(fine) - 1)])
    n = draws.numel()
    assert abs(draws.mean()) < 4 / math.sqrt(n) and abs(draws.var() - 1) < 4 * math.sqrt(2 / n)


@pytest.mark.parametrize("method", ["em", "ei", "dpm2m_sde", "dpm3m_sde", "edm_sde"])
def test_brownian_noise_changes_smoothly_with_nfe(method):
    """One seed, one Brownian path: the samples at NFE 101 and 201 stay close (the same path, finer steps),
    while i.i.d. draws give unrelated samples; the default is the i.i.d. noise, as before."""
    sde, target = VP(), ring()
    x_T = sde.prior_sample((500, 2), torch.Generator().manual_seed(0), F64)

    def run(nfe, **kw):
        return sample(sde, target.score_fn(sde), None, method=method, nfe=nfe, x_T=x_T,
                      generator=torch.Generator().manual_seed(3), **kw)

    moved = {noise: (run(101, noise=noise) - run(201, noise=noise)).norm(dim=1).mean().item()
             for noise in ("gaussian", "brownian")}
    assert moved["brownian"] < moved["gaussian"] / 3, moved
    assert torch.equal(run(101), run(101, noise="gaussian"))


def test_default_noise_is_unchanged():
    """The default noise is the generator's i.i.d. draws in step order, as before the noise option."""
    sde, score = VP(), ring().score_fn(VP())
    x_T = sde.prior_sample((16, 2), torch.Generator().manual_seed(0), F64)
    ts = time_grid(sde, 5, "uniform", dtype=F64)
    for fn in (euler_maruyama, exponential_integrator):
        draws = torch.Generator().manual_seed(2)
        explicit = fn(sde, score, x_T, ts, noise=lambda i: torch.randn(16, 2, generator=draws, dtype=F64))
        assert torch.equal(fn(sde, score, x_T, ts, generator=torch.Generator().manual_seed(2)), explicit)


# ---- every linear SDE, and bad input ------------------------------------------------------------

@pytest.mark.parametrize("method", ["dpm2m_sde", "dpm3m_sde", "edm_sde"])
@pytest.mark.parametrize("sde", [VP(), VE(), ContractiveVP(), SubVP()], ids=lambda s: type(s).__name__)
def test_converges_to_the_target(method, sde, gen):
    """Ring target from the prior: the log-density gap at NFE 151 is within its Monte Carlo error (+ 0.03) and
    smaller than at NFE 11. edm_sde on the contractive VP runs at S_churn = 10: at the default 40 (gamma at its
    cap sqrt(2) - 1 up to 97 steps) the churned level s_hat = 1.41 s maps back near T where s(t) saturates at 1,
    and the gap at NFE 151 is still -6.8 (the limitation the samplers page states)."""
    target, gaps = ring(), []
    options = {"S_churn": 10.0} if method == "edm_sde" and isinstance(sde, ContractiveVP) else {}
    for nfe in (11, 151):
        x = sample(sde, target.score_fn(sde), (3000, 2), method=method, nfe=nfe, generator=gen, dtype=F64, **options)
        lp, lp_ref = target.log_prob(x), target.log_prob(target.sample(20000, gen))
        gaps.append(((lp.mean() - lp_ref.mean()).item(), 4 * math.sqrt(lp.var() / len(lp) + lp_ref.var() / len(lp_ref))))
    (small, _), (large, tol) = gaps
    assert abs(large) < tol + 0.03 and abs(large) < abs(small), gaps


def test_bad_input_is_refused():
    sde, score = VP(), ring().score_fn(VP())
    x_T, ts = torch.zeros(4, 2), time_grid(VP(), 4)
    for kwargs, match in [({"noise": "pink"}, "noise must be one of 'gaussian', 'brownian'"),
                          ({"order": 4}, "order must be 1, 2 or 3")]:
        with pytest.raises(ValueError, match=match):
            sde_dpm_solver_multistep(sde, score, x_T, ts, **kwargs)
    for kwargs, match in [({"S_churn": -1.0}, "S_churn"), ({"S_noise": 0.0}, "S_noise"),
                          ({"S_tmin": 2.0, "S_tmax": 1.0}, "S_tmax"), ({"noise": "pink"}, "noise")]:
        with pytest.raises(ValueError, match=match):
            edm_sde(sde, score, x_T, ts, **kwargs)
    with pytest.raises(ValueError, match=r"ts must lie in \[0, T = 1.0\] for noise='brownian'"):
        euler_maruyama(sde, score, x_T, torch.tensor([1.5, 0.5]), noise="brownian")
