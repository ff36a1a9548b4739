import json
from pathlib import Path

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
                   "steps: 30\nwarmup: 3\nbatch_size: 32\ncheckpoint_every: 10\neval_every: 15\nlog_every: 5\nn_eval: 50\n"
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
    assert res.exit_code == 2 and "method must be a deterministic" in res.output
    res = runner.invoke(app, ["sample", str(run_dir), "--fit-grid", "-1", "--out", str(tmp_path / "g.npy")])
    assert res.exit_code == 2 and "--fit-grid must be >= 0" in res.output


def test_sample_uses_the_automatic_schedule_where_it_applies_unless_told_not_to(run_dir, tmp_path, small_search):
    """Without --schedule, unipc2 at nfe 5 samples on the run's automatic schedule (searched once, kept in
    schedules.json, then read back, also by evaluate); --schedule default and a method or nfe outside its range
    take the fixed grid without a search or an error, as sa3 does above nfe 10 (there --schedule auto asks for it).
    (A small search, for speed.)"""
    import shutil

    from scoresde.running import runs

    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    searches = small_search
    out = str(tmp_path / "s.npy")
    for args, searched, cached in ((["--method", "unipc2", "--nfe", "5"], 1, False),
                                   (["--method", "unipc2", "--nfe", "5"], 1, True),
                                   (["--method", "unipc2", "--nfe", "6", "--schedule", "default"], 1, None),
                                   (["--method", "unipc2", "--nfe", "20"], 1, None),
                                   (["--method", "sa3", "--nfe", "12"], 1, None),  # opt-in above nfe 10
                                   (["--method", "dpm2m", "--nfe", "5"], 1, None),
                                   (["--method", "sa3", "--nfe", "12", "--schedule", "auto"], 2, False)):
        res = runner.invoke(app, ["sample", str(run), *args, "--n", "16", "--out", out])
        assert res.exit_code == 0 and len(searches) == searched, (args, res.output)
        said = [ln for ln in res.output.splitlines() if ln.startswith("automatic schedule")]
        assert (said[0].startswith(f"automatic schedule ({'cached in' if cached else 'searched'}")
                if cached is not None else not said), (args, res.output)
    assert (run / runs.SCHEDULES).is_file()
    res = runner.invoke(app, ["evaluate", str(run), "--method", "unipc2", "--nfe", "5", "--n", "50"])
    assert res.exit_code == 0 and len(searches) == 2 and "automatic schedule (cached in" in res.output, res.output
    assert json.loads((run / "eval.json").read_text())["schedule"] == "auto"
    res = runner.invoke(app, ["evaluate", str(run), "--method", "unipc2", "--nfe", "5", "--n", "50", "--schedule",
                              "default"])
    assert res.exit_code == 0 and json.loads((run / "eval.json").read_text())["schedule"] == "default"


def test_a_few_step_nfe_without_a_method_takes_the_few_step_method_on_its_schedule(run_dir, tmp_path, small_search):
    """`sample RUN --nfe 5` on a run whose sampler (em) has no automatic schedule samples with ipndm on its
    automatic schedule (unipc2 above nfe 5), saying so; the run's sampler stays where --method, an --option,
    --schedule default or an nfe above 10 is given; evaluate does the same. (A small search, for speed.)"""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    searches = small_search
    out = str(tmp_path / "s.npy")
    for args, method in ((["--nfe", "5"], "ipndm"), (["--nfe", "8"], "unipc2"), (["--nfe", "5", "--method", "em"], None),
                         (["--nfe", "5", "--schedule", "default"], None), (["--nfe", "20"], None),
                         (["--nfe", "5", "--option", "noise=brownian"], None)):
        before = len(searches)
        res = runner.invoke(app, ["sample", str(run), *args, "--n", "16", "--out", out])
        assert res.exit_code == 0, (args, res.output)
        said = [ln for ln in res.output.splitlines() if "without --method" in ln]
        if method is None:
            assert not said and len(searches) == before, (args, res.output)
        else:
            assert said == [f"--nfe {args[1]} without --method: the run's sampler em has no automatic schedule; "
                            f"sampling with {method} on its automatic schedule (--method em keeps it)"], res.output
            assert [k["method"] for k in searches[before:]] == [method], (args, res.output)
            assert np.isfinite(np.load(out)).all(), (args, res.output)
    res = runner.invoke(app, ["evaluate", str(run), "--nfe", "5", "--n", "50"])
    assert res.exit_code == 0 and "automatic schedule (cached in" in res.output, res.output
    assert json.loads((run / "eval.json").read_text())["sampler"] == "ipndm"
    assert [k["method"] for k in searches] == ["ipndm", "unipc2"]


