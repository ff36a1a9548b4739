"""The benchmark harness (`python -m benchmarks`): listing, one quick run, the environment record."""
from __future__ import annotations

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.parametrize("name, log, extra", [("imaging", "run-quick.log", []),
                                              ("weightings", "run-digits_3steps_seed1-2_twin.log", []),
                                              ("inpainting", "run.log", []),
                                              ("alignment", "run-mnist.log", ["--parts", "mnist"])])
def test_image_benchmarks_refuse_an_absent_device_by_name(name, log, extra, tmp_path):
    """--device cuda without CUDA: one line naming the option, before any training, no traceback; the log of
    the last finished run of that name is left as it was (the stopped run's is beside it, .partial)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    (tmp_path / name).mkdir()
    (tmp_path / name / log).write_text("the last finished run\n")
    res = harness(name, "--quick", "--device", "cuda", "--out", str(tmp_path), *extra)
    assert res.returncode != 0 and "--device cuda" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / name / "runs").exists()
    assert (tmp_path / name / log).read_text() == "the last finished run\n"
    assert len(list((tmp_path / name).glob(f"{log}.*.partial"))) == 1


@pytest.mark.slow  # 6 min on an AVX2-only 2-core CPU (every sampler configuration on five exact-score targets)
def test_stochastic_quick_runs_every_stage(tmp_path):
    """`stochastic --quick`: choice set and its refinement, held-out report, learned digits model, overhead, report
    and figures."""
    res = harness("stochastic", "--quick", "--out", str(tmp_path), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "stochastic"
    for stage in ("choose", "refine", "exact", "confirm", "learned", "overhead"):
        check_environment(json.loads((folder / f"stochastic_{stage}.json").read_text())["environment"])
    exact = common.read_json(folder / "stochastic_exact.json")
    assert {r["target"] for r in exact["rows"]} == {"ring", "mix16", "mix16b", "mix16c", "swiss"}
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


def test_stochastic_choice_scores_each_row_against_the_null_row_of_its_sample_size():
    """refine --precise: null rows of two sample sizes in one set; each config is floored by the null sd of its own n
    (with the n = 100 null, sd 1, both configurations would tie at the floor and the name would decide)."""
    from benchmarks import stochastic

    rows = [{"target": t, "config": "null (exact samples)", "nfe": 0, "n": n, "mmd2_sd": sd, "mmd2_fine_sd": sd}
            for t in stochastic.CHOICE_TARGETS for n, sd in ((100, 1.0), (1000, 0.01))]
    rows += [{"target": t, "config": c, "member": c.rsplit("/", 1)[0], "nfe": 50, "n": 1000, "mmd2": v,
              "mmd2_fine": v} for t in stochastic.CHOICE_TARGETS for c, v in (("scoresde/a/x", 0.05),
                                                                              ("scoresde/b/x", 0.02))]
    picks = stochastic.choose(rows, [50], refined=rows)["50"]
    assert picks["best"]["scoresde"] == "scoresde/b/x" and picks["refined_n"] == 1000


def test_stochastic_members_rerun_replaces_only_their_rows_at_the_nfes_run(tmp_path):
    """--members with --nfes 20: that member's NFE 20 rows are replaced; its NFE 10 rows, the other members' rows
    and the null rows stay."""
    from benchmarks import stochastic

    common.configure(tmp_path)
    path = common.out_dir(stochastic.NAME) / "stochastic_choose.json"
    row = lambda member, nfe, v: {"target": "mix16", "config": f"{member}/x", "member": member, "nfe": nfe, "mmd2": v}
    null = {"target": "mix16", "config": "null (exact samples)", "nfe": 0, "mmd2": 0.0}
    common.write_json(stochastic.NAME, {"rows": [null, row("scoresde/a", 10, 1.0), row("scoresde/a", 20, 2.0),
                                                 row("diffusers/B", 20, 3.0)]}, file=path.name)
    stochastic.MEMBERS = ["scoresde/a"]
    try:
        merged = stochastic.merge(path, [null, row("scoresde/a", 20, 5.0)])
    finally:
        stochastic.MEMBERS = None
    assert sorted((r["member"], r["nfe"], r["mmd2"]) for r in merged if r["nfe"]) == [
        ("diffusers/B", 20, 3.0), ("scoresde/a", 10, 1.0), ("scoresde/a", 20, 5.0)]
    assert sum(not r["nfe"] for r in merged) == 1


def test_stochastic_precise_confirm_pools_seeds_of_two_sizes_by_inverse_variance(tmp_path):
    """Seeds run at different n pool in one file (a re-run replaces only its own (NFE, seed) rows) and the report's
    mean is the inverse-variance weighted one, its null sd pooled the same way."""
    from benchmarks import stochastic

    common.configure(tmp_path)
    path = common.out_dir(stochastic.NAME) / stochastic.CONFIRM_FILES[True]
    picks = {"50": {"best": {"scoresde": "scoresde/a/x", "diffusers": "diffusers/B/y"}}}

    def rows(seed, n, ours, ours_se, sd):
        null = {"target": "mix16", "config": "null (exact samples)", "nfe": 0, "n": n, "seed": seed,
                "mmd2": 0.0, "mmd2_fine": 0.0, "mmd2_sd": sd, "mmd2_fine_sd": sd}
        made = [{"target": "mix16", "config": c, "member": c.rsplit("/", 1)[0], "nfe": 50, "n": n, "seed": seed,
                 "mmd2": v, "mmd2_se": se, "mmd2_fine": v, "mmd2_fine_se": se} for c, v, se in (("scoresde/a/x", ours, ours_se),
                                                                      ("diffusers/B/y", 40.0, 1.0))]
        return [null, *made]

    common.write_json(stochastic.NAME, {"rows": rows(2, 100, 9.0, 9.0, 0.3), "picks": picks}, file=path.name)
    for ours in (7.0, 4.0):  # seed 4 twice: the second replaces the first
        kept = stochastic.keep_other_cells(path, rows(4, 400, ours, 2.0, 0.1) + rows(3, 200, 1.0, 1.0, 0.2))
        common.write_json(stochastic.NAME, {"rows": kept, "picks": picks}, file=path.name)
    saved = common.read_json(path)["rows"]
    assert sorted((r["seed"], r["nfe"]) for r in saved) == [(2, 0), (2, 50), (2, 50), (3, 0), (3, 50), (3, 50),
                                                             (4, 0), (4, 50), (4, 50)]
    stochastic.report(None, None, None, None, None, [50])
    line = next(x for x in (path.parent / "stochastic_report.md").read_text().splitlines() if x.startswith("| mix16 |"))
    w = [1 / 81, 1, 1 / 4]  # inverse variances of seeds 2, 3, 4
    mean, se = (9 * w[0] + 1 * w[1] + 4 * w[2]) / sum(w), sum(w) ** -0.5
    null_sd = (0.3 ** -2 + 0.2 ** -2 + 0.1 ** -2) ** -0.5
    assert f"| {mean:.2e} +- {se:.1e} |" in line and line.startswith(f"| mix16 | 100/200/400 | {null_sd:.1e} / ")
    stochastic.MEMBERS = ["scoresde/a"]  # --members: a cell re-run for one member keeps the other's rows
    try:
        kept = stochastic.keep_other_cells(path, [r for r in rows(4, 400, 3.0, 2.0, 0.1) if r.get("member") != "diffusers/B"])
    finally:
        stochastic.MEMBERS = None
    assert {r["config"]: r["mmd2"] for r in kept if r["seed"] == 4 and r["nfe"]} == {"scoresde/a/x": 3.0, "diffusers/B/y": 40.0}
    assert sum(r["seed"] == 4 and not r["nfe"] for r in kept) == 1


def test_alignment_mnist_part_finetunes_a_given_run_and_names_a_missing_one(tmp_path):
    """`alignment --parts mnist-tune mnist` on the quick 3-step MNIST run: the tune part scores each lr on the
    hold-out digit and the report runs each method at its pick, one file per method recording the run it
    fine-tuned and its snapshots; a --mnist-run that is not a run is refused by name, without a traceback."""
    from benchmarks import alignment

    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "mnist-tune", "mnist",
                  "--mnist-methods", "pg", "ddpo", "--tag", "_t")
    assert res.returncode == 0, res.stderr[-2000:]
    common.configure(tmp_path, quick=True)
    tuned = common.read_json(common.out_dir(alignment.NAME) / "alignment_mnist_tuned_t.json")
    assert tuned["label"] == alignment.MNIST_TUNE_LABEL != 3
    for method in ("pg", "ddpo"):
        sweep = tuned["methods"][method]["sweep"]
        assert [d["lr"] for d in sweep] == list(alignment.MNIST_LRS)
        curve = lambda d: alignment.mnist_curve(tuned["pretrained"], d["snapshots"])  # noqa: E731
        assert all(d["score"] == alignment.share_at_kl(curve(d), alignment.MNIST_KL_BUDGET) for d in sweep)
        best = tuned["methods"][method]["best_lr"]
        assert max(d["score"] for d in sweep) == next(d["score"] for d in sweep if d["lr"] == best)
        saved = common.read_json(common.out_dir(alignment.NAME) / f"alignment_mnist_t_{method}.json")
        assert saved["step"] == 3 and saved["run"].endswith("VP") and saved["label"] == 3
        run = saved["runs"][f"beta={None if method == 'ddpo' else 1.0} lr={best:g}"]
        assert run["lr"] == best and run["picked"] and run["snapshots"] and saved["lr_from"] == "alignment_mnist_tuned_t.json"
    assert (common.out_dir(alignment.NAME) / "alignment_mnist_t.png").exists()
    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "mnist-tune", "--mnist-methods", "pg",
                  "--tag", "_t", "--mnist-lrs", "3e-4")  # an lr added later joins the sweep; the others' are kept
    assert res.returncode == 0, res.stderr[-2000:]
    again = common.read_json(common.out_dir(alignment.NAME) / "alignment_mnist_tuned_t.json")["methods"]
    assert [d["lr"] for d in again["pg"]["sweep"]] == [*alignment.MNIST_LRS, 3e-4]
    assert again["pg"]["sweep"][:3] == tuned["methods"]["pg"]["sweep"] and again["ddpo"] == tuned["methods"]["ddpo"]
    best = tuned["methods"]["pg"]["best_lr"]
    assert f"| pg lr={best:g} beta=1.0 | " in (common.out_dir(alignment.NAME) / "alignment_mnist_t.md").read_text()
    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "mnist", "--mnist-methods", "ddpo",
                  "--tag", "_t", "--mnist-lrs", "1e-5", "1e-4")  # other lrs join the pick's run, flagged
    assert res.returncode == 0, res.stderr[-2000:]
    runs = common.read_json(common.out_dir(alignment.NAME) / "alignment_mnist_t_ddpo.json")["runs"]
    best = tuned["methods"]["ddpo"]["best_lr"]
    assert {key: r["picked"] for key, r in runs.items()} == {f"beta=None lr={lr:g}": lr == best for lr in {best, 1e-5, 1e-4}}
    assert "| ddpo | None | 0.0001 (not the pick) | " in (common.out_dir(alignment.NAME) / "alignment_mnist_t.md").read_text()
    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "mnist-tune", "--mnist-betas", "1", "2")
    assert res.returncode != 0 and "--mnist-betas: mnist-tune scores one beta, got 2" in res.stderr  # not ignored
    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "mnist", "--mnist-snapshots", "0")
    assert res.returncode != 0 and "--mnist-snapshots: '0' is not a whole number >= 1" in res.stderr
    assert "Traceback" not in res.stderr
    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "mnist", "--mnist-run", str(tmp_path / "no"))
    assert res.returncode != 0 and "--mnist-run" in res.stderr and "Traceback" not in res.stderr
    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "grid-floors", "--device", "auto")
    assert res.returncode != 0 and "--device auto applies to --parts mnist" in res.stderr  # not silently ignored


def test_alignment_share_at_kl_and_leads_read_a_piecewise_linear_curve():
    """share_at_kl interpolates where the curve first crosses the KL (a curve that turns back counts its first
    crossing) and keeps the last share of a curve that stops short; leads are known in closed form here."""
    from benchmarks.alignment import leads, share_at_kl

    curve = [(0.0, 0.1), (0.5, 0.3), (2.0, 0.6), (1.0, 0.9)]
    assert share_at_kl(curve, 0.25) == pytest.approx(0.2) and share_at_kl(curve, 1.25) == pytest.approx(0.45)
    assert share_at_kl(curve, 0.5) == pytest.approx(0.3) and share_at_kl(curve, 3.0) == 0.9
    a, b = [(0.0, 0.1), (1.0, 0.5), (3.0, 0.7)], [(0.0, 0.1), (2.0, 0.3)]
    ks = np.linspace(0.01, 2.0, 200)  # the common range (0, 2]: a - b = 0.3 k up to k = 1, then 0.3
    assert leads(a, b, n=200) == pytest.approx(np.minimum(0.3 * ks, 0.3))
    assert leads(b, a, n=200) == pytest.approx(-np.minimum(0.3 * ks, 0.3))
    assert leads(a, [(0.0, 0.1)]) is None


def test_alignment_budget_share_mixes_the_models_of_a_curve():
    """budget_share: the best share of a random pick among the curve's models whose mean KL is within the budget;
    checked against the linear programme over the mixture weights (scipy's linprog)."""
    from scipy.optimize import linprog

    from benchmarks.alignment import budget_share

    curve = [(0.0, 0.1), (2.0, 0.5), (1.0, 0.2), (3.0, 0.45)]
    assert budget_share(curve, 1.0) == pytest.approx(0.3) and budget_share(curve, 0.5) == pytest.approx(0.2)
    assert budget_share(curve, 4.0) == 0.5
    ks, ss = np.array([k for k, _ in curve]), np.array([s for _, s in curve])
    for budget in (0.3, 1.0, 1.7, 2.5, 3.0):
        lp = linprog(-ss, A_ub=ks[None], b_ub=[budget], A_eq=np.ones((1, len(curve))), b_eq=[1.0], bounds=(0, None))
        assert -lp.fun == pytest.approx(budget_share(curve, budget), abs=1e-9)


def test_alignment_exact_runs_on_part_of_the_targets_and_methods_share_one_file(tmp_path):
    """`alignment --parts exact-tune exact` on some targets / methods lays its rows over the saved file of its tag;
    pg tuned to the value baseline (more reward evaluations) brings a pg-equal row, and the equal-evaluation
    ratio leaves pg out."""
    from benchmarks import alignment

    tiny = ("alignment", "--quick", "--out", str(tmp_path), "--parts", "exact-tune", "exact", "--betas", "1", "--iters",
            "2", "--batch", "8", "--n-steps", "3", "--n-eval", "64", "--snapshots", "1", "--tag", "_t")
    for extra in (("--targets", "mix2", "--methods", "pg", "ce", "dpok"), ("--targets", "mix2", "--methods", "ddpo"),
                  ("--targets", "mix16", "--methods", "dpok")):
        res = harness(*tiny, *extra)
        assert res.returncode == 0, res.stderr[-2000:]
    common.configure(tmp_path, quick=True)
    folder = common.out_dir(alignment.NAME)
    tuned = common.read_json(folder / "alignment_tuned_t.json")
    assert {t: sorted(v) for t, v in tuned.items()} == {"mix2": ["ce", "ddpo", "dpok", "pg"], "mix16": ["dpok"]}
    saved = common.read_json(folder / "alignment_exact_t.json")
    assert sorted(saved["mix2"]["1.0"]["methods"]) == ["ce", "ddpo", "dpok", "pg"]
    assert sorted(saved["mix16"]["1.0"]["methods"]) == ["dpok"]
    assert (folder / "run-exact-tune+exact_t-mix2-ddpo.json").exists()
    res = harness(*tiny[:4], "--parts", "exact", *tiny[7:-2], "--tag", "_t_seed2", "--tuned-tag", "_t", "--report-seed", "2",
                  "--targets", "mix2", "--methods", "pg")
    assert res.returncode == 0, res.stderr[-2000:]
    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "seed-spread", "--tag", "_t", "--seeds", "1",
                  "2", "--methods", "pg", "--targets", "mix2")
    assert res.returncode == 0, res.stderr[-2000:]
    spread = (folder / "alignment_seed_spread_t.md").read_text()
    pg = [r for r in spread.splitlines() if r.startswith("| 1.0 |") and "| pg |" in r]
    assert len(pg) == 1 and pg[0].endswith(" of 2 |") and "| - |" not in pg[0]  # seed 1 from _t, seed 2 from _t_seed2
    assert "mix16" not in spread and "| dpok |" not in spread and (folder / "alignment_seed_spread_t.png").exists()
    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "adjoint-tails", "grid-floors", "fit-floor")
    assert res.returncode == 0, res.stderr[-2000:]
    for file, second in (("alignment_adjoint_tails.md", ("20", "100")), ("alignment_grid_floors.md", ("1.0", "2.0"))):
        rows = (folder / file).read_text().splitlines()[-4:]
        assert [r.split(" | ")[:2] for r in rows] == [[f"| {t}", v] for t in ("mix2", "mix16") for v in second]
    res = harness("alignment", "--quick", "--out", str(tmp_path), "--parts", "default-method", "--seeds", "1", "2",
                  "--default-option", "lr_final=1e-4")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = (folder / "alignment_default_method.md").read_text().splitlines()[3:]
    assert [r.split(" | ")[1] for r in rows] == ["pg lr_final=0.0001", "ce lr_final=0.0001"] and all(len(r.split(" | ")[2].split()) == 2 for r in rows)
    assert rows[1].split(" | ")[6] == "16" and (folder / "alignment_default_method.png").exists()  # ce: 2 x 8 chains
    rows = (folder / "alignment_fit_floor.md").read_text().splitlines()
    assert [r.split(" | ")[0] for r in rows[3:5]] == ["| exact tilt samples", "| EM chain of the exact tilted score, 10 steps"]
    assert all(len(r.split(" | ")) == 6 for r in [rows[1], *rows[3:5]]) and rows[-1].startswith("null (1000 exact samples")

    tuned = {m: {"best": {"lr": 1.0}, "sweep": []} for m in alignment.METHODS_RUN}
    tuned["pg"] = {"best": {"lr": 1.0, "baseline": "value"},
                   "sweep": [{"knobs": {"lr": 1.0, "baseline": "value"}, "score": 0.1},
                             {"knobs": {"lr": 2.0, "baseline": "mean"}, "score": 0.3},
                             {"knobs": {"lr": 3.0, "baseline": "mean"}, "score": 0.2}]}
    assert alignment.reported_knobs(tuned)[alignment.EQUAL] == {"lr": 3.0, "baseline": "mean"}
    final = {"pg": 0.01, "pg-equal": 0.03, "adjoint": 0.05, "dpok": 0.1, "draft": 0.2, "ddpo": 0.3}
    row = {"null": [0.001, 0.002], "grid_floor": 0.0,
           "methods": {m: {"knobs": {"baseline": "value"} if m == "pg" else {},
                           "final": {"mmd": v, "reward": 0.0, "kl": 0.0}} for m, v in final.items()}}
    line = alignment.exact_table({"mix2": {1.0: row}})[-2]
    assert line.endswith("| 0.10 | 0.30 |")  # all knobs: pg 0.01 / dpok 0.1; equal evaluations: pg-equal 0.03 / 0.1
    assert alignment.ratio_cell(0.004, 0.003, 0.005) == "floor (1.33)" and alignment.ratio_cell(0.0, 0.0, 0.005) == "floor"
    assert alignment.ratio_cell(0.01, 0.0, 0.005) == "inf"  # the baseline on the tilt, ours off it


