"""The benchmark harness (`python -m benchmarks`): listing, one quick run, the environment record."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks package lives beside src/, not inside it

from benchmarks import BENCHMARKS, common  # noqa: E402

ENV_KEYS = {"machine", "torch", "cuda", "git", "date", "quick"}


def harness(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(common.ENV_VAR, None)
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_list_names_every_benchmark():
    res = harness("--list")
    assert res.returncode == 0, res.stderr
    listed = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    assert listed == list(BENCHMARKS)


def test_unknown_benchmark_is_refused():
    res = harness("no-such-benchmark")
    assert res.returncode != 0 and "invalid choice" in res.stderr


def check_environment(record: dict) -> None:
    assert ENV_KEYS <= set(record)
    assert {"platform", "cpu", "cpu_count"} <= set(record["machine"])
    assert record["git"]["revision"] and len(record["git"]["revision"]) == 40
    assert record["quick"] is True


def test_quick_run_writes_outputs_with_the_environment(tmp_path):
    res = harness("consistency", "--quick", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "consistency"
    out = json.loads((folder / "consistency_ring.json").read_text())
    check_environment(out["environment"])
    assert out["set"] == "ring" and "w2" in out
    run = json.loads((folder / "run-ring.json").read_text())
    check_environment(run["environment"])
    assert run["command"].startswith("python -m benchmarks consistency --quick")
    assert "### ring" in (folder / "run-ring.log").read_text()
    from PIL import Image

    with Image.open(folder / "consistency_ring.png") as im:
        check_environment(json.loads(im.info["Description"]))
    assert (folder / "runs").is_dir()  # a quick run trains under its own folder, never under runs/bench-*


def test_json_round_trip_and_markdown_header(tmp_path):
    common.configure(tmp_path, quick=True)
    try:
        path = common.write_json("x", [1, 2.5, {"a": Path("p")}], file="rows.json")
        assert json.loads(path.read_text())["environment"]["quick"] is True
        assert common.read_json(path) == [1, 2.5, {"a": "p"}]
        d = common.write_json("x", {"k": 1})
        assert d == tmp_path / "x" / "x.json" and common.read_json(d) == {"k": 1}
        md = common.write_text("x", "report.md", "| a |")
        assert md.read_text().startswith("<!-- environment: {")
    finally:
        common.configure(None, quick=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in BENCHMARKS if n != "consistency"])
def test_every_benchmark_runs_quick(name, tmp_path):
    res = harness(name, "--quick", "--out", str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / name).glob("run*.json"))
    assert runs and all("environment" in json.loads(r.read_text()) for r in runs)


def test_gpu_benchmark_quick_on_the_cpu(tmp_path):
    """`gpu --quick` runs the whole code path on the CPU (tiny twins, no compile); without --quick and without
    CUDA it refuses with a message."""
    res = harness("gpu", "--quick", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    check_environment(out["environment"])
    assert [r["precision"] for r in out["train"]] == ["fp32", "bf16"]
    assert [r["precision"] for r in out["sample"]] == ["fp32", "bf16"]
    for r in out["train"] + out["sample"]:
        assert set(r["img_s"]) == {"scoresde", "diffusers contiguous", "diffusers channels-last"}
        assert all(v > 0 for v in r["img_s"].values())
        assert r["ratio"] == r["img_s"]["scoresde"] / max(r["img_s"]["diffusers contiguous"],
                                                          r["img_s"]["diffusers channels-last"])
    for r in out["train"]:
        assert abs(r["params"]["scoresde"] / r["params"]["diffusers"] - 1) < 0.1
    import torch

    if not torch.cuda.is_available():
        res = harness("gpu", "--out", str(tmp_path))
        assert res.returncode != 0 and "needs a CUDA device" in res.stderr


def test_stochastic_quick_runs_every_stage(tmp_path):
    """`stochastic --quick`: choice set and its refinement, held-out report, learned digits model, overhead, report
    and figures."""
    res = harness("stochastic", "--quick", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "stochastic"
    for stage in ("choose", "refine", "exact", "confirm", "learned", "overhead"):
        check_environment(json.loads((folder / f"stochastic_{stage}.json").read_text())["environment"])
    exact = common.read_json(folder / "stochastic_exact.json")
    assert {r["target"] for r in exact["rows"]} == {"ring", "mix16", "mix16b", "mix16c"}
    assert exact["picks"]["10"]["best"]["scoresde"].startswith("scoresde/")
    assert any(r["kind"] == "stochastic" and "kid" in r for r in common.read_json(folder / "stochastic_learned.json")["rows"])
    assert "## (a) exact scores" in (folder / "stochastic_report.md").read_text()
    assert (folder / "stochastic_ring.png").exists() and (folder / "stochastic_learned.png").exists()


def test_stochastic_precise_scoring_runs_brownian_noise_as_its_iid_twin():
    """confirm --precise: each MMD^2 with its standard error (metrics.mmd2_fourier), Brownian noise run i.i.d."""
    from benchmarks import stochastic

    assert stochastic.same_law("ours", ("sa3", {"noise": "brownian", "tau": 0.5})) == ("sa3", {"tau": 0.5})
    wanted = {("scoresde/sa3/noise=brownian", 10), ("diffusers/SA-Solver/trailing", 10)}
    rows = stochastic.evaluate("ring", 400, [10], seed=2, wanted=wanted, precise=True)
    assert {r["config"] for r in rows if r["nfe"]} == {c for c, _ in wanted}
    assert all(r["error"] is None and r["mmd2_se"] > 0 and r["mmd2_fine_se"] > 0 for r in rows if r["nfe"])
    assert rows[0]["mmd2_sd"] > 0  # the null row: one exact sample's standard error
