"""Shared fixtures: a seeded generator, a tiny config factory, a tiny trained run and a small schedule search."""
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


@pytest.fixture
def small_search(monkeypatch):
    """auto_schedule, as `sample` (schedule.cached_schedule) and the run functions (runs.run_schedule) call it, as a
    small search, for speed: 64 probe draws where none are asked for, 64 check draws, a 31-step reference, 10
    Nelder-Mead iterations; the in-memory cache cleared. Returns the keyword arguments of each search, as called."""
    from scoresde.running import runs
    from scoresde.sampling import schedule

    real, searches = schedule.auto_schedule, []

    def search(*args, n_probe=None, **kw):
        searches.append({**kw, "n_probe": n_probe})
        return real(*args, n_probe=n_probe or 64, n_check=64, reference_nfe=31, max_iter=10, **kw)

    monkeypatch.setattr(runs, "auto_schedule", search)
    monkeypatch.setattr(schedule, "auto_schedule", search)
    schedule.clear_schedule_cache()
    yield searches
    schedule.clear_schedule_cache()