def test_alignment_seed_ratios_compare_equal_evaluation_methods_with_the_best_baseline_seed_by_seed():
    """Per seed: the best of our methods that spend no extra reward evaluations (pg with the value baseline is
    left out) over the best baseline; 'floor' when both are within null + 2 sd; a seed without baselines is '-'
    and not counted."""
    from benchmarks import alignment

    rows = {1.0: {"null": [0.001, 0.002],  # line 0.005
                  "methods": {"pg": {1: 0.001, 2: 0.001, 3: 0.001}, "pg-equal": {1: 0.03, 2: 0.004, 3: 0.02},
                              "adjoint": {1: 0.05}, "dpok": {1: 0.1, 2: 0.003}, "ddpo": {1: 0.2, 2: 0.3}},
                  "spends_more": {"pg"}}}
    lines = alignment.seed_ratios("mix16", rows, [1, 2, 3])
    assert lines[-2] == "| 1.0 | 0.30 | floor (1.33) | - | 2 of 2 |"
    rows[1.0]["methods"]["dpok"][1] = 0.05  # 0.03 / 0.05 = 0.6: missed
    assert alignment.seed_ratios("mix16", rows, [1, 2, 3])[-2] == "| 1.0 | 0.60 | floor (1.33) | - | 1 of 2 |"
    rows[1.0]["methods"]["dpok"][1] = 0.0  # the baseline exactly on the tilt, ours off it: missed, not skipped
    assert alignment.seed_ratios("mix16", rows, [1, 2, 3])[-2] == "| 1.0 | inf | floor (1.33) | - | 1 of 2 |"
    assert alignment.seed_ratios("mix16", {1.0: {**rows[1.0], "methods": {"pg": {1: 0.01}}}}, [1]) == []


