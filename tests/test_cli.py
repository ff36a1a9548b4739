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


def test_sample_with_a_fitted_grid(run_dir, tmp_path):
    """--fit-grid reports the probe error before and after and samples on the fitted grid."""
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "unipc2", "--nfe", "5", "--n", "32",
                              "--fit-grid", "64", "--out", str(tmp_path / "f.npy")])
    assert res.exit_code == 0, res.output
    assert any(ln.startswith("fitted grid: probe error") for ln in res.output.splitlines())
    assert np.isfinite(np.load(tmp_path / "f.npy")).all()
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "em", "--nfe", "5", "--fit-grid", "64",
                              "--out", str(tmp_path / "g.npy")])
    assert res.exit_code == 1 and "method must be a deterministic" in res.output
    res = runner.invoke(app, ["sample", str(run_dir), "--fit-grid", "-1", "--out", str(tmp_path / "g.npy")])
    assert res.exit_code == 1 and "--fit-grid must be >= 0" in res.output


def test_errors_are_one_line_messages(run_dir, tmp_path):
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "rk45", "--nfe", "10", "--out", str(tmp_path / "a.npy")])
    assert res.exit_code == 1 and "sampling method 'rk45' does not apply to a 'score' model; valid: em," in res.output
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "consistency", "--nfe", "1",
                              "--out", str(tmp_path / "a.npy")])
    assert res.exit_code == 1 and "does not apply to a 'score' model" in res.output
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


def test_evaluate_analytic_data_reports_tv_and_bound(tmp_path):
    """On a known mixture: MMD^2, histogram TV and the T 5.2 bound from the measured score error.
    The bound must sit above the TV it bounds (the histogram TV, less its noise floor, is below the true TV)."""
    cfg = tmp_path / "ring.yaml"
    cfg.write_text("data: ring\nn_train: 2000\nn_test: 1000\nnet_args: {hidden: 64, depth: 2}\nsteps: 400\n"
                   "batch_size: 128\nema_decay: 0.98\ncheckpoint_every: 400\neval_every: 400\nn_eval: 500\nnfe: 51\nprogress: false\n")
    assert runner.invoke(app, ["train", str(cfg), f"out={tmp_path}"]).exit_code == 0
    res = runner.invoke(app, ["evaluate", str(tmp_path / "ring"), "--n", "1000"])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "ring" / "eval.json").read_text())
    assert out["mmd2_stderr"] > 0 and abs(out["mmd2"]) < 1
    assert 0 < out["score_error_rms"] < 100 and 0 <= out["prior_tv"] < 0.05
    assert out["tv_bound"] >= out["tv_histogram"] - 2 * out["tv_histogram_floor"]
    assert out["tv_bound"] == pytest.approx(out["prior_tv"] + out["tv_bound_score_term"])


def test_inpaint_run_needs_images(run_dir):
    import torch

    from scoresde.running.runs import inpaint_run, load_run

    with pytest.raises(ValueError, match="inpaint needs a run trained on images"):
        inpaint_run(load_run(run_dir), torch.ones(2), 2)
