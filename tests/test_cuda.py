"""The GPU path against the CPU path: samplers, grid fitting, likelihood and training on CUDA.

Skipped where CUDA is absent (CI); run on a GPU machine with `pytest tests/test_cuda.py`.
"""
import pytest
import torch

from scoresde.core.sde import VE, VP
from scoresde.core.targets import ring
from scoresde.running.config import Config
from scoresde.running.train import Trainer
from scoresde.sampling import METHODS, fit_grid, sample
from scoresde.sampling.likelihood import log_likelihood

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
F64 = torch.float64
BUDGETS = {"pc": 9, "ald": 9}  # others: 7


def on(device, score):
    """The exact CPU score of the mixture, called from samplers that run on `device` (which must pass t there)."""
    def wrapped(x, t):
        assert x.device.type == t.device.type == device, (x.device, t.device)
        return score(x.cpu(), t.cpu()).to(x.device)

    return wrapped


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].takes == "score"])
@pytest.mark.parametrize("sde", [VP(), VE()], ids=lambda s: type(s).__name__)
def test_every_sampler_runs_on_cuda_and_deterministic_ones_match_the_cpu(method, sde):
    nfe = BUDGETS.get(method, 7) if method != "dopri5" else 400
    x_T = sde.prior_sample((256, 2), torch.Generator().manual_seed(0), F64)
    score = ring().score_fn(sde)
    g = torch.Generator("cuda").manual_seed(1)
    x = sample(sde, on("cuda", score), None, method=method, nfe=nfe, x_T=x_T.cuda(), generator=g)
    assert x.device.type == "cuda" and x.dtype == F64 and torch.isfinite(x).all()
    if not METHODS[method].stochastic({}):
        ref = sample(sde, score, None, method=method, nfe=nfe, x_T=x_T)
        torch.testing.assert_close(x.cpu(), ref, rtol=1e-6 if method == "dopri5" else 1e-9, atol=1e-9)
    x32 = sample(sde, on("cuda", score), None, method=method, nfe=nfe, x_T=x_T.float().cuda(), generator=g)
    assert x32.dtype == torch.float32 and torch.isfinite(x32).all()


def test_fit_grid_on_cuda_matches_the_cpu():
    sde, score = VP(), ring().score_fn(VP())
    probe = sde.prior_sample((128, 2), torch.Generator().manual_seed(0), F64)
    cpu = fit_grid(sde, score, probe, method="unipc2", nfe=5, t_end=0.05, max_iter=40)
    gpu = fit_grid(sde, on("cuda", score), probe.cuda(), method="unipc2", nfe=5, t_end=0.05, max_iter=40)
    torch.testing.assert_close(gpu.ts.cpu(), cpu.ts, rtol=1e-6, atol=1e-9)


def test_likelihood_on_cuda_matches_the_cpu():
    sde, target = VP(), ring()
    x = target.sample(64, torch.Generator().manual_seed(2))
    ref, _ = log_likelihood(sde, target.score_fn(sde), x, rtol=1e-7, atol=1e-7)
    got, _ = log_likelihood(sde, on("cuda", target.score_fn(sde)), x.cuda(), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_training_checkpoint_and_sampling_on_cuda(tmp_path):
    """A short run on CUDA writes a checkpoint, resumes from it on CUDA, and samples there."""
    kw = dict(name="r", out=str(tmp_path), steps=40, batch_size=64, net_args={"hidden": 32, "depth": 2},
              lr=2e-3, warmup=5, checkpoint_every=20, eval_every=0, log_every=10, progress=False, n_train=512,
              n_test=64, device="cuda")
    tr = Trainer(Config(**kw)).run(until=30)
    assert next(tr.model.parameters()).device.type == "cuda"
    resumed = Trainer(Config(**kw))
    assert resumed.step == 20 and next(resumed.model.parameters()).device.type == "cuda"
    resumed.run()
    x = resumed.sample(128, torch.Generator().manual_seed(0))
    assert x.shape == (128, 2) and torch.isfinite(x).all()