def test_sample_schedule_auto_is_asked_for_and_refused_where_it_does_not_apply(run_dir, tmp_path):
    """--schedule auto outside its range (nfe <= 10, sa3 / unipc2 / unipc3) is an error naming why, never ignored;
    an unknown --schedule names the choices; with --fit-grid (another grid) it is refused naming both."""
    out = str(tmp_path / "s.npy")
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "unipc2", "--nfe", "20", "--schedule", "auto",
                              "--out", out])
    assert res.exit_code == 2 and "schedule='auto' applies at 2 <= nfe <= 10 (20 for a stochastic method), got 20" \
        in res.output
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "dpm2m", "--nfe", "5", "--schedule", "auto",
                              "--out", out])
    assert res.exit_code == 2 and "schedule='auto' applies to methods ipndm, sa3, unipc2, unipc3" in res.output
    res = runner.invoke(app, ["sample", str(run_dir), "--nfe", "5", "--schedule", "fast", "--out", out])
    assert res.exit_code == 2 and "--schedule must be one of default, auto; got 'fast'" in res.output
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "unipc2", "--nfe", "5", "--schedule", "auto",
                              "--fit-grid", "64", "--out", out])
    assert res.exit_code == 2 and "--fit-grid and --schedule auto both choose the time grid" in res.output


