import json
import math
import shutil
import warnings

import pytest
import torch

from scoresde.core.sde import VP
from scoresde.core.targets import GaussianMixture
from scoresde.running.build import build_model, build_sde, draw_samples
from scoresde.running.checkpoint import read_checkpoint
from scoresde.running.config import Config
from scoresde.running.data import Dataset, load_dataset
from scoresde.running.train import (
    NonFiniteLoss,
    Trainer,
    TrainingInterrupted,
    learning_rate,
)


@pytest.fixture
def make_cfg(tiny_config):
    """This module's runs: the tiny config at 20 steps, lr 1e-2, a checkpoint every 5 steps."""
    return lambda **kw: tiny_config(**{"name": "r", "steps": 20, "lr": 1e-2, "checkpoint_every": 5, "log_every": 2,
                                       "n_train": 200, "n_test": 50, **kw})


def _state(tr):
    return {**{f"m/{k}": v for k, v in tr.model.state_dict().items()}, **{f"e/{k}": v for k, v in tr.ema.shadow.items()}}


@pytest.mark.parametrize("stop, kw", [
    (13, {}), (10, {}), (13, {"accumulate": 3, "batch_size": 8}), (13, {"precision": "fp16"}),
    (13, {"precision": "bf16", "ema_schedule": "edm", "ema_halflife": 4.0, "ema_rampup": 0.5}),
], ids=["13", "10", "accumulate", "fp16", "bf16-edm"])
def test_killed_run_resumes_bit_identically(tmp_path, stop, kw, make_cfg):
    """N steps straight == stop after `stop` steps (a kill: no checkpoint at the kill) + a fresh Trainer resuming;
    the EMA warm-up's position and the fp16 GradScaler come back with the checkpoint."""
    cfg = dict(lr_schedule="cosine", loss_args={"importance": True}, **kw)
    full = Trainer(make_cfg(name="full", **cfg)).run()
    Trainer(make_cfg(name="cut", **cfg)).run(until=stop)
    resumed = Trainer(make_cfg(name="cut", **cfg))
    assert resumed.step == 10  # the last checkpoint before the kill
    resumed.run()
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert resumed.ema.updates == full.ema.updates == 20 and resumed.scaler.state_dict() == full.scaler.state_dict()
    # the metrics log holds each step once, records after the checkpoint having been dropped on resume
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 21, 2))


def test_sliced_loss_resumes_bit_identically(tmp_path, make_cfg):
    """Sliced SM draws projections inside the loss, from the per-step generator: resume stays exact."""
    kw = dict(loss="sliced", loss_args={"n_projections": 2}, steps=8, checkpoint_every=4)
    full = Trainer(make_cfg(name="a", **kw)).run()
    Trainer(make_cfg(name="b", **kw)).run(until=6)
    res = Trainer(make_cfg(name="b", **kw)).run()
    assert all(torch.equal(full.model.state_dict()[k], v) for k, v in res.model.state_dict().items())


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, make_cfg):
    tr = Trainer(make_cfg())
    real = tr.loss_fn

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        return out * math.nan if tr.step == 7 else out

    tr.loss_fn = poisoned
    tr.run(until=6)
    ckpt = (tmp_path / "r" / "checkpoint.safetensors").read_bytes()
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 7.*checkpoint .* \(step 5\) is intact"):
        tr.run()
    assert (tmp_path / "r" / "checkpoint.safetensors").read_bytes() == ckpt
    assert int(read_checkpoint(tmp_path / "r" / "checkpoint.safetensors")[1]["step"]) == 5
    fresh = Trainer(make_cfg(name="fresh"))
    fresh.loss_fn = lambda *a, **k: real(*a, **k) * math.inf
    with pytest.raises(NonFiniteLoss, match="No checkpoint had been written yet"):
        fresh.run()
    assert not (tmp_path / "fresh" / "checkpoint.safetensors").exists()