def test_alignment_trains_ddpo_once_for_every_beta_and_scores_it_against_each_tilt(monkeypatch):
    """DDPO has no KL term, so its run does not depend on beta: method_run trains it once and scores the same
    snapshots against each beta's tilt; a method with a KL term is trained per beta."""
    from types import SimpleNamespace

    from benchmarks import alignment

    calls = []
    for name in ("ddpo", "pg"):
        options, train = alignment.METHODS[name]
        monkeypatch.setitem(alignment.METHODS, name, (options, lambda *a, _t=train, _n=name, **k: calls.append(_n) or _t(*a, **k)))
    args = SimpleNamespace(iters=2, batch=8, n_steps=3, n_eval=64, snapshots=1)
    alignment._trained_snapshots.cache_clear()
    ddpo = [alignment.method_run("ddpo", "mix2", b, {"lr": 1e-2, "clip": 1e-3}, args, 7) for b in (1.0, 4.0)]
    pg = [alignment.method_run("pg", "mix2", b, {"lr": 1e-2, "baseline": "mean"}, args, 7) for b in (1.0, 4.0)]
    assert calls == ["ddpo", "pg", "pg"]
    (one,), (four,) = ddpo
    assert one["reward"] == four["reward"] and one["kl"] == four["kl"] and one["mmd"] != four["mmd"]
    assert pg[0][0]["kl"] != pg[1][0]["kl"] and "samples" not in one


