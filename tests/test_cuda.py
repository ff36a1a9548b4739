"""The GPU path against the CPU path: samplers, grid fitting, likelihood and training on CUDA; the model families
with their own samplers and the image benchmarks' --device cuda path.

Skipped where CUDA is absent (CI); run on a GPU machine with `pytest tests/test_cuda.py` (`benchmarks/gpu_check.sh`).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scoresde.core.sde import VE, VP
from scoresde.core.targets import ring
from scoresde.running.config import Config, load_config
from scoresde.running.train import Trainer
from scoresde.sampling import METHODS, fit_grid, sample
from scoresde.sampling.likelihood import log_likelihood

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]
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
    nfe = BUDGETS.get(method, 7) if not METHODS[method].adaptive else 2000  # adaptive: nfe is a cap
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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_on_cuda_matches_fp32(tmp_path, precision):
    """Autocast on CUDA (fp16 with a GradScaler): the held-out loss after 150 steps within 5% of fp32's, fp32
    weights, fp32 samples; the run resumes from its checkpoint with the scaler's state."""
    kw = dict(out=str(tmp_path), data="ring", steps=150, batch_size=128, net_args={"hidden": 64, "depth": 2}, lr=3e-3,
              warmup=10, checkpoint_every=100, eval_every=0, log_every=50, progress=False, n_train=2000, n_test=500,
              device="cuda")

    def held_out(tr):
        g = torch.Generator().manual_seed(3)
        x = tr.data.test.cuda()
        t = (torch.rand(x.shape[0], generator=g) * 0.999 + 1e-3).cuda()
        with torch.no_grad():
            return tr.loss_fn(tr.model, tr.sde, x, t=t, noise=torch.randn(x.shape, generator=g).cuda()).mean().item()

    ref = Trainer(Config(name="fp32", **kw)).run()
    tr = Trainer(Config(name=precision, precision=precision, **kw)).run(until=120)
    resumed = Trainer(Config(name=precision, precision=precision, **kw))
    assert resumed.step == 100 and resumed.scaler.is_enabled() == (precision == "fp16")
    resumed.run()
    assert abs(held_out(resumed) - held_out(ref)) < 0.05 * held_out(ref)
    assert all(p.dtype == torch.float32 for p in resumed.model.parameters())
    x = resumed.sample(64, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_compiled_bf16_unet_training_on_cuda(tmp_path):
    """compile: true with bf16 on a small U-Net: inductor compiles the network, training runs and lowers the loss,
    the checkpoint holds the plain (uncompiled) layout."""
    from torch._dynamo.eval_frame import OptimizedModule

    from scoresde.running.checkpoint import checkpoint_weights

    cfg = Config(name="c", out=str(tmp_path), data="digits", n_test=50, net="unet", net_args={"base": 16, "mults": [1, 2]},
                 steps=60, batch_size=64, lr=2e-3, warmup=5, checkpoint_every=60, eval_every=0, log_every=10,
                 progress=False, device="cuda", precision="bf16", compile=True)
    tr = Trainer(cfg)
    assert isinstance(tr.net.net, OptimizedModule)
    tr.run()
    import json

    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]
    assert set(checkpoint_weights(tmp_path / "c" / "checkpoint.safetensors", "ema")) == set(tr.model.state_dict())


@pytest.mark.parametrize("config", ["digits8_ddpm", "digits8_vae"])
def test_families_with_their_own_sampler_train_and_sample_on_cuda(config, tmp_path):
    """DDPM (its schedule's tables follow the data to the device) and the VAE draw their samples on CUDA from
    the device generator `draw_samples` hands them."""
    cfg = load_config(REPO / "configs" / f"{config}.yaml", [f"out={tmp_path}", "steps=10", "batch_size=32", "warmup=2",
                                                            "eval_every=0", "checkpoint_every=10", "progress=false",
                                                            "nfe=1" if config.endswith("vae") else "nfe=20",
                                                            "device=cuda"])
    tr = Trainer(cfg).run()
    x = tr.sample(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 1, 8, 8) and x.device.type == "cpu" and torch.isfinite(x).all()


