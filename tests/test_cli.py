import json

import numpy as np
import pytest
from typer.testing import CliRunner

from scoresde.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "tiny.yaml"
    cfg.write_text("data: moons\nn_train: 500\nn_test: 100\nnet_args: {hidden: 16, depth: 1, emb_dim: 8}\n"
                   "steps: 30\nbatch_size: 32\ncheckpoint_every: 10\neval_every: 15\nlog_every: 5\nn_eval: 50\n"
                   "nfe: 21\nprogress: false\n")
    res = runner.invoke(app, ["train", str(cfg), f"out={tmp}", "lr=0.003"])
    assert res.exit_code == 0, res.output
    assert "W2 to held-out data" in res.output
    return tmp / "tiny"


def test_train_writes_the_run_folder(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "checkpoint.safetensors", "metrics.jsonl", "metrics.json", "loss.png", "samples.png",
            "trajectories.png", "snapshots"} <= names
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["step_0000015.png", "step_0000030.png"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 30 and metrics["w2"] > 0 and metrics["w2_floor"] > 0 and metrics["w2_n"] == 100
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in records if "eval_loss" in r] == [15, 30]
    assert "lr: 0.003" in (run_dir / "config.yaml").read_text()


def test_sample_and_evaluate(run_dir, tmp_path):
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "ddim", "--nfe", "11", "--n", "64",
                              "--out", str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "x.npy").shape == (64, 2)
    res = runner.invoke(app, ["sample", str(run_dir), "--sampler", "em", "--steps", "11", "--n", "32",
                              "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 0 and (tmp_path / "x.png").stat().st_size > 1000
    res = runner.invoke(app, ["evaluate", str(run_dir), "--n", "50", "--nfe", "11"])
    assert res.exit_code == 0, res.output
    out = json.loads((run_dir / "eval.json").read_text())
    assert out["w2_n"] == 50 and out["nfe"] == 11 and out["sampler"] == "em"


def test_errors_are_one_line_messages(run_dir, tmp_path):
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "rk45", "--nfe", "10", "--out", str(tmp_path / "a.npy")])
    assert res.exit_code == 1 and "unknown sampling method 'rk45'; valid:" in res.output
    res = runner.invoke(app, ["sample", str(run_dir), "--out", str(tmp_path / "a.txt")])
    assert res.exit_code == 1 and "must end in .npy, .npz or .png" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert res.exit_code == 1 and "is not a run folder" in res.output
    res = runner.invoke(app, ["train", str(run_dir / "config.yaml"), "sde=vpp"])
    assert res.exit_code == 1 and "unknown SDE 'vpp'; valid:" in res.output
    res = runner.invoke(app, ["train", str(run_dir / "config.yaml"), "stepz=3"])
    assert res.exit_code == 1 and "unknown config key 'stepz'; valid:" in res.output


def test_train_resumes_a_finished_run(run_dir):
    before = (run_dir / "checkpoint.safetensors").read_bytes()
    res = runner.invoke(app, ["train", str(run_dir / "config.yaml")])
    assert res.exit_code == 0, res.output
    assert (run_dir / "checkpoint.safetensors").read_bytes() == before  # nothing left to train


@pytest.mark.slow
def test_demo_learns_two_moons(tmp_path):
    """The `make demo` job: W2 to held-out data within 2x its finite-sample floor."""
    res = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["w2"] < 2 * metrics["w2_floor"]