def test_search_draws_size_the_search_and_are_kept_per_size(run_dir, tmp_path, small_search):
    """--search-draws N searches the automatic schedule on N probe draws (asking for it where --schedule is unset),
    once: sample and evaluate then read it from the run folder; beside --schedule default, --fit-grid or --label,
    below 4, or where the schedule does not apply, it is refused, naming why, before any search."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    out = str(tmp_path / "s.npy")
    for extra, said in ((["--search-draws", "32"], "searched"), (["--search-draws", "32"], "cached in"),
                        (["--search-draws", "32", "--schedule", "auto"], "cached in")):
        res = runner.invoke(app, ["sample", str(run), "--method", "unipc2", "--nfe", "5", "--n", "16", *extra,
                                  "--out", out])
        assert res.exit_code == 0 and f"automatic schedule ({said}" in res.output, (extra, res.output)
    res = runner.invoke(app, ["evaluate", str(run), "--method", "unipc2", "--nfe", "5", "--n", "50",
                              "--search-draws", "32"])
    assert res.exit_code == 0 and "automatic schedule (cached in" in res.output, res.output
    assert json.loads((run / "eval.json").read_text())["search_draws"] == 32
    assert [k["n_probe"] for k in small_search] == [32]
    for extra, why in ((["--schedule", "default"], "--search-draws sizes the automatic schedule's search; it does "
                                                   "not combine with --schedule default"),
                       (["--fit-grid", "64"], "--fit-grid and --search-draws both choose the time grid"),
                       (["--label", "0"], "--search-draws: the automatic schedule is searched for the unconditional"),
                       (["--nfe", "20"], "schedule='auto' applies at 2 <= nfe <= 10"),
                       (["--search-draws", "3"], "--search-draws must be an integer >= 4, got 3")):
        res = runner.invoke(app, ["sample", str(run), "--method", "unipc2", "--nfe", "5", "--search-draws", "32",
                                  *extra, "--out", out])
        assert res.exit_code == 2 and why in res.output, (extra, res.output)
    res = runner.invoke(app, ["evaluate", str(run), "--method", "unipc2", "--nfe", "5", "--search-draws", "0"])
    assert res.exit_code == 2 and "--search-draws must be an integer >= 4" in res.output, res.output
    assert len(small_search) == 1


def test_errors_are_one_line_messages(run_dir, tmp_path):
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "rk45", "--nfe", "10", "--out", str(tmp_path / "a.npy")])
    assert res.exit_code == 2 and "sampling method 'rk45' does not apply to a 'score' model; valid: em," in res.output
    res = runner.invoke(app, ["sample", str(run_dir), "--method", "consistency", "--nfe", "1",
                              "--out", str(tmp_path / "a.npy")])
    assert res.exit_code == 2 and "does not apply to a 'score' model" in res.output
    res = runner.invoke(app, ["sample", str(run_dir), "--out", str(tmp_path / "a.txt")])
    assert res.exit_code == 2 and "--out must end in .npy, .npz, .png" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert res.exit_code == 2 and "is not a run folder" in res.output
    res = runner.invoke(app, ["train", str(run_dir / "config.yaml"), "sde=vpp"])
    assert res.exit_code == 2 and "unknown SDE 'vpp'; valid:" in res.output
    res = runner.invoke(app, ["train", str(run_dir / "config.yaml"), "stepz=3"])
    assert res.exit_code == 2 and "unknown config key 'stepz'; valid:" in res.output


def test_device_option_of_the_commands_that_load_a_run(run_dir, tmp_path):
    """--device cpu is the default here (the run's config device) sample for sample; an unknown device, and CUDA
    where there is none, are one-line errors naming --device; a run configured for CUDA loaded where there is
    none names the way out."""
    import shutil

    import torch

    outs = []
    for extra in ([], ["--device", "cpu"], ["--device", "auto"] * (not torch.cuda.is_available())):
        res = runner.invoke(app, ["sample", str(run_dir), "--method", "em", "--nfe", "7", "--n", "16",
                                  "--out", str(tmp_path / f"d{len(outs)}.npy"), *extra])
        assert res.exit_code == 0, res.output
        outs.append(np.load(tmp_path / f"d{len(outs)}.npy"))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    for command in (["sample", "--out", str(tmp_path / "e.npy")], ["evaluate"], ["likelihood"],
                    ["inpaint", "--mask", str(tmp_path / "m.npy"), "--out", str(tmp_path / "e.png")],
                    ["finetune", "--reward", "linear", "--param", "c=1,0", "--beta", "1", "--out", str(tmp_path / "f")]):
        res = runner.invoke(app, [command[0], str(run_dir), *command[1:], "--device", "tpu"])
        assert res.exit_code == 2 and "--device must be one of cpu, cuda, auto, got 'tpu'" in res.output, res.output
    if torch.cuda.is_available():
        return
    res = runner.invoke(app, ["evaluate", str(run_dir), "--device", "cuda"])
    assert res.exit_code == 2 and "--device cuda: CUDA is not available here; use --device cpu or auto" in res.output
    moved = tmp_path / "trained_on_a_gpu"
    shutil.copytree(run_dir, moved)
    cfg = moved / "config.yaml"
    cfg.write_text(cfg.read_text().replace("device: cpu", "device: cuda"))
    res = runner.invoke(app, ["sample", str(moved), "--n", "8", "--nfe", "7", "--out", str(tmp_path / "g.npy")])
    assert res.exit_code == 2 and "is configured for device 'cuda', which is not available here" in res.output
    assert "--device cpu" in res.output
    res = runner.invoke(app, ["sample", str(moved), "--n", "8", "--nfe", "7", "--out", str(tmp_path / "g.npy"),
                              "--device", "cpu", "--schedule", "default"])
    assert res.exit_code == 0, res.output


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


# ---- issue 18: every bad input is a short, clear error (exit status 2), never a traceback or silence ----

def fails(args, *names, status=2):
    """Run the CLI; assert exit `status`, a message of at most 3 lines naming each of `names`, no traceback."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == status, res.output
    err = res.stderr.strip()
    assert err and len(err.splitlines()) <= 3 and "Traceback" not in res.output, err
    for name in names:
        assert name in err, (name, err)
    return err


def test_sample_refuses_n_nfe_and_guidance_it_would_ignore(tiny_run, tmp_path):
    out = tmp_path / "x.npy"
    for n in (0, -3):
        fails(["sample", tiny_run, "--n", n, "--out", out], "--n must be >= 1", str(n))
    for nfe in (0, -1):
        fails(["sample", tiny_run, "--nfe", nfe, "--out", out], f"--nfe must be >= 1, or omit it for the run's nfe 21, got {nfe}")
    fails(["sample", tiny_run, "--guidance", "2", "--out", out], "--guidance", "--label")
    fails(["sample", tiny_run, "--guidance", "-1", "--label", "0", "--out", out], "--guidance must be >= 0")
    fails(["sample", tiny_run, "--out", tmp_path / "x.txt"], "--out must end in .npy, .npz, .png", "x.txt")
    assert not out.exists()


def test_sample_defaults_to_the_runs_sampler_and_nfe(tiny_run, tmp_path, monkeypatch):
    """Without --method / --nfe the run's config (sampler em, nfe 21) is used, and the plot title says so."""
    import torch

    from scoresde.running import plots
    from scoresde.running.runs import load_run, sample_run

    res = runner.invoke(app, ["sample", str(tiny_run), "--n", "16", "--out", str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    expected, _ = sample_run(load_run(tiny_run), 16, method="em", nfe=21, seed=0)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "x.npy")), expected)
    titles = []
    monkeypatch.setattr(plots, "plot_samples", lambda x, data, out, title="": titles.append(title))
    assert runner.invoke(app, ["sample", str(tiny_run), "--n", "8", "--out", str(tmp_path / "x.png")]).exit_code == 0
    assert runner.invoke(app, ["sample", str(tiny_run), "--n", "8", "--nfe", "11", "--out",
                               str(tmp_path / "y.png")]).exit_code == 0
    assert titles == ["tiny: em, nfe 21", "tiny: em, nfe 11"]