def test_nan_step_leaves_weights_untouched(tmp_path, make_cfg):
    tr = Trainer(make_cfg()).run(until=3)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    real = tr.loss_fn
    tr.loss_fn = lambda *a, **k: real(*a, **k) * math.nan
    with pytest.raises(NonFiniteLoss):
        tr.run()
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items()) and tr.step == 3


def test_resume_refuses_a_different_config(tmp_path, make_cfg):
    Trainer(make_cfg(steps=5)).run()
    with pytest.raises(ValueError, match="different config.*lr"):
        Trainer(make_cfg(steps=10, lr=0.5))
    tr = Trainer(make_cfg(steps=10))  # more steps is fine
    assert tr.step == 5
    moved = tmp_path / "elsewhere"
    shutil.copytree(tr.run_dir.parent, moved)  # a moved run folder (its config names the old parent) resumes
    assert Trainer(make_cfg(steps=10, out=str(moved))).step == 5


def test_short_run_warns_that_the_ema_is_mostly_initialisation(tmp_path, make_cfg):
    """A constant 0.999: 0.999^20 = 98% of the EMA is still the random init after 20 steps; 0.5^20 is not, and
    the warm-up schedules (the default power, edm) give the init no weight (beta_0 = 0)."""
    with pytest.warns(UserWarning, match=r"ema_decay 0.999 .* still hold 98% of the random initialisation"):
        Trainer(make_cfg(steps=20, ema_decay=0.999))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(make_cfg(steps=20, ema_decay=0.5))
        assert Trainer(make_cfg(steps=20)).cfg.ema_schedule == "power"
        Trainer(make_cfg(steps=20, ema_schedule="edm"))


