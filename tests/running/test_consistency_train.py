"""Consistency distillation/training through the library's Trainer: target = EMA, exact resume, teachers."""
import pytest
import torch

from scoresde.running.config import Config
from scoresde.running.consistency_train import ConsistencyTrainer
from scoresde.running.train import Trainer
from scoresde.sampling.consistency import ConsistencyModel, consistency_sample


@pytest.fixture
def make_cfg(tiny_config):
    """This module's runs: the tiny config trained by consistency distillation from the exact ring score."""
    return lambda **kw: tiny_config(**{"name": "c", "data": "ring", "sde": "vp", "steps": 12, "lr": 1e-2, "warmup": 2,
                                       "parametrization": "x0", "sigma_data": 1.0, "loss": "consistency",
                                       "loss_args": {"mode": "cd", "teacher": "exact", "n_steps": 6},
                                       "ema_decay": 0.9, "checkpoint_every": 5, "log_every": 2, "n_train": 200,
                                       "n_test": 50, "nfe": 2, "sampler": "consistency", **kw})


def _weights(tr):
    return {**{f"m/{k}": v for k, v in tr.model.state_dict().items()}, **{f"e/{k}": v for k, v in tr.ema.shadow.items()}}


@pytest.mark.parametrize("loss_args", [
    {"mode": "cd", "teacher": "exact", "n_steps": 6, "solver": "heun"},
    {"mode": "ct", "curriculum": "improved", "n_steps": 2, "max_steps": 16, "index": "lognormal",
     "weighting": "inverse_gap", "distance": "pseudo_huber"},
], ids=["cd", "ict"])
def test_killed_run_resumes_bit_identically(tmp_path, loss_args, make_cfg):
    """The target network is the trainer's EMA, so a resumed run ends on the same weights (and curriculum)."""
    full = ConsistencyTrainer(make_cfg(name="full", loss_args=loss_args)).run()
    ConsistencyTrainer(make_cfg(name="cut", loss_args=loss_args)).run(until=8)
    resumed = ConsistencyTrainer(make_cfg(name="cut", loss_args=loss_args))
    assert resumed.step == 5
    resumed.run()
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_target_is_the_ema_and_training_reduces_the_loss(tmp_path, make_cfg):
    tr = ConsistencyTrainer(make_cfg(steps=60, net_args={"hidden": 32, "depth": 2, "emb_dim": 16}))
    g = torch.Generator().manual_seed(0)
    x0 = tr.data.test

    def held_out():
        return tr._loss(tr.model, tr.sde, x0, noise=torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)),
                        generator=torch.Generator().manual_seed(2)).mean().item()

    before = held_out()
    tr.run()
    held_out()
    assert all(torch.equal(v, tr.ema.shadow[k]) for k, v in tr._target.state_dict().items())
    assert held_out() < 0.5 * before
    x = tr.sample(64, g)
    gw = torch.Generator().manual_seed(0)
    want = consistency_sample(ConsistencyModel(tr.ema.copy(), tr.sde, 1.0), tr.sde,
                              tr.sde.prior_sample((64, 2), generator=gw), steps=2, generator=gw)
    assert x.shape == (64, 2) and torch.equal(x, want)


def test_teacher_from_a_run_folder(tmp_path, make_cfg):
    base = dict(out=str(tmp_path), data="moons", steps=3, batch_size=16, net_args={"hidden": 16, "depth": 1, "emb_dim": 8},
                eval_every=0, progress=False, n_train=100, n_test=20)
    Trainer(Config(name="teacher", sde="vp", **base)).run()
    Trainer(Config(name="teacher_ve", sde="ve", **base)).run()
    args = {"mode": "cd", "teacher": str(tmp_path / "teacher"), "n_steps": 4}
    tr = ConsistencyTrainer(make_cfg(data="moons", steps=3, loss_args=args)).run()
    assert not any(p.requires_grad for p in tr.teacher.parameters())
    with pytest.raises(ValueError, match="must match"):
        ConsistencyTrainer(make_cfg(name="c2", data="moons", loss_args={**args, "teacher": str(tmp_path / "teacher_ve")}))


def test_config_errors(tmp_path, make_cfg):
    with pytest.raises(ValueError, match="sampler consistency"):
        ConsistencyTrainer(make_cfg(sampler="heun"))
    with pytest.raises(ValueError, match="parametrization x0"):
        ConsistencyTrainer(make_cfg(parametrization="eps"))
    with pytest.raises(ValueError, match="teacher"):
        ConsistencyTrainer(make_cfg(loss_args={"mode": "cd"}))
    with pytest.raises(ValueError, match="analytic"):
        ConsistencyTrainer(make_cfg(data="moons"))
    with pytest.raises(ValueError, match="valid: .*n_steps"):
        ConsistencyTrainer(make_cfg(loss_args={"mode": "ct", "n_step": 4}))


def test_sigterm_stops_a_consistency_run_that_resumes_bit_identically(tmp_path, make_cfg):
    """ConsistencyTrainer inherits the stop on SIGTERM: step 8 saved, the resumed run (target = EMA) exact."""
    import os
    import signal

    from scoresde.running.train import TrainingInterrupted

    full = ConsistencyTrainer(make_cfg(name="full")).run()
    cut = ConsistencyTrainer(make_cfg(name="cut"))
    real = cut.loss_fn

    def loss(*args, **kwargs):
        if cut.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    cut.loss_fn = loss
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM at step 8"):
        cut.run()
    resumed = ConsistencyTrainer(make_cfg(name="cut"))
    assert resumed.step == 8
    resumed.run()
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_whose_data_is_gone_loads_with_its_recorded_shape(tmp_path, make_cfg):
    """A teacher run trained on a .npy file that was removed since still teaches (its shape is recorded);
    only its data is unavailable."""
    import numpy as np

    from scoresde.running.runs import DataUnavailable, load_run

    np.save(tmp_path / "points.npy", torch.randn(120, 2, generator=torch.Generator().manual_seed(5)).numpy())
    Trainer(Config(name="teacher", out=str(tmp_path), data=str(tmp_path / "points.npy"), steps=2, batch_size=16,
                   eval_every=0, progress=False, net_args={"hidden": 16, "depth": 1, "emb_dim": 8})).run()
    (tmp_path / "points.npy").unlink()
    with pytest.raises(DataUnavailable, match=r"trained on data 'points.npy', which cannot be reloaded \(unknown data"):
        _ = load_run(tmp_path / "teacher").data
    tr = ConsistencyTrainer(make_cfg(steps=2, loss_args={"mode": "cd", "teacher": str(tmp_path / "teacher"),
                                                         "n_steps": 4})).run()
    assert tr.step == 2