def test_sampler_options_reach_the_sampler_and_bad_ones_are_named(tiny_run, tmp_path):
    """--option KEY=VALUE gives sample and evaluate the method's own options (sa3's tau, Brownian noise, a grid's end
    time): the samples are the library's with those options, and evaluate records them; a grid option keeps the
    automatic schedule out where it would apply unasked, and is refused with --schedule auto; a malformed, unknown,
    repeated or invalid option is a one-line error naming it."""
    import shutil

    import torch

    from scoresde.running.runs import load_run, sample_run

    out = tmp_path / "x.npy"
    for args, options in ((["--method", "sa3", "--nfe", "12", "--option", "tau=0.5", "--option", "noise=brownian"],
                           {"tau": 0.5, "noise": "brownian"}),
                          (["--method", "unipc2", "--nfe", "5", "--option", "t_end=2e-2"], {"t_end": 0.02})):
        res = runner.invoke(app, ["sample", str(tiny_run), *args, "--n", "16", "--out", str(out)])
        assert res.exit_code == 0 and "automatic schedule" not in res.output, res.output
        method, nfe = args[1], int(args[3])
        expected, _ = sample_run(load_run(tiny_run), 16, method=method, nfe=nfe, seed=0, **options)
        plain, _ = sample_run(load_run(tiny_run), 16, method=method, nfe=nfe, seed=0, schedule="default")
        torch.testing.assert_close(torch.from_numpy(np.load(out)), expected)
        assert not torch.allclose(expected, plain)  # the option changed the samples
    run = tmp_path / "copy"  # evaluate writes RUN/eval.json
    shutil.copytree(tiny_run, run)
    res = runner.invoke(app, ["evaluate", str(run), "--method", "sa3", "--nfe", "12", "--n", "50", "--option",
                              "tau=0.25"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "eval.json").read_text())["options"] == {"tau": 0.25}
    fails(["sample", tiny_run, "--method", "sa3", "--nfe", "12", "--option", "tau", "--out", out],
          "--option must be KEY=VALUE (e.g. tau=0.5), got 'tau'")
    fails(["sample", tiny_run, "--method", "sa3", "--nfe", "12", "--option", "taux=1", "--out", out],
          "method 'sa3' takes no option 'taux'", "tau")
    fails(["sample", tiny_run, "--method", "sa3", "--nfe", "12", "--option", "tau=-1", "--out", out],
          "tau must be a finite number >= 0, got -1")
    fails(["sample", tiny_run, "--option", "tau=1", "--option", "tau=2", "--out", out], "--option tau is given twice")
    fails(["sample", tiny_run, "--option", "ts=1", "--out", out], "--option ts is not a command-line option")
    fails(["sample", tiny_run, "--option", "denoise=maybe", "--out", out], "denoise must be true or false, got 'maybe'")
    fails(["sample", tiny_run, "--method", "unipc2", "--nfe", "5", "--schedule", "auto", "--label", "1", "--out", out],
          "--schedule auto: the automatic schedule is searched for the unconditional model; it does not combine with "
          "--label")
    for key in ("schedule", "x_T", "generator", "callback", "check_finite", "shape", "paths", "label", "seed", "n",
                "method", "nfe", "guidance"):
        fails(["sample", tiny_run, "--option", f"{key}=1", "--out", out], f"--option {key} is not an --option")
    fails(["evaluate", tiny_run, "--option", "feature_cache=elsewhere"], "--option feature_cache is not an --option")
    fails(["sample", tiny_run, "--option", "tau=[1, 2]", "--out", out], "--option tau: give a number")
    fails(["sample", tiny_run, "--option", "tau=[1,", "--out", out], "--option tau is not valid YAML")
    fails(["evaluate", tiny_run, "--method", "unipc2", "--nfe", "5", "--schedule", "auto", "--option", "t_end=0.1"],
          "schedule='auto' does not combine with t_end")