def test_samplers_heldout_pools_seeds_into_cell_means_and_the_null_of_all_exact_draws():
    from benchmarks.samplers import NULL_REPEATS, pool_seeds

    rng = np.random.default_rng(0)
    draws = rng.normal(1e-4, 2e-4, size=(3, NULL_REPEATS))  # the null's exact-sample MMD^2 values, per seed
    rows = [{"target": "t", "config": "null (exact samples)", "nfe": 0, "n": 10, "seed": s + 1,
             "mmd2": d.mean(), "mmd2_sd": d.std(ddof=1), "mmd2_fine": d.mean(), "mmd2_fine_sd": d.std(ddof=1)}
            for s, d in enumerate(draws)]
    rows += [{"target": "t", "config": "a", "nfe": 5, "n": 10, "seed": s, "mmd2": v, "mmd2_fine": 2 * v, "gap": -v}
             for s, v in ((2, 3.0), (1, 1.0), (3, 5.0))]
    rows += [{"target": "t", "config": "b", "nfe": 5, "n": 10, "mmd2": 7.0, "mmd2_fine": 0.0, "gap": 0.0}]  # seed 1
    rows += [{"target": "t", "config": "c", "nfe": 5, "n": 10, "seed": s, "mmd2": 1.0, "mmd2_fine": 0.0, "gap": 0.0,
              **({"mmd2_paired": 2.0 * s} if s < 3 else {})} for s in (1, 2, 3)]  # paired on two seeds of three
    # an automatic schedule's cell run by two searches: the later search's rows replace the earlier's, seed by seed
    rows += [{"target": "t", "config": "auto", "nfe": 5, "n": 10, "seed": s, "mmd2": v, "mmd2_fine": 0.0, "gap": 0.0,
              **({"search": k} if k > 1 else {})} for s, v, k in ((1, 9.0, 1), (2, 9.0, 1), (1, 2.0, 2), (2, 4.0, 2))]
    pooled = {r["config"]: r for r in pool_seeds(rows)}
    assert (pooled["auto"]["seeds"], pooled["auto"]["mmd2"]) == (2, 3.0)
    null = pooled["null (exact samples)"]
    assert null["seeds"] == 3 and null["mmd2"] == pytest.approx(draws.mean())
    assert null["mmd2_sd"] == pytest.approx(draws.std(ddof=1))  # the sd of all 12 draws, not a mean of sds
    a = pooled["a"]
    assert (a["seeds"], a["mmd2"], a["mmd2_fine"], a["gap"]) == (3, 3.0, 6.0, -3.0)
    assert pooled["a"]["seed"] == 1 and pooled["b"]["seeds"] == 1
    assert "mmd2_paired" not in pooled["c"]
    again = [{k: v for k, v in r.items() if k != "mmd2_paired"} for r in rows if r["config"] == "c"]  # run again
    assert {r["config"]: r for r in pool_seeds(rows + again)}["c"] == pooled["c"]
    paired = [dict(r, mmd2_paired=1.0) for r in again]
    assert {r["config"]: r for r in pool_seeds(rows + paired + again)}["c"]["mmd2_paired"] == 1.0  # kept: one draw
    two = {r["config"]: r for r in pool_seeds([r for r in rows if r.get("seed") != 3 or r["config"] != "c"])}
    assert two["c"]["mmd2_paired"] == 3.0


def test_samplers_heldout_report_checks_each_automatic_schedule_against_the_peer_and_its_own_fixed_grid(tmp_path):
    """Two targets, x_T seeds 1 and 2, the null from the first run and the ipndm rows added by a run with
    --configs (no null row): each automatic schedule's goals are counted against the best diffusers row and its own
    method's fixed grid, from the seed means; a row present for one seed only does not compete."""
    from benchmarks import common, samplers

    common.configure(tmp_path)
    rows = []
    for seed in (1, 2):
        for t in ("a", "b"):
            rows.append({"target": t, "config": "null (exact samples)", "nfe": 0, "n": 10, "seed": seed,
                         "mmd2": 0.0, "mmd2_sd": 1e-5, "mmd2_fine": 0.0, "mmd2_fine_sd": 1e-5})
            values = {"scoresde/default": 4e-3, "scoresde/auto": 3e-3, "diffusers/X/default": 2e-3,
                      "scoresde/ipndm": 5e-3 if t == "a" else 1e-3, "scoresde/auto-ipndm": 9e-4 if t == "a" else 2e-3}
            rows += [{"target": t, "config": c, "nfe": 5, "n": 10, "seed": seed, "mmd2": v, "mmd2_fine": v,
                      "gap": 1.0} for c, v in values.items()]
    rows.append({"target": "a", "config": "diffusers/Y/default", "nfe": 5, "n": 10, "seed": 1, "mmd2": 1e-6,
                 "mmd2_fine": 0.0, "gap": 0.0})  # seed 1 only: not the best peer
    text = samplers.heldout_report(rows, "test")
    assert "- auto, NFE 5: <= 0.5x best diffusers (or both at the floor) in 0/2; never worse than its fixed grid in " \
           "2/2; missed: a, b" in text
    assert "- auto-ipndm, NFE 5: <= 0.5x best diffusers (or both at the floor) in 1/2; never worse than its fixed " \
           "grid in 1/2; missed: b" in text
    assert "| a | 5 | 2 |" in text and "X/default 2.00e-03" in text
    assert (tmp_path / "samplers" / "samplers_test.png").exists()


def test_samplers_heldout_report_reads_a_level_every_sampler_shares_with_the_converged_sampler_as_noise(tmp_path):
    """Where the converged sampler's seed mean sits above the floor, an automatic schedule and the best peer both
    within the floor of it are "both at the converged level" (met, whatever their ratio), and so is the fixed grid
    at NFE 20; one outside it is judged by its ratio, as before; the verdicts without the clause are given too."""
    from benchmarks import common, samplers

    common.configure(tmp_path)
    rows = []
    for t, auto in (("a", 3.1e-4), ("b", 3.6e-4)):
        rows.append({"target": t, "config": "null (exact samples)", "nfe": 0, "n": 10, "seed": 1, "mmd2": 0.0,
                     "mmd2_sd": 1e-5, "mmd2_fine": 0.0, "mmd2_fine_sd": 1e-5})  # floor 2e-5
        for nfe, values in ((10, {"scoresde/default": 3.3e-4, "scoresde/auto": auto, "diffusers/X/default": 2.9e-4}),
                            (20, {"scoresde/default": auto, "scoresde/auto": auto, "diffusers/X/default": 2.9e-4})):
            values[samplers.CONVERGED] = 3.0e-4
            rows += [{"target": t, "config": c, "nfe": nfe, "n": 10, "seed": 1, "mmd2": v, "mmd2_fine": v,
                      "gap": 1.0} for c, v in values.items()]
    text = samplers.heldout_report(rows, "test")
    assert "| a | 10 | 1 | 2.0e-05 | 3.00e-04 | 3.30e-04 | 3.10e-04 | - | converged (1.07) | 0.94 |" in text
    assert "best scoresde (oracle)" in text and "| auto 3.10e-04 |" in text  # the converged row never the oracle
    assert "- auto, NFE 10: <= 0.5x best diffusers (or both at the floor, or at the converged level) in 1/2; never " \
           "worse than its fixed grid in 1/2; missed: b" in text
    assert "- Without the converged level: auto, NFE 10: <= 0.5x best diffusers (or both at the floor) in 0/2; " \
           "never worse than its fixed grid in 1/2; missed: a, b" in text
    assert "- auto, NFE 20: (= the fixed grid) at the floor (or the converged level) in 1/2; not at the floor: b" in text
    assert "- Without the converged level: auto, NFE 20: (= the fixed grid) at the floor in 0/2" in text