def test_learning_rate_schedule(tmp_path, make_cfg):
    cfg = make_cfg(warmup=4, steps=104, lr=1.0, lr_schedule="cosine")
    assert [learning_rate(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 54) == pytest.approx(0.5)
    assert learning_rate(cfg, 103) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert learning_rate(make_cfg(warmup=0, lr=0.1), 50) == 0.1


def test_build_errors_list_valid_names(tmp_path, make_cfg):
    with pytest.raises(ValueError, match="unknown SDE 'vpp'; valid: .*vp"):
        build_sde(make_cfg(sde="vpp"))
    with pytest.raises(ValueError, match="unknown sde_args for 've': beta_max; valid: sigma_min, sigma_max"):
        build_sde(make_cfg(sde="ve", sde_args={"beta_max": 3}))
    cfg = make_cfg(net_args={"width": 3})
    with pytest.raises(ValueError, match="unknown net_args for 'mlp': width; valid: hidden, depth, emb_dim"):
        build_model(cfg, VP(), (2,))
    with pytest.raises(ValueError, match="use net=unet"):
        build_model(make_cfg(), VP(), (1, 8, 8))
    with pytest.raises(ValueError, match="unknown network 'cnn'; valid: mlp, unet"):
        build_model(make_cfg(net="cnn"), VP(), (2,))
    with pytest.raises(ValueError, match="model 'score' trains with loss denoising, sliced, implicit, explicit, .*; "
                                         "got loss 'dsm'"):
        Trainer(make_cfg(loss="dsm"))
    with pytest.raises(ValueError, match="unknown loss_args for 'denoising': n_projections; valid:"):
        Trainer(make_cfg(loss_args={"n_projections": 2}))
    with pytest.raises(ValueError, match="needs the exact score"):
        Trainer(make_cfg(loss="explicit"))
    with pytest.raises(ValueError, match="divisible"):
        _ddp_divisible(make_cfg)


def _ddp_divisible(make_cfg):
    import os
    from unittest import mock

    import torch.distributed as dist

    with mock.patch.dict(os.environ, {"WORLD_SIZE": "2"}), mock.patch.object(dist, "is_initialized", lambda: True), \
            mock.patch.object(dist, "get_rank", lambda: 0), mock.patch.object(dist, "get_world_size", lambda: 2):
        Trainer(make_cfg(batch_size=33))


def test_training_learns_a_gaussian_score(tmp_path, gen, make_cfg):
    """DSM through the whole loop on N(mu, diag(s^2)) approaches the analytic score (explicit loss falls 50x)."""
    mix = GaussianMixture(torch.ones(1), torch.tensor([[1.0, -0.5]]), torch.diag(torch.tensor([0.3, 0.8]))[None] ** 2)
    x = mix.sample(2200, gen).float()
    data = Dataset(x[:2000], x[2000:], "gauss", mixture=mix)
    cfg = make_cfg(steps=300, batch_size=128, lr=3e-3, warmup=20, checkpoint_every=300,
               net_args={"hidden": 32, "depth": 2, "emb_dim": 16}, ema_decay=0.0)
    tr = Trainer(cfg, data=data)
    from scoresde.learning.losses import explicit_score_matching

    def err():
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return explicit_score_matching(tr.model, tr.sde, x[:2000], true_score=mix.score_fn(tr.sde), generator=g).mean()

    e0 = err()
    tr.run()
    assert err() < e0 / 50


def test_draw_samples_returns_paths_and_checks_the_method(gen):
    """draw_samples is samplers.sample plus the first reverse trajectories (ending at the returned x)."""
    mu, s = torch.tensor([[0.5, -1.0]], dtype=torch.float64), 0.4
    g = GaussianMixture(torch.ones(1), mu, s**2 * torch.eye(2)[None])
    sde = VP()
    x, path = draw_samples(sde, g.score_fn(sde), (4000, 2), "em", 201, generator=gen, paths=5)
    assert path.shape[1:] == (5, 2) and path.shape[0] >= 200 and torch.equal(path[-1], x[:5])
    assert (x.mean(0) - mu[0]).abs().max() < 4 * s / math.sqrt(4000) + 0.01
    with pytest.raises(ValueError, match="valid: .*em"):
        draw_samples(sde, g.score_fn(sde), (2, 2), "euler_maruyama", 10)
    with pytest.raises(ValueError, match="sampling method 'rk4' does not apply to a 'score' model; valid: em"):
        Trainer(Config(sampler="rk4", out="unused"))


def test_image_data_trains_with_unet(tmp_path, make_cfg):
    data = load_dataset("digits", n_test=20)
    cfg = make_cfg(net="unet", net_args={"base": 8, "mults": [1, 2]}, steps=3, batch_size=4, checkpoint_every=3)
    tr = Trainer(cfg, data=data).run()
    assert tr.step == 3 and tr.model(data.test[:2], torch.full((2,), 0.5)).shape == (2, 1, 8, 8)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    """A real `scoresde train` process killed with SIGKILL resumes from its checkpoint to the same weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from scoresde.running.config import load_config

    p = tmp_path / "k.yaml"
    p.write_text("n_train: 500\nn_test: 50\nnet_args: {hidden: 32, depth: 2, emb_dim: 8}\nsteps: 3000\nbatch_size: 64\n"
                 "checkpoint_every: 50\neval_every: 0\nprogress: false\nnfe: 11\nn_eval: 20\n")
    ckpt = tmp_path / "killed" / "k" / "checkpoint.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "scoresde.cli", "train", str(p), f"out={tmp_path / 'killed'}"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(read_checkpoint(ckpt)[1]["step"])
    assert 0 < killed_at < 3000
    resumed = Trainer(load_config(p, [f"out={tmp_path / 'killed'}"]))
    assert resumed.step == killed_at
    resumed.run()
    full = Trainer(load_config(p, [f"out={tmp_path / 'full'}"])).run()
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())
    assert all(torch.equal(v, resumed.ema.shadow[k]) for k, v in full.ema.shadow.items())


def test_fresh_start_discards_the_old_run(tmp_path, make_cfg):
    Trainer(make_cfg(steps=5)).run()
    tr = Trainer(make_cfg(steps=5, lr=0.5), resume=False)  # a restart may change anything
    assert tr.step == 0 and not (tmp_path / "r" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def _held_out(tr, model):
    """The denoising loss of `model` on the held-out set at fixed times and noise."""
    g = torch.Generator().manual_seed(3)
    x = tr.data.test
    with torch.no_grad():
        return tr.loss_fn(model, tr.sde, x, t=torch.rand(x.shape[0], generator=g) * 0.999 + 1e-3,
                          noise=torch.randn(x.shape, generator=g), generator=g).mean().item()


def test_kill_inside_an_accumulated_step_resumes_bit_identically(tmp_path, make_cfg):
    """Killed in the second of three micro-batches of step 13 (gradients half accumulated): the resumed run
    restarts at the checkpoint of step 10 and ends on the weights of an uninterrupted run."""
    kw = dict(accumulate=3, batch_size=8, label_dropout=0.0)
    full = Trainer(make_cfg(name="full", **kw)).run()
    cut = Trainer(make_cfg(name="cut", **kw))
    real, calls = cut.loss_fn, []

    def killed(*args, **kwargs):
        calls.append(cut.step)
        if len(calls) == 3 * 12 + 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    cut.loss_fn = killed
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    assert cut.step == 12 and calls[-1] == 12
    resumed = Trainer(make_cfg(name="cut", **kw))
    assert resumed.step == 10
    resumed.run()
    a, b = _state(full), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulated_gradient_equals_the_gradient_of_one_big_batch(tmp_path, make_cfg):
    """accumulate=4 of batch 8 draws the batch of 32 that accumulate=1 draws, and averages the 4 slices'
    gradients: the gradient of the mean loss over the 32 samples, up to float rounding."""
    kw = dict(grad_clip=0.0, loss_args={"importance": True})
    acc = Trainer(make_cfg(name="acc", batch_size=8, accumulate=4, **kw)).run(until=1)
    one = Trainer(make_cfg(name="one", batch_size=32, **kw)).run(until=1)
    half = Trainer(make_cfg(name="half", batch_size=16, **kw)).run(until=1)  # another batch: another gradient

    def grad(tr):
        return torch.cat([p.grad.flatten() for p in tr.model.parameters()])

    torch.testing.assert_close(grad(acc), grad(one), rtol=1e-5, atol=1e-7)
    assert (grad(half) - grad(one)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mixture", "images"])
def test_low_precision_training_reaches_the_fp32_loss(tmp_path, make_cfg, kind):
    """Same seed and data, N steps in fp32, bf16 and fp16 (autocast; fp16 with a GradScaler that skips the first
    steps' overflows): the held-out loss (evaluated in fp32) of the low-precision runs is within 3% of fp32's,
    inside fp32's own seed-to-seed spread (about 3% on the ring after 200 steps, 7% on digits after 40)."""
    if kind == "mixture":
        kw = dict(data="ring", n_train=2000, n_test=500, net_args={"hidden": 32, "depth": 2, "emb_dim": 16},
                  steps=200, batch_size=64, lr=3e-3, warmup=10, checkpoint_every=200)
    else:
        kw = dict(data="digits", n_test=100, net="unet", net_args={"base": 8, "mults": [1, 2]}, steps=80, batch_size=16,
                  lr=2e-3, warmup=5, checkpoint_every=80)
    loss = {}
    for precision in ("fp32", "bf16", "fp16"):
        tr = Trainer(make_cfg(name=precision, precision=precision, **kw))
        start = _held_out(tr, tr.model)
        tr.run()
        loss[precision] = _held_out(tr, tr.model)
        assert loss[precision] < 0.5 * start  # it trained
        assert all(p.dtype == torch.float32 for p in tr.model.parameters())
        assert all(v.dtype == torch.float32 for v in tr.ema.shadow.values())
        x = tr.sample(8, torch.Generator().manual_seed(0))  # samplers run in the data's precision
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert tr.scaler.get_scale() < 2.0**16  # fp16: the scaler did back off
    for precision in ("bf16", "fp16"):
        assert abs(loss[precision] - loss["fp32"]) < 0.03 * loss["fp32"], loss


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(tmp_path, make_cfg, monkeypatch, recwarn, native):
    """precision auto: bf16 autocast on a CPU with AVX512-BF16 or AMX, plain fp32 (no autocast, no warning)
    without them; an explicit bf16 on such a CPU trains but warns, naming the option and the remedy."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    tr = Trainer(make_cfg(name="auto", precision="auto"))
    assert tr.precision == ("bf16" if native else "fp32")
    assert (tr.net is tr.model) != native  # fp32: the model itself; bf16: the autocast view
    assert not [w for w in recwarn if "natively" in str(w.message)]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)  # AMX alone suffices too
    assert Trainer(make_cfg(name="amx", precision="auto")).precision == ("bf16" if native else "fp32")
    if native:
        return
    with pytest.warns(UserWarning, match=r"config precision bf16: this cpu \(.*no AVX512-BF16 / AMX\) does not "
                                         r"compute in it natively.* set precision: auto or fp32"):
        explicit = Trainer(make_cfg(name="bf16", precision="bf16"))
    assert explicit.precision == "bf16" and explicit.net is not explicit.model  # the option is kept, not dropped
    explicit.run(until=2)


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, make_cfg):
    tr = Trainer(make_cfg(precision="fp16")).run(until=2)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.scaler.update(2.0**100)  # loss x 2^100 overflows fp16 in the backward pass
    tr.run(until=3)
    assert tr.step == 3 and tr.scaler.get_scale() == 2.0**99
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_nan_guard_names_the_precision(tmp_path, make_cfg):
    tr = Trainer(make_cfg(precision="bf16"))
    real = tr.loss_fn
    tr.loss_fn = lambda *a, **k: real(*a, **k) * math.nan
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 0 \(precision bf16\)"):
        tr.run()


def test_default_ema_warms_up_so_a_500_step_run_samples_from_trained_weights(tmp_path, make_cfg):
    """The power schedule gives the random init no weight: after 500 steps the EMA's held-out loss is the
    trained model's; a constant 0.999 (61% init after 500 steps) is far worse."""
    kw = dict(steps=500, checkpoint_every=500, lr=3e-3, n_test=500)
    tr = Trainer(make_cfg(name="power", **kw))
    start = _held_out(tr, tr.model)
    tr.run()
    trained, ema = _held_out(tr, tr.model), _held_out(tr, tr.ema.copy())
    assert ema < 1.05 * trained and trained < 0.4 * start
    const = Trainer(make_cfg(name="constant", ema_decay=0.999, **kw)).run()
    assert _held_out(const, const.ema.copy()) > 2 * trained


def test_start_up_line_counts_the_parameters_and_says_when_resuming(tmp_path, make_cfg, capsys):
    tr = Trainer(make_cfg(precision="bf16", accumulate=2)).run(until=5)
    n = sum(p.numel() for p in tr.model.parameters())
    out = capsys.readouterr().out
    assert f"run {tmp_path / 'r'}: {n:,} parameters, precision bf16, batch 32 x accumulate 2, EMA power" in out
    assert "resuming" not in out
    Trainer(make_cfg(precision="bf16", accumulate=2))
    assert f"resuming from step 5 ({tmp_path / 'r' / 'checkpoint.safetensors'})" in capsys.readouterr().out


def test_compile_wraps_the_networks_and_trains_like_eager(tmp_path, make_cfg, monkeypatch):
    """compile: true compiles the sub-networks (here with dynamo's eager backend, to keep the test fast): the
    same weights as without compile; where inductor cannot compile, the start-up error names `compile`."""
    from functools import partial

    from torch._dynamo.eval_frame import OptimizedModule

    plain = Trainer(make_cfg(name="plain", steps=4)).run()
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))
    tr = Trainer(make_cfg(name="compiled", steps=4, compile=True))
    assert isinstance(tr.net.net, OptimizedModule) and not isinstance(tr.model.net, OptimizedModule)
    tr.run()
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in plain.model.state_dict().items())
    assert set(tr.model.state_dict()) == set(plain.model.state_dict())

    import torch._inductor.cpp_builder as cpp

    def missing():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp, "get_cpp_compiler", missing)
    with pytest.raises(ValueError, match=r"config compile: torch.compile cannot compile on this platform \(inductor "
                                         r"needs a C\+\+ compiler on the CPU: no C\+\+ compiler found\); set compile: false"):
        Trainer(make_cfg(name="c", compile=True))