def test_evaluate_and_inpaint_refuse_bad_n_and_nfe_before_computing(tiny_run, monkeypatch):
    from scoresde.running import runs

    monkeypatch.setattr(runs, "evaluate_run", lambda *a, **k: pytest.fail("evaluated a refused input"))
    fails(["evaluate", tiny_run, "--nfe", "0"], "--nfe must be >= 1, or omit it for the run's nfe 21")
    fails(["evaluate", tiny_run, "--n", "0"], "--n must be >= 1")
    fails(["inpaint", tiny_run, "--mask", "m.npy", "--out", "o.npy", "--nfe", "-2"], "--nfe must be >= 1")
    fails(["inpaint", tiny_run, "--mask", "m.npy", "--out", "o.npy", "--cg-iters", "0"],
          "--cg-iters must be >= 1, or omit it for the default 5")
    fails(["inpaint", tiny_run, "--mask", "m.npy", "--out", "o.npy", "--weight", "0"], "--weight must be a finite number > 0")
    fails(["inpaint", tiny_run, "--mask", "m.npy", "--out", "o.npy", "--how", "replace", "--weight", "4"],
          "--weight applies to --how tweedie and smc only")
    fails(["inpaint", tiny_run, "--mask", "m.npy", "--out", "o.npy", "--particles", "4"],
          "--particles applies to --how smc only")
    fails(["inpaint", tiny_run, "--mask", "m.npy", "--out", "o.npy", "--how", "smc", "--particles", "0"],
          "--particles must be >= 1, or omit it for the default 8")
    # issue 18: --n 100000 allocated 74.5 GiB and died; an impossible n is refused before sampling
    err = fails(["evaluate", tiny_run, "--n", "1000000000"], "n=1000000000", "GiB", "largest n that fits is")
    assert "mmd2" in err


def test_train_warns_of_warmup_beyond_steps_and_resumes_with_more_steps(tiny_run, tmp_path):
    import shutil

    from scoresde.running.config import load_config, save_config

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    save_config(load_config(run / "config.yaml", [f"out={tmp_path}"]), run / "config.yaml")  # the copy's folder
    res = runner.invoke(app, ["train", str(run / "config.yaml"), "warmup=50", "steps=3", f"out={tmp_path}",
                              "name=other"])
    assert res.exit_code == 0, res.output
    warned = [ln for ln in res.output.splitlines() if "config warmup (50)" in ln]  # one line, no file:line
    assert len(warned) == 1 and warned[0].startswith("warning: config warmup (50) is longer than steps (3)")
    assert "warnings.warn(" not in res.output and "UserWarning" not in res.output
    res = runner.invoke(app, ["train", str(run / "config.yaml"), f"out={tmp_path}", "steps=32"])
    assert res.exit_code == 0, res.output
    from scoresde.running.checkpoint import read_checkpoint

    assert int(read_checkpoint(run / "checkpoint.safetensors")[1]["step"]) == 32