def test_samplers_heldout_report_sets_the_schedules_beside_the_peer_closest_to_the_converged_law(tmp_path):
    """Where every row carries mmd2_paired, a table of seed means: the schedules and fixed grids against the
    diffusers configuration with the smallest paired value (not the one closest to the target by MMD^2)."""
    from benchmarks import common, samplers

    common.configure(tmp_path)
    rows = [{"target": "a", "config": "null (exact samples)", "nfe": 0, "n": 10, "seed": s, "mmd2": 0.0,
             "mmd2_sd": 1e-5, "mmd2_fine": 0.0, "mmd2_fine_sd": 1e-5} for s in (1, 2)]
    paired = {"scoresde/default": 4e-5, "scoresde/ipndm": 3e-5, "scoresde/auto": 1e-5, "scoresde/auto-ipndm": 2e-5,
              "diffusers/X/default": 3e-4, "diffusers/Y/default": 2e-5}
    for seed, shift in ((1, 1e-6), (2, -1e-6)):
        rows += [{"target": "a", "config": c, "nfe": 10, "n": 10, "seed": seed, "gap": 0.0, "mmd2_fine": 0.0,
                  "mmd2": 1e-6 if c == "diffusers/X/default" else -2e-4, "mmd2_paired": v + shift}
                 for c, v in paired.items()]
    text = samplers.heldout_report(rows, "test")
    assert "X/default 1.00e-06" in text  # the best peer of the goals, by MMD^2 to the target
    assert "| a | 10 | 2 | 1.00e-05 | 2.00e-05 | 4.00e-05 | 3.00e-05 | Y/default 2.00e-05 | 0.50 | 1.00 |" in text
    plain = [{k: v for k, v in r.items() if k != "mmd2_paired"} for r in rows]
    for part in (plain, [r for r in rows if r["config"] != "scoresde/ipndm"]):  # no paired values; a row missing
        assert "paired by x_T" not in samplers.heldout_report(part, "t")


def test_samplers_goal_by_the_exact_mean_paired_measure_counts_each_clause(tmp_path):
    """The goal read by mmd2_paired_exact (session 42): a schedule meets it at most 0.5x the closest diffusers
    configuration and at most its fixed grid, each unless both sides are within RESOLUTION. auto meets it on a, at
    exactly 0.5x on c and within RESOLUTION of the peer on d, and is 0.6x on b; auto-ipndm is above its fixed grid
    on a, and within RESOLUTION of it on b and of the peer on d."""
    from benchmarks import common, samplers

    common.configure(tmp_path)
    r = samplers.RESOLUTION
    values = {"a": {"scoresde/auto": 1e-5, "scoresde/auto-ipndm": 2e-5, "scoresde/default": 5e-5,
                    "scoresde/ipndm": 1.5e-5, "diffusers/X/default": 4e-5, "diffusers/Y/default": 9e-5},
              "b": {"scoresde/auto": 3e-5, "scoresde/auto-ipndm": 0.9 * r, "scoresde/default": 5e-5,
                    "scoresde/ipndm": 0.5 * r, "diffusers/X/default": 5e-5, "diffusers/Y/default": 9e-5},
              "c": {"scoresde/auto": 2e-6, "scoresde/auto-ipndm": 0.8 * r, "scoresde/default": 5e-5,
                    "scoresde/ipndm": 5e-6, "diffusers/X/default": 4e-6, "diffusers/Y/default": 8e-6},
              "d": {"scoresde/auto": 0.9 * r, "scoresde/auto-ipndm": 0.7 * r, "scoresde/default": 5e-5,
                    "scoresde/ipndm": 1e-5, "diffusers/X/default": 5e-5, "diffusers/Y/default": 0.6 * r}}
    rows = []
    for t, cell in values.items():
        for seed in (1, 2):
            rows.append({"target": t, "config": "null (exact samples)", "nfe": 0, "n": 10, "seed": seed, "mmd2": 0.0,
                         "mmd2_sd": 1e-5, "mmd2_fine": 0.0, "mmd2_fine_sd": 1e-5})
            rows += [{"target": t, "config": c, "nfe": 10, "n": 10, "seed": seed, "gap": 0.0, "mmd2_fine": 0.0,
                      "mmd2": 1e-4, "mmd2_paired": 1e-5, samplers.EXACT_MEAN: v} for c, v in cell.items()]
    ratios = {}
    lines = samplers.coupled_lines(samplers.pool_seeds(rows), list(values), [10], samplers.EXACT_MEAN, ratios)
    assert "- auto, NFE 10: 3/4; missed: b" in lines
    assert "- auto-ipndm, NFE 10: 3/4; missed: a" in lines
    assert ratios[("scoresde/auto", "a", 10)] == 0.25 and ratios[("scoresde/auto", "c", 10)] == 0.5
    assert not any(line.startswith("- ") for line in samplers.coupled_lines(samplers.pool_seeds(rows), ["a"], [10]))
    assert samplers.EXACT_MEAN in samplers.heldout_report(rows, "test")


def test_samplers_paired_mmd2_in_blocks_is_the_librarys_paired_estimate():
    """mmd2_paired_blocked (row blocks, one bandwidth at a time) against schedule.mmd2_paired (the full matrices, tested
    for unbiasedness in tests/sampling) on coupled samples larger than a block, per bandwidth."""
    import torch

    from benchmarks.samplers import kernel_sums, mmd2_paired_blocked
    from scoresde.sampling.schedule import mmd2_paired

    g = torch.Generator().manual_seed(0)
    y = torch.randn(600, 3, generator=g, dtype=torch.float64)
    x = 1.1 * y + 0.1 * torch.randn(600, 3, generator=g, dtype=torch.float64) + 0.05
    h = np.array([0.5, 1.0, 2.0])
    want = [mmd2_paired(x, y, torch.tensor([v])) for v in h]
    np.testing.assert_allclose(mmd2_paired_blocked(x, y, h), want, rtol=1e-9)
    np.testing.assert_allclose(mmd2_paired_blocked(x, y, h, kernel_sums(y, y, h, torch.float64),
                                                   kernel_sums(x, x, h, torch.float64)), want, rtol=1e-9)
    assert min(want) > 0


def test_samplers_heldout_report_lists_the_targets_in_reporting_order_whatever_the_file_order(tmp_path):
    from benchmarks import common, samplers

    common.configure(tmp_path)
    rows = []
    for t in ("zz", "sing8s804", "d2s100"):
        rows.append({"target": t, "config": "null (exact samples)", "nfe": 0, "n": 10, "seed": 1, "mmd2": 0.0,
                     "mmd2_sd": 1e-5, "mmd2_fine": 0.0, "mmd2_fine_sd": 1e-5})
        rows += [{"target": t, "config": c, "nfe": 5, "n": 10, "seed": 1, "mmd2": 1e-3, "mmd2_fine": 0.0, "gap": 0.0}
                 for c in ("scoresde/default", "diffusers/X/default")]
    text = samplers.heldout_report(rows, "test")
    assert text.index("| d2s100 | 5 |") < text.index("| sing8s804 | 5 |") < text.index("| zz | 5 |")


def test_samplers_heldout_report_reads_seeds_without_a_null_row_as_paired_differences_only(tmp_path):
    """Seed 1 is a full run (null row, peer); seeds 2-5 ran ipndm's fixed grid and its schedule only: the cell's
    means are seed 1's, and the paired line gives the mean of auto - fixed over all five seeds with the sd of the
    differences / sqrt(5), marked worse only beyond 2 of them."""
    from benchmarks import common, samplers

    common.configure(tmp_path)
    rows = [{"target": "a", "config": "null (exact samples)", "nfe": 0, "n": 10, "seed": 1, "mmd2": 0.0,
             "mmd2_sd": 1e-5, "mmd2_fine": 0.0, "mmd2_fine_sd": 1e-5}]
    rows += [{"target": "a", "config": c, "nfe": 10, "n": 10, "seed": 1, "mmd2": v, "mmd2_fine": v, "gap": 1.0}
             for c, v in (("scoresde/default", 4e-3), ("diffusers/X/default", 2e-3))]
    fixed, auto = [1e-3, 2e-3, 1e-3, 3e-3, 2e-3], [2e-3, 2e-3, 3e-3, 4e-3, 2e-3]
    rows += [{"target": "a", "config": c, "nfe": 10, "n": 10, "seed": seed, "mmd2": v[seed - 1], "mmd2_fine": 0.0,
              "gap": 1.0} for seed in range(1, 6) for c, v in (("scoresde/ipndm", fixed), ("scoresde/auto-ipndm", auto))]
    rows.append(dict(rows[-2]))  # seed 5's fixed grid run twice: one row counts
    text = samplers.heldout_report(rows, "test")
    assert "| a | 10 | 1 |" in text and "| 2.00e-03 | - | 1.00 | 2.00 |" in text  # seed 1 alone in the cell
    d = np.subtract(auto, fixed)
    se = d.std(ddof=1) / np.sqrt(5)
    assert f"- auto-ipndm - ipndm, a, NFE 10, 5 seeds: {d.mean():+.2e} (se {se:.1e}, {d.mean() / se:+.1f} se)" in text
    assert d.mean() > 2 * se and text.rstrip().endswith("worse")
    rows = [r for r in rows if not (r["seed"] == 3 and r["config"] == "scoresde/auto-ipndm")]
    text = samplers.heldout_report(rows, "test")
    assert "4 seeds" in text and not text.rstrip().endswith("worse")
    same = [{**r, "mmd2": fixed[r["seed"] - 1]} if r["config"] == "scoresde/auto-ipndm" else r for r in rows]
    assert samplers.heldout_report(same, "test").rstrip().endswith("4 seeds: 0 (the same samples)")