def test_a_run_saved_before_ema_schedules_resumes_with_its_constant_decay(tmp_path, make_cfg):
    """An old run's config.yaml has ema_decay and none of the new keys: it resolves to the constant schedule, so
    the same config resumes it and the new default (power) is refused."""
    import yaml

    Trainer(make_cfg(steps=5, ema_decay=0.999)).run()
    path = tmp_path / "r" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    new = ("accumulate", "precision", "compile", "ema_schedule", "ema_gamma", "ema_power", "ema_halflife", "ema_rampup")
    path.write_text(yaml.safe_dump({k: v for k, v in saved.items() if k not in new}))
    assert Trainer(make_cfg(steps=10, ema_decay=0.999)).step == 5
    with pytest.raises(ValueError, match=r"different config \(ema_decay, ema_schedule differ\)"):
        Trainer(make_cfg(steps=10))


@pytest.mark.timeout(300)
def test_torchrun_with_accumulation_matches_one_process(tmp_path):
    """Two gloo processes, accumulate 2 (the first micro-batch under DDP's no_sync): the weights of one process
    on the same global batches, up to float rounding."""
    import os
    import subprocess
    import sys

    from scoresde.running.checkpoint import checkpoint_weights
    from scoresde.running.config import load_config

    p = tmp_path / "ddp.yaml"
    p.write_text("n_train: 400\nn_test: 50\nnet_args: {hidden: 16, depth: 2, emb_dim: 8}\nsteps: 12\nbatch_size: 32\n"
                 "accumulate: 2\nlr: 0.01\nwarmup: 2\ncheckpoint_every: 6\neval_every: 0\nn_eval: 20\nnfe: 11\n"
                 "progress: false\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "scoresde.cli",
           "train", str(p), f"out={tmp_path / 'ddp'}"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ddp = checkpoint_weights(tmp_path / "ddp" / "ddp" / "checkpoint.safetensors", "model")
    one = Trainer(load_config(p, [f"out={tmp_path / 'one'}"])).run()
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)