def test_config_files_read_yaml_1_2_floats_and_name_the_line_of_bad_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 2e-3\nsteps: 3\nwarmup: 1\n")
    from scoresde.running.config import load_config

    assert load_config(cfg, ["weight_decay=1E-5", "sigma_data=.5"]).lr == float("2e-3")
    cfg.write_text("lr: 0.001\nnet_args: {hidden: 16\nsteps: 3\n")
    fails(["train", cfg], str(cfg), "line 3")
    fails(["train", tmp_path / "missing.yaml"], "missing.yaml", "does not exist")


def test_finetune_reward_names_and_beta(tiny_run):
    from scoresde.models.rewards import REWARDS

    names = REWARDS.names()
    fails(["finetune", tiny_run, "--reward", "linear", "--param", "c=1,0", "--beta", "0"],
          "beta must be > 0 (the KL weight), got 0.0")
    err = fails(["finetune", tiny_run, "--reward", "bogus", "--beta", "1"], "unknown reward 'bogus'")
    assert err.split("valid: ")[1].split(", ") == names
    help_text = " ".join(runner.invoke(app, ["finetune", "--help"]).output.replace("│", " ").split())
    assert f"one of {', '.join(names)}" in help_text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "finetune" in ln and "rewards:" in ln)
    assert line.split("rewards: ")[1].split(" (")[0].split(", ") == names


def test_finetune_methods(tiny_run, tmp_path):
    """`--method` runs each of the six methods into a loadable run folder (the checkpoint names the method), with
    the method's other options from --option; bad combinations fail with one line naming the option."""
    from scoresde.running.checkpoint import read_checkpoint

    base = ["finetune", tiny_run, "--reward", "linear", "--param", "c=0,1", "--steps", "2", "--batch-size", "8",
            "--n-time-steps", "4", "--n", "20"]
    for method, extra in (("adjoint", ["--beta", "1"]), ("dpok", ["--beta", "1"]), ("draft", ["--k", "2"]),
                          ("ddpo", []), ("pg", ["--beta", "1", "--baseline", "mean"]),
                          ("ce", ["--beta", "1", "--option", "fit_steps=2", "--option", "pool=1"])):
        out = tmp_path / method
        res = runner.invoke(app, [str(a) for a in base + ["--method", method, "--out", out] + extra])
        assert res.exit_code == 0, res.output
        assert "mean reward" in res.output and (out / "finetune_curves.png").is_file()
        assert json.loads(read_checkpoint(out / "checkpoint.safetensors")[1]["extra"])["method"] == method
    fails(base + ["--method", "adjoint"], "method 'adjoint' needs --beta")
    fails(base + ["--method", "ddpo", "--beta", "1"], "method 'ddpo' has no KL term")
    fails(base + ["--method", "dpok", "--beta", "1", "--k", "2"], "--k", "'draft'")
    fails(base + ["--method", "adjoint", "--beta", "1", "--baseline", "mean"], "--baseline is for method 'pg'")
    fails(base + ["--method", "draft", "--k", "9"], "k must be <= n_time_steps = 4")
    fails(base + ["--method", "sgd", "--beta", "1"], "method must be one of pg, ce, adjoint, dpok, draft, ddpo")
    fails(base + ["--method", "pg", "--beta", "1", "--option", "fit_steps=2"], "'fit_steps' is not an option of method "
          "'pg'", "updates_per_batch")
    fails(base + ["--method", "ce", "--beta", "1", "--option", "steps=3"], "--option steps is not an --option")
    fails(base + ["--method", "ce", "--beta", "1", "--option", "fit_steps=0"], "fit_steps must be")
    err = fails(base + ["--method", "ce", "--beta", "1", "--option", "ts=1"], "'ts' is not an option of method 'ce'")
    assert "--fit-grid" not in err  # the samplers' grid message is not finetune's