def test_samplers_heldout_runs_each_methods_schedule_and_only_the_cells_named(monkeypatch):
    """Both automatic schedules at NFE 5 with their grids recorded, none above AUTO_MAX_NFE (unipc2's "auto" row is
    its fixed grid there, bit for bit); the converged sampler once per target, its row repeated at each NFE and
    equal to ipndm's 101 steps from the same x_T; `only` runs just the named cells and writes no null row (a small
    search and no peers, for speed); runs of two x_T seeds sharing `searched` search once and sample from different
    x_T."""
    import functools

    import torch

    from benchmarks import samplers
    from scoresde.core.sde import VP
    from scoresde.sampling import sample, schedule

    search = functools.partial(schedule.auto_schedule, n_probe=32, n_check=32, reference_nfe=21, max_iter=3)
    monkeypatch.setattr(samplers, "auto_schedule", search)
    monkeypatch.setattr(samplers, "peers", dict)
    monkeypatch.setattr(samplers, "ORACLE", {})
    rows = {(r["nfe"], r["config"]): r for r in samplers.heldout(["d2s100"], 200, [5, 20])}
    assert set(rows) == {(0, "null (exact samples)")} | {(5, c) for c in ("scoresde/default", "scoresde/ipndm",
                                                                           "scoresde/auto", "scoresde/auto-ipndm")} \
        | {(20, c) for c in ("scoresde/default", "scoresde/ipndm", "scoresde/auto")} \
        | {(k, samplers.CONVERGED) for k in (5, 20)}
    assert all(rows[(5, c)]["auto_ts"][0] == 1.0 for c in samplers.AUTO_ROWS)
    conv = samplers.heldout(["d2s100"], 200, [5], only=[samplers.CONVERGED])
    target = samplers.heldout_target("d2s100")
    gen = torch.Generator().manual_seed(1)
    scorer = samplers.Scorer(target, 200, gen)  # the draws heldout makes before x_T
    x = sample(VP(), samplers.MixtureScore(target).continuous(VP()), None, method="ipndm", nfe=101,
               x_T=VP().prior_sample((200, 2), gen, torch.float64), schedule="default")
    assert [r["config"] for r in conv] == [samplers.CONVERGED] and conv[0]["used"] == 101
    assert conv[0]["mmd2"] == rows[(5, samplers.CONVERGED)]["mmd2"] == rows[(20, samplers.CONVERGED)]["mmd2"] \
        == scorer(x)["mmd2"]
    assert conv[0]["mmd2_paired"] == rows[(20, samplers.CONVERGED)]["mmd2_paired"] == 0.0  # its own reference
    alpha_T = VP().alpha(torch.tensor(1.0, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    samplers.Scorer(target, 200, gen)  # the same draws again, then the same x_T, moved by p_T's exact mean
    moved = sample(VP(), samplers.MixtureScore(target).continuous(VP()), None, method="ipndm", nfe=101,
                   x_T=VP().prior_sample((200, 2), gen, torch.float64) + alpha_T * target.weights @ target.means,
                   schedule="default")
    h = torch.tensor(samplers.bandwidths(target)[:3])
    assert math.isclose(conv[0][samplers.EXACT_MEAN], schedule.mmd2_paired(x, moved, h), rel_tol=1e-6)
    assert conv[0][samplers.EXACT_MEAN] > 0
    for c in samplers.AUTO_ROWS:  # the model's estimate of the shift, near the exact alpha_T E[X_0]
        want = float((alpha_T * target.mean()).norm())
        assert math.isclose(rows[(5, c)]["auto_prior_mean_norm"], want, rel_tol=0.02)
    assert rows[(5, "scoresde/default")]["mmd2_paired"] > 0 and all(math.isfinite(r["mmd2_paired"])
                                                                   for r in rows.values() if r["nfe"])
    assert rows[(20, "scoresde/auto")]["mmd2"] == rows[(20, "scoresde/default")]["mmd2"]
    only = samplers.heldout(["d2s100"], 200, [5], only=["scoresde/auto-ipndm"])
    assert [r["config"] for r in only] == ["scoresde/auto-ipndm"] and "auto_evals" in only[0]
    calls, searched = [], {}
    monkeypatch.setattr(samplers, "auto_schedule", lambda *a, **kw: calls.append(kw["method"]) or search(*a, **kw))
    seeds = [samplers.heldout(["d2s100"], 200, [5], seed=s, only=["scoresde/auto"], searched=searched)[0]
             for s in (1, 2)]
    assert calls == ["unipc2"] and seeds[0]["auto_ts"] == seeds[1]["auto_ts"] and seeds[0]["mmd2"] != seeds[1]["mmd2"]


def test_stochastic_versus_pools_each_seed_at_its_largest_n_only():
    """Two runs of one seed share their generator, so `largest_n` keeps one row per (target, NFE, configuration,
    seed): the largest n."""
    from benchmarks import stochastic

    row = lambda seed, n, config="a": {"target": "t", "nfe": 20, "config": config, "seed": seed, "n": n}
    rows = [row(4, 10**6), row(4, 2 * 10**6), row(4, 10**5), row(2, 10**5), row(4, 10**5, "b")]
    assert sorted((r["config"], r["seed"], r["n"]) for r in stochastic.largest_n(rows)) == [
        ("a", 2, 10**5), ("a", 4, 2 * 10**6), ("b", 4, 10**5)]


def test_stochastic_choice_takes_automatic_schedule_rows_only_where_the_library_offers_them():
    """sa3's automatic-schedule knob: a candidate at NFE 20 only in rows of the current search (auto_choice
    recorded; the old search moved knots at every nfe), never at NFE 50 (above AUTO_STOCHASTIC_MAX_NFE)."""
    from benchmarks import stochastic

    def rows(nfe, **extra):
        out = [{"target": t, "config": "null (exact samples)", "nfe": 0, "n": 1000, "mmd2_sd": 1e-3,
                "mmd2_fine_sd": 1e-3} for t in stochastic.CHOICE_TARGETS]
        return out + [{"target": t, "config": f"scoresde/sa3/{k}", "member": "scoresde/sa3", "nfe": nfe, "n": 1000,
                       "mmd2": v, "mmd2_fine": v, **(extra if k == "auto" else {})}
                      for t in stochastic.CHOICE_TARGETS for k, v in (("auto", 0.01), ("tau=0.5", 0.05))]

    pick = lambda rs, nfe: stochastic.choose(rs, [nfe])[str(nfe)]["best"]["scoresde"]
    assert pick(rows(20), 20) == "scoresde/sa3/tau=0.5"
    assert pick(rows(20, auto_choice="family"), 20) == "scoresde/sa3/auto"
    assert pick(rows(50, auto_choice="family"), 50) == "scoresde/sa3/tau=0.5"


def test_stochastic_versus_scores_named_configurations_on_a_fresh_target_and_names_an_unknown_one(tmp_path):
    """versus --quick on the fresh target mix16d: the named configurations' rows (with their standard errors; the
    automatic schedule's with the grid it chose, ending in (0, T)) and the null row, table and figure; a later run
    without --configs re-renders them (before any run it says so); an unknown name is refused."""
    args = ("stochastic", "--quick", "--stage", "versus", "--out", str(tmp_path))
    res = harness(*args)
    assert res.returncode != 0 and "nothing saved yet; run --stage versus with --configs first" in res.stderr
    for config in ("scoresde/sa3/tau=0.5", "scoresde/sa3/auto tau=0.5"):  # the second run keeps the first one's row
        res = harness(*args, "--targets", "mix16d", "--configs", config, "--confirm-nfes", "20")
        assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "stochastic"
    rows = common.read_json(folder / "stochastic_versus.json")["rows"]
    assert sorted((r["target"], r["config"], r["seed"]) for r in rows) == [
        ("mix16d", "null (exact samples)", 2), ("mix16d", "scoresde/sa3/auto tau=0.5", 2),
        ("mix16d", "scoresde/sa3/tau=0.5", 2)]
    assert all("mmd2_se" in r for r in rows if r["nfe"])
    records = [p.name for p in folder.glob("run-versus-*.json")]  # one per run: named by its n, NFEs and seeds
    assert len(records) == 2 and all("-nfe20-seed2-mix16d-" in name for name in records), records
    ts = next(r["auto_ts"] for r in rows if r["config"] == "scoresde/sa3/auto tau=0.5")
    assert ts[0] == 1.0 and 0 < ts[-1] < 0.1 and ts == sorted(ts, reverse=True)
    (folder / "stochastic_versus.md").unlink()
    assert harness(*args).returncode == 0 and "mix16d | 20" in (folder / "stochastic_versus.md").read_text()
    assert (folder / "stochastic_versus.png").exists()
    res = harness(*args, "--configs", "scoresde/sa3/nope")
    assert res.returncode != 0 and "unknown: ['scoresde/sa3/nope']" in res.stderr


def test_samplers_default_path_is_the_heldout_auto_row(small_search, monkeypatch):
    """sample() without options at nfe 5 (first call searching, second cached) draws the samples of the heldout
    part's "scoresde/auto" row from the same x_T; the first call pays the search, the second none (the same small
    search on both paths, for speed)."""
    from benchmarks import samplers
    from scoresde.sampling import schedule

    monkeypatch.setattr(samplers, "auto_schedule", schedule.auto_schedule)  # small_search's
    (row,) = samplers.default_path(["d2s100"], n=200, nfes=[5])
    assert row["equal_to_auto_row"] and row["search_evals"] > row["sample_evals"] == 1000
    assert row["first_seconds"] > row["second_seconds"]


def test_twin_swap_matches_noise_levels_by_alpha_bar_and_converts_eps_to_score():
    """`twin_swap.Matched`: the time of each twin timestep solves log alpha(t)^2 = -(b0 t + (b1 - b0) t^2 / 2) =
    log alphas_cumprod[k] in closed form (T where the twin's last steps are noisier than T), and the fractional
    timestep of that time is k again. `TwinAsScore` turns a network's eps into the score -eps / sigma(t), and
    `ScoreAsUNet` a score model's eps back, at the matched time."""
    import torch
    from diffusers import DDPMScheduler

    from benchmarks.twin_swap import Matched, ScoreAsUNet, TwinAsScore
    from scoresde.core.sde import VP

    sde = VP()
    lab = torch.log(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double())
    m = Matched(sde, lab)
    b0, b1 = sde.beta_min, sde.beta_max
    exact = (-b0 + torch.sqrt(b0 ** 2 - 2 * (b1 - b0) * lab)) / (b1 - b0)
    inside = exact < sde.T
    assert inside[:990].all() and not inside[-1]
    torch.testing.assert_close(m.t_of_k[inside].double(), exact[inside], atol=1e-6, rtol=0)
    assert (m.t_of_k[~inside] == sde.T).all()
    k = torch.arange(0, 990, 7)
    torch.testing.assert_close(m.k_of_t(m.t_of_k[k]), k.float(), atol=1e-3, rtol=0)

    class Eps(torch.nn.Module):  # a fixed eps, in diffusers' calling convention and as a score model's output
        def forward(self, x, k):
            return type("Out", (), {"sample": x * 0 + 0.5})()

        def output(self, x, t, kind):
            assert kind == "eps"
            return x * 0 + t.view(-1, 1, 1, 1)

    x, t = torch.zeros(3, 1, 4, 4), m.t_of_k[torch.tensor([10, 300, 900])]
    torch.testing.assert_close(TwinAsScore(Eps(), m, bf16=False)(x, t), -0.5 / sde.sigma(t).view(-1, 1, 1, 1) + x)
    out = ScoreAsUNet(Eps(), m, (1, 4, 4))(x, torch.tensor([10, 300, 900])).sample
    torch.testing.assert_close(out, t.view(-1, 1, 1, 1) + x)


def test_weightings_lays_config_and_network_args_over_each_weighting(tmp_path):
    """--config-args and --net-args reach the run's Config over the weighting's own keys and the imaging config's."""
    import argparse

    from benchmarks import imaging, weightings

    ap = argparse.ArgumentParser()
    weightings.add_arguments(ap)
    args = ap.parse_args(["--config-args", '{"sigma_data": 1.0, "lr": 1e-3}', "--net-args", '{"zero_init": false}',
                          "--runs", str(tmp_path)])
    cfg = imaging.base_config(args, "x", **weightings.run_spec(args, "min_snr"))
    assert (cfg.sigma_data, cfg.lr, cfg.loss_args, cfg.sde) == (1.0, 1e-3, {"weighting": "min_snr"}, "vp")
    assert cfg.net_args == {"base": 32, "mults": [1, 2, 2], "zero_init": False}
    plain = imaging.base_config(args, "x", **weightings.run_spec(ap.parse_args(["--runs", str(tmp_path)]), "sigma2"))
    assert (plain.sigma_data, plain.lr, plain.net_args) == (0.5, 2e-3, {"base": 32, "mults": [1, 2, 2]})


def test_sampler_label_names_the_method_and_its_options():
    assert common.sampler_label("dpm2m_sde", {}) == "dpm2m_sde"
    assert common.sampler_label("dpm2m_sde", {"grid": "uniform", "power": 2.0}) == "dpm2m_sde grid=uniform power=2.0"


def test_seed_spread_reads_both_result_formats_and_names_an_ambiguous_file(tmp_path):
    from benchmarks import seed_spread

    common.configure(tmp_path, quick=True)
    try:
        rows = [{"model": "a", "sampler": "s", "nfe": 20, "seed": k, "fid_inf": v} for k, v in ((3, 90.0), (4, 94.0))]
        w = common.write_json("x", {"fid_inf_pooled": {"a / s / 20": 91.5}, "rows": rows + [
            {"model": "b", "sampler": "s", "nfe": 20, "seed": 3, "fid_inf": 50.0}]}, file="w.json")
        t = common.write_json("x", {"swap": [
            {"network": "twin", "sampler": "d", "seeds": [3, 4], "fid_inf_pooled": 80.0, "fid_inf": [79.0, 81.0]},
            {"network": "ours", "sampler": "d", "seeds": [3, 4], "fid_inf_pooled": 85.0, "fid_inf": [84.0, 86.0]}]},
            file="t.json")
        assert seed_spread.pooled_fid_inf(str(w)) == ("w", 91.5, {3: 90.0, 4: 94.0})
        assert seed_spread.pooled_fid_inf(f"{t}::ours / d") == ("t", 85.0, {3: 84.0, 4: 86.0})
        for entry, says in [(str(t), "holds 2 pooled FID_inf values (twin / d, ours / d)"),
                            (f"{t}::mine", "has no pooled FID_inf 'mine'"), (str(tmp_path / "no.json"), "no result file")]:
            with pytest.raises(SystemExit, match=re.escape(says)):
                seed_spread.pooled_fid_inf(entry)
    finally:
        common.configure(None, quick=False)


def test_seed_spread_interval_covers_the_true_difference_at_its_level():
    """Monte Carlo: with unequal variances and sizes, Welch's 95% interval of mean(a) - mean(b) covers the true
    difference (+3) in 95% of draws (binomial 4-sigma band over 4000 draws), and the point estimate has its sign."""
    from benchmarks import seed_spread

    rng = np.random.default_rng(0)
    hits, diffs = 0, []
    for _ in range(4000):
        c = seed_spread.welch(list(rng.normal(3.0, 1.0, 5)), list(rng.normal(0.0, 4.0, 4)))
        hits += c["low"] <= 3.0 <= c["high"]
        diffs.append(c["difference"])
    assert abs(hits / 4000 - 0.95) < 4 * (0.95 * 0.05 / 4000) ** 0.5
    assert abs(np.mean(diffs) - 3.0) < 4 * (1 / 5 + 16 / 4) ** 0.5 / 4000 ** 0.5


def test_seed_spread_two_way_fit_recovers_seed_effects_and_the_residual_variance():
    """Tables built as model + seed + noise: without noise the seed effects come back exactly and the residual is
    0; with noise of sd 2 the residual variance is unbiased (Monte Carlo mean of 2000 tables within 4 se of 4)."""
    from benchmarks import seed_spread

    rng = np.random.default_rng(1)
    model, seed = rng.normal(90, 5, (4, 1)), np.array([9.0, -8.0, -5.0, 3.0, 1.0])
    effects, resid = seed_spread.seed_effects(model + seed)
    assert np.allclose(effects, seed - seed.mean()) and resid == pytest.approx(0, abs=1e-9)
    assert seed_spread.seed_effects((model + seed)[:1])[1] is None
    var = np.array([seed_spread.seed_effects(model + seed + rng.normal(0, 2, (4, 5)))[1] ** 2 for _ in range(2000)])
    assert abs(var.mean() - 4) < 4 * var.std() / np.sqrt(len(var))


def test_weightings_keeps_the_twin_weights_of_our_unet(tmp_path):
    """--keep with --twin-backbone scoresde saves the twin's weights (our U-Net's convolutions are channels_last,
    which safetensors refuses unless they are packed) and they load back."""
    from safetensors.torch import load_file

    res = harness("weightings", "--quick", "--twin-backbone", "scoresde", "--keep", "--runs", str(tmp_path / "runs"),
                  "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    saved = load_file(tmp_path / "runs" / "twin_digits_3steps_seed1-2_twin_scoresde_unet.safetensors")
    assert "net.down.0.conv1.weight" in saved and saved["net.down.0.conv1.weight"].dim() == 4


def test_samplers_floor_check_repeats_the_heldout_cells_and_marks_what_is_above_the_floor():
    """floor_check draws what `heldout` draws for a seed (its unipc2 fixed-grid cell is heldout's "scoresde/default"
    row), scores a fresh exact sample beside it, and marks a sampler far from the law (NFE 2) above the floor
    while exact samples stay under it (a small run, for speed)."""
    from benchmarks import samplers

    rows, text = samplers.floor_check(["d2s100"], 300, [2, 20], [1, 2])
    again = samplers.heldout(["d2s100"], 300, [20], seed=2, only=["scoresde/default"])
    mine = [r for r in rows if r["config"] == "scoresde/default" and r["nfe"] == 20 and r["seed"] == 2]
    assert mine[0]["mmd2"] == again[0]["mmd2"]
    assert "- unipc2, NFE 2: at the floor on 0 of 1 targets; above it: d2s100" in text
    assert "- the exact sample: at the floor on 1 of 1 targets; above it: none" in text
    row = [line for line in text.splitlines() if line.startswith("| d2s100 |")][0].strip("|").split("|")
    assert len(row) == 5 and row[3].strip().endswith("*") and math.isfinite(float(row[2]))


def test_samplers_run_tag_fits_a_file_name_for_many_targets_and_configurations():
    """Thirty targets, or every peer configuration, give a tag that, with the log's suffixes, fits the 255 bytes of a
    file name, and two lists of the same first target and length (the rest reordered) give two tags; a short list is
    named in full; NFEs other than the default are named (a run at NFE 10 alone overwrote one at NFE 5 and 10)."""
    import argparse

    from benchmarks import samplers

    def tag(targets, n=samplers.N_HELDOUT, nfes=samplers.NFES):
        return samplers.run_tag(argparse.Namespace(part="heldout", targets=targets, heldout_seed=[1, 2, 3], n_heldout=n,
                                                   nfes=list(nfes), configs=["scoresde/auto", "scoresde/auto-ipndm"]))

    many = samplers.REPORTING[:30]
    assert len(f"run-{tag(many)}.log.4194304.partial") < 255 and tag(many) != tag(many[:1] + many[:0:-1])
    assert tag(["d2s100", "unequal"]) == "heldout-d2s100-unequal-seed1-2-3-only-auto-auto-ipndm"
    assert tag(["d2s100"], 20000) == "heldout-d2s100-n20000-seed1-2-3-only-auto-auto-ipndm"  # apart from n = 4000
    assert tag(["d2s100"], nfes=[5, 10]) == "heldout-d2s100-nfe5-10-seed1-2-3-only-auto-auto-ipndm"
    assert tag(["d2s100"], nfes=[10]) == "heldout-d2s100-nfe10-seed1-2-3-only-auto-auto-ipndm"
    configs = ["scoresde/auto"] + [f"diffusers/{k}" for k in samplers.peers()]
    long = samplers.run_tag(argparse.Namespace(part="heldout", targets=many, heldout_seed=[1, 2, 3],
                                               n_heldout=samplers.N_HELDOUT, nfes=list(samplers.NFES), configs=configs))
    assert len(f"run-{long}.log.4194304.partial") < 255 and f"-only-auto-and-{len(configs) - 1}-more-" in long


def test_search_size_report_sets_each_size_beside_the_closest_peer_and_the_fixed_grid(tmp_path):
    """The seed mean of each size's mmd2_paired_exact over the seed mean of the closest diffusers configuration
    and of the method's fixed grid, both read from the heldout part's files of that target; a figure."""
    from benchmarks import common, samplers, search_size

    common.configure(tmp_path)
    ex = samplers.EXACT_MEAN
    peer = [{"target": "a", "config": c, "nfe": 5, "n": 10, "seed": s, "gap": 0.0, "mmd2": 0.0, "mmd2_fine": 0.0,
             ex: v + (1e-5 if s == 1 else -1e-5)} for s in (1, 2)
            for c, v in (("diffusers/X/default", 4e-4), ("diffusers/Y/trailing", 2e-4), ("scoresde/default", 8e-4),
                         ("scoresde/ipndm", 5e-4), ("scoresde/auto", 1e-4))]
    common.write_json(samplers.NAME, peer, file="samplers_heldout-a.json")
    rows = [{"target": "a", "method": m, "nfe": 5, "draws": d, "seed": s, "n": 10, "gap": 0.0, "evaluations": 100 * d,
             "seconds": 1.0, ex: v * (1.5 if s == 1 else 0.5)} for s in (1, 2)
            for m, d, v in (("unipc2", 16, 1e-4), ("unipc2", 32, 5e-5), ("ipndm", 16, 2.5e-4))]
    text = search_size.report(rows)
    assert "| a | unipc2 | 5 | 16 | 1.60e+03 | 1 | 2 | 1.00e-04 | 0.50 | 0.12 |" in text
    assert "| a | unipc2 | 5 | 32 | 3.20e+03 | 1 | 2 | 5.00e-05 | 0.25 | 0.06 |" in text
    assert "| a | ipndm | 5 | 16 | 1.60e+03 | 1 | 2 | 2.50e-04 | 1.25 | 0.50 |" in text
    assert (tmp_path / search_size.NAME / "search_size.png").exists()