@pytest.mark.parametrize("args", [["imaging", "--data", "mnist"], ["weightings", "--twin"],
                                  ["weightings", "--twin", "--twin-backbone", "scoresde"], ["inpainting"],
                                  ["alignment", "--parts", "mnist"]], ids=" ".join)
def test_image_benchmarks_run_quick_on_cuda(args, tmp_path):
    """`--device cuda` of the image benchmarks: every family, the diffusers twin in both backbones, bits/dim,
    guidance, inpainting (every method, twisted SMC included) and the MNIST fine-tuning of every alignment
    method, at the quick sizes."""
    res = subprocess.run([sys.executable, "-m", "benchmarks", *args, "--quick", "--device", "cuda", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_cpu_trained_image_run_samples_inpaints_and_evaluates_on_cuda(tmp_path):
    """`load_run(device=...)` and the CLI's --device: a deterministic sampler from the same prior draw gives the
    CPU's samples (to TF32 convolution rounding); sample, evaluate, inpaint and likelihood run on CUDA; a run
    whose config names cuda loads there by default."""
    import numpy as np
    from typer.testing import CliRunner

    from scoresde.cli import app
    from scoresde.running.runs import load_run, sample_run

    cfg = load_config(REPO / "configs" / "digits.yaml", [f"out={tmp_path}", "steps=10", "batch_size=32", "warmup=2",
                                                            "eval_every=0", "checkpoint_every=10", "progress=false",
                                                            "ema_decay=0.9"])
    Trainer(cfg).run()
    cpu, gpu = load_run(cfg.run_dir), load_run(cfg.run_dir, device="cuda")
    assert gpu.device.type == "cuda" and cpu.device.type == "cpu"
    x_cpu, _ = sample_run(cpu, 32, method="dpm2m", nfe=10, seed=3)
    x_gpu, _ = sample_run(gpu, 32, method="dpm2m", nfe=10, seed=3)
    assert x_gpu.device.type == "cpu"
    torch.testing.assert_close(x_gpu, x_cpu, rtol=2e-2, atol=2e-2)
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[:8] = 1
    np.save(tmp_path / "mask.npy", mask)
    runner, run = CliRunner(), str(cfg.run_dir)
    for args in (["sample", run, "--n", "16", "--nfe", "10", "--out", str(tmp_path / "x.npy")],
                 ["evaluate", run, "--n", "40", "--nfe", "10"],
                 ["inpaint", run, "--mask", str(tmp_path / "mask.npy"), "--n", "4", "--nfe", "10",
                  "--out", str(tmp_path / "i.png")],
                 ["likelihood", run, "--n", "4", "--rtol", "1e-3", "--atol", "1e-3"]):
        res = runner.invoke(app, [*args, "--device", "cuda"])
        assert res.exit_code == 0, (args[0], res.output)
    assert np.isfinite(np.load(tmp_path / "x.npy")).all()
    cfg_file = cfg.run_dir / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("device: cpu", "device: cuda"))
    assert load_run(cfg.run_dir, device=None).device.type == "cuda"


@pytest.mark.parametrize("method", ["pg", "adjoint", "dpok", "draft", "ddpo"])
def test_finetune_runs_on_cuda(method, tiny_run, tmp_path):
    """`scoresde finetune --device cuda`: every method's rollouts, noise, value baseline and update on the GPU,
    the fine-tuned run saved and sampled before and after."""
    from typer.testing import CliRunner

    from scoresde.cli import app
    from scoresde.running.runs import load_run

    beta = [] if method == "ddpo" else ["--beta", "1"]
    res = CliRunner().invoke(app, ["finetune", str(tiny_run), "--reward", "linear", "--param", "c=1,0", *beta,
                                   "--method", method, "--steps", "3", "--batch-size", "16", "--n-time-steps", "5",
                                   "--n", "64", "--device", "cuda", "--out", str(tmp_path / "ft")])
    assert res.exit_code == 0, res.output
    assert torch.isfinite(load_run(tmp_path / "ft").model(torch.zeros(4, 2), torch.full((4,), 0.5))).all()