def test_outputs_are_checked_before_computing(tiny_run, tmp_path, monkeypatch):
    """An unwritable --out / RUN/eval.json / export OUT fails at once, naming the path (os.access patched:
    root ignores chmod); nothing is computed."""
    import os
    import shutil

    from scoresde.running import files, runs

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    locked = {tmp_path / "locked", run}
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: not (mode & os.W_OK and Path(p) in locked) and real_access(p, mode))
    for name in ("sample_run", "evaluate_run", "likelihood_run"):
        monkeypatch.setattr(runs, name, lambda *a, **k: pytest.fail("computed into an unwritable output"))
    fails(["sample", tiny_run, "--out", tmp_path / "locked" / "x.npy"], str(tmp_path / "locked" / "x.npy"), "not writable")
    fails(["export", tiny_run, tmp_path / "locked" / "model"], str(tmp_path / "locked" / "model"), "not writable")
    fails(["evaluate", run], str(run / "eval.json"), "not writable")
    fails(["likelihood", run], str(run / "likelihood.json"), "not writable")


def test_a_score_returning_nan_is_an_error_naming_method_and_nfe(tiny_run, tmp_path, monkeypatch):
    """The run's network is swapped for one returning NaN: sample, a .png and evaluate fail with one line
    (the samples are not finite; method, nfe and the hint), and write nothing."""
    import torch

    from scoresde.running import runs

    run = runs.load_run(tiny_run)
    run.model = torch.nn.Sequential()  # no parameters, no output checks: stands in for any network
    run.model.forward = lambda x, t: torch.full_like(x, float("nan"))
    monkeypatch.setattr(runs, "load_run", lambda *a, **k: run)
    for out in ("x.npy", "x.png"):
        fails(["sample", tiny_run, "--n", "8", "--nfe", "11", "--out", tmp_path / out],
              "method 'em' at nfe=11 are not finite (8 of 8", "the score returned NaN/inf, or the step is unstable")
    fails(["sample", tiny_run, "--n", "8", "--method", "heun", "--out", tmp_path / "x.npy"], "method 'heun' at nfe=21")
    fails(["evaluate", tiny_run, "--n", "8"], "not finite")
    assert list(tmp_path.iterdir()) == []


def test_inpaint_passes_its_tweedie_options_on(tiny_run, tmp_path, monkeypatch):
    """--weight, --cg-iters, --particles and --option reach the inpainting (none is silently dropped); omitted, the
    library defaults hold; an --option the command sets itself is a one-line error."""
    import torch

    from scoresde.running import runs

    seen = []

    def fake(run, mask, n, **kw):
        seen.append(kw)
        return torch.zeros(n, 2), torch.ones(2), torch.zeros(n, 2)

    monkeypatch.setattr(runs, "inpaint_run", fake)
    for extra in (["--weight", "4", "--cg-iters", "2"], [], ["--how", "smc", "--particles", "3", "--weight", "2"],
                  ["--how", "smc", "--option", "sigma_y=0.1"], ["--method", "ddim", "--option", "eta=0.5"]):
        res = runner.invoke(app, ["inpaint", str(tiny_run), "--mask", "m.npy", "--out", str(tmp_path / "o.npy"), *extra])
        assert res.exit_code == 0, res.output
    assert seen[0]["weight"] == 4.0 and seen[0]["cg_iters"] == 2 and "particles" not in seen[0]
    assert seen[1]["weight"] == 1.0 and "cg_iters" not in seen[1] and seen[1]["how"] == "tweedie"
    assert seen[2] == {**seen[1], "how": "smc", "particles": 3, "weight": 2.0}
    assert seen[3] == {**seen[1], "how": "smc", "sigma_y": 0.1} and seen[4] == {**seen[1], "method": "ddim", "eta": 0.5}
    for key in ("particles", "weight", "sampler", "known", "x_T"):
        fails(["inpaint", tiny_run, "--mask", "m.npy", "--out", tmp_path / "o.npy", "--option", f"{key}=1"],
              f"--option {key} is not an --option")