def test_sigterm_saves_the_current_step_and_resumes_bit_identically(tmp_path, make_cfg, monkeypatch):
    """SIGTERM during step 8 (sent from inside its loss): the step finishes and is saved, a SIGINT during that
    save is ignored, TrainingInterrupted names signal, step and file, the previous handlers are back; the
    resumed run ends on the weights of an uninterrupted run."""
    import os
    import signal

    from scoresde.running import train

    full = Trainer(make_cfg(name="full")).run()
    cut = Trainer(make_cfg(name="cut"))
    real_loss, real_save, saved = cut.loss_fn, train.save_checkpoint, []

    def loss(*args, **kwargs):
        if cut.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    def save(*args, **kwargs):
        if kwargs["step"] == 8:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(*args, **kwargs)
        saved.append(kwargs["step"])

    cut.loss_fn = loss
    monkeypatch.setattr(train, "save_checkpoint", save)
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    ckpt = tmp_path / "cut" / "checkpoint.safetensors"
    with pytest.raises(TrainingInterrupted, match=f"^stopped by SIGTERM at step 8; checkpoint saved to {ckpt}; run the "
                                                  f"same command to resume$") as err:
        cut.run()
    assert (err.value.signum, err.value.step, saved) == (signal.SIGTERM, 8, [5, 8])
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
    assert int(read_checkpoint(ckpt)[1]["step"]) == 8
    monkeypatch.undo()
    resumed = Trainer(make_cfg(name="cut"))
    assert resumed.step == 8
    resumed.run()
    a, b = _state(full), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


