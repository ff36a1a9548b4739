"""The run-level functions the CLI calls, tested without Typer on the shared tiny run."""
import pytest
import torch

from scoresde.running.runs import fit_run_grid, likelihood_run, load_run
from scoresde.sampling import dopri5, sample
from scoresde.sampling.likelihood import evaluate_likelihood


def test_fitted_grid_of_a_run_beats_the_default_on_fresh_draws(tiny_run):
    """runs.fit_run_grid fits on its own probe draws; on 500 other prior draws the fitted grid lands far closer
    to the run's exact probability flow (a tight dopri5 solve, independent of the fit and its fallback) than
    the method's default grid to the same end time, at the same NFE."""
    r = load_run(tiny_run)
    fit = fit_run_grid(r, method="unipc2", nfe=5, n_probe=64, denoise=False)
    t_end = float(fit.ts[-1])
    x_T = r.sde.prior_sample((500, 2), torch.Generator().manual_seed(99))
    exact = dopri5(r.sde, r.model, x_T, t_end=t_end, rtol=1e-6, atol=1e-6, denoise=False)
    err = {name: (sample(r.sde, r.model, None, method="unipc2", nfe=5, x_T=x_T, denoise=False, **kw) - exact)
           .norm(dim=1).mean().item() for name, kw in (("default", {"t_end": t_end}), ("fitted", {"ts": fit.ts}))}
    assert err["fitted"] < err["default"] / 5, err
    with pytest.raises(ValueError, match="n_probe"):
        fit_run_grid(r, method="unipc2", nfe=5, n_probe=0)


def test_likelihood_run_checks_the_family_and_the_data(tiny_run):
    """likelihood_run is evaluate_likelihood on the run's held-out points (or another source) with the run's
    model; it refuses data of another shape."""
    r = load_run(tiny_run)
    out = likelihood_run(r, n=8, seed=3)
    want = evaluate_likelihood(r.sde, r.model, r.data.test[:8], generator=torch.Generator().manual_seed(3))
    assert out["nll"] == pytest.approx(want["nll"]) and out["data"] == "moons (held out)" and out["step"] == 30
    with pytest.raises(ValueError, match="shape"):
        likelihood_run(r, data="mixture16", n=8)
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        likelihood_run(r, n=1)
