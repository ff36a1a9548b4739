"""Shared fixtures: a seeded generator, a tiny config factory and a tiny trained run."""
import pytest
import torch

from scoresde.running.config import Config

torch.set_num_threads(1)

# a tiny MLP score model on two moons: trains in about a second on one CPU thread
TINY = dict(data="moons", n_train=500, n_test=100, net_args={"hidden": 16, "depth": 1, "emb_dim": 8}, steps=30,
            batch_size=32, lr=3e-3, warmup=3, checkpoint_every=10, eval_every=0, log_every=5, n_eval=50, nfe=21,
            progress=False)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def tiny_config(tmp_path):
    """make(**overrides) -> the tiny Config (run folder tmp_path / name, name "tiny" by default)."""
    def make(**overrides) -> Config:
        return Config(**{"name": "tiny", "out": str(tmp_path), **TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The folder of the tiny run, trained once per session (30 steps) with its report; read it, don't train it on."""
    from scoresde.running.runs import load_run, write_report
    from scoresde.running.train import Trainer

    cfg = Config(name="tiny", out=str(tmp_path_factory.mktemp("tiny_run")), **TINY)
    Trainer(cfg).run()
    write_report(load_run(cfg.run_dir))
    return cfg.run_dir
