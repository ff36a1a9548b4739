import json
import math
import warnings

import pytest
import torch

from scoresde.core.sde import VP
from scoresde.core.targets import GaussianMixture
from scoresde.running.build import build_model, build_sde, draw_samples
from scoresde.running.checkpoint import read_checkpoint
from scoresde.running.config import Config
from scoresde.running.data import Dataset, load_dataset
from scoresde.running.train import NonFiniteLoss, Trainer, learning_rate


@pytest.fixture
def make_cfg(tiny_config):
    """This module's runs: the tiny config at 20 steps, lr 1e-2, a checkpoint every 5 steps."""
    return lambda **kw: tiny_config(**{"name": "r", "steps": 20, "lr": 1e-2, "checkpoint_every": 5, "log_every": 2,
                                       "n_train": 200, "n_test": 50, **kw})


def _state(tr):
    return {**{f"m/{k}": v for k, v in tr.model.state_dict().items()}, **{f"e/{k}": v for k, v in tr.ema.shadow.items()}}


@pytest.mark.parametrize("stop", [13, 10])
def test_killed_run_resumes_bit_identically(tmp_path, stop, make_cfg):
    """N steps straight == stop after `stop` steps (a kill: no checkpoint at the kill) + a fresh Trainer resuming."""
    cfg = dict(lr_schedule="cosine", loss_args={"importance": True})
    full = Trainer(make_cfg(name="full", **cfg)).run()
    Trainer(make_cfg(name="cut", **cfg)).run(until=stop)
    resumed = Trainer(make_cfg(name="cut", **cfg))
    assert resumed.step == 10  # the last checkpoint before the kill
    resumed.run()
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
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