# a training process whose steps take 20 ms more (the weights are unchanged), so that a signal lands mid-run
SIGNALLED = """
import json, sys, time
from scoresde.running.config import Config
from scoresde.running.train import Trainer, TrainingInterrupted
tr = Trainer(Config(**json.loads(sys.argv[1])))
step = tr._train_step
tr._train_step = lambda: (time.sleep(0.02), step())[1]
try:
    tr.run()
except TrainingInterrupted as err:
    print(err, flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("name", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_a_signalled_training_process_saves_its_step_and_resumes_bit_identically(tmp_path, make_cfg, name):
    """A real process training with checkpoints only at the end gets the signal once it has logged 3 steps: it
    saves the step it stopped at, says so and exits; resumed to the end it matches an uninterrupted run."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    kw = {"steps": 400, "checkpoint_every": 1000, "log_every": 1}
    cfg = make_cfg(name="signalled", **kw)
    proc = subprocess.Popen([sys.executable, "-c", SIGNALLED, json.dumps(cfg.to_dict())], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log, deadline = cfg.run_dir / "metrics.jsonl", time.monotonic() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(getattr(signal, name))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, out + err
    ckpt = cfg.run_dir / "checkpoint.safetensors"
    found = re.search(rf"stopped by {name} at step (\d+); checkpoint saved to {re.escape(str(ckpt))}; run the same "
                      rf"command to resume", out)
    assert found, out + err
    stopped = int(found.group(1))
    assert 3 <= stopped < 400 and int(read_checkpoint(ckpt)[1]["step"]) == stopped
    resumed = Trainer(cfg)
    assert resumed.step == stopped
    resumed.run()
    full = Trainer(make_cfg(name="full", **kw)).run()
    a, b = _state(full), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_from_the_previous_checkpoint_says_so(tmp_path, make_cfg, capsys):
    """The newest checkpoint damaged: the run resumes from the previous one (step 5) and the start-up says so."""
    Trainer(make_cfg()).run(until=10)
    ckpt = tmp_path / "r" / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    capsys.readouterr()
    with pytest.warns(UserWarning, match="using the previous one"):
        tr = Trainer(make_cfg())
    assert tr.step == 5 and "resuming from step 5 (" in capsys.readouterr().out


def test_a_signal_after_the_last_step_is_delivered_once_training_is_done(tmp_path, make_cfg, monkeypatch):
    """SIGINT during the final save comes too late to stop training: the run completes and saves step 20, then
    the signal reaches the previous handler (Python's: KeyboardInterrupt) instead of being lost."""
    import os
    import signal

    from scoresde.running import train

    real_save = train.save_checkpoint

    def save(*args, **kwargs):
        if kwargs["step"] == 20:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(*args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", save)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's, whatever an earlier test left
    try:
        tr = Trainer(make_cfg())
        with pytest.raises(KeyboardInterrupt):
            tr.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert tr.step == 20 and int(read_checkpoint(tmp_path / "r" / "checkpoint.safetensors")[1]["step"]) == 20


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path, make_cfg):
    """warmup 50 over 40 steps: the last step's learning rate is 40/50 of lr (the linear warm-up, by hand)."""
    with pytest.warns(UserWarning, match=r"warmup \(50\) is longer than steps \(40\): the learning rate only reaches "
                                         r"0.008 of lr = 0.01"):
        Trainer(make_cfg(steps=40, warmup=50))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(make_cfg(steps=50, warmup=50))
