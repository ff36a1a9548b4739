"""The run-level functions the CLI calls, tested without Typer on the shared tiny run; runs record their data."""
import shutil

import numpy as np
import pytest
import torch

from scoresde.core.errors import DamagedFileError, InvalidValueError
from scoresde.running.data import Dataset, content_hash, load_dataset, read_data_record
from scoresde.running.runs import (
    DataUnavailable,
    evaluate_run,
    fit_run_grid,
    inpaint_run,
    likelihood_run,
    load_run,
    sample_run,
    write_report,
)
from scoresde.running.train import Trainer
from scoresde.sampling import dopri5, sample
from scoresde.sampling.likelihood import evaluate_likelihood


def test_fitted_grid_of_a_run_beats_the_default_on_fresh_draws(tiny_run):
    """runs.fit_run_grid fits on its own probe draws; on 500 other prior draws the fitted grid lands far closer
    to the run's exact probability flow (a tight dopri5 solve, independent of the fit and its fallback) than
    the method's default grid to the same end time, at the same NFE."""
    r = load_run(tiny_run)
    fit = fit_run_grid(r, method="unipc2", nfe=5, n_probe=64, denoise=False)
    t_end = float(fit.ts[-1])
    x_T = r.sde.prior_sample((500, 2), torch.Generator().manual_seed(99))
    exact = dopri5(r.sde, r.model, x_T, t_end=t_end, rtol=1e-6, atol=1e-6, denoise=False)
    err = {name: (sample(r.sde, r.model, None, method="unipc2", nfe=5, x_T=x_T, denoise=False, **kw) - exact)
           .norm(dim=1).mean().item() for name, kw in (("default", {"t_end": t_end}), ("fitted", {"ts": fit.ts}))}
    assert err["fitted"] < err["default"] / 5, err
    with pytest.raises(ValueError, match="n_probe"):
        fit_run_grid(r, method="unipc2", nfe=5, n_probe=0)


def test_run_schedule_is_paid_once_per_checkpoint(tiny_run, tmp_path, small_search, monkeypatch):
    """run_schedule at nfe 5 with unipc2 computes the automatic schedule of the run's model once and keeps it in
    the run folder: a second call (also from a freshly loaded run) reads it (the same grid and prior mean, no new
    search, the same samples through sample_run(**options)); new weights drop it and search again; sample_run
    without options samples on it, with schedule="default" on the fixed grid; where it does not apply it is
    refused, naming why; a schedule stored by another version of the search is searched again."""
    from scoresde.running import runs

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    searches = small_search
    r = load_run(run_dir)
    s, cached = runs.run_schedule(r, method="unipc2", nfe=5)
    assert not cached and len(searches) == 1 and (run_dir / runs.SCHEDULES).is_file()
    s2, cached = runs.run_schedule(load_run(run_dir), method="unipc2", nfe=5)
    assert cached and s2.evaluations == s.evaluations > 0 and len(searches) == 1 and torch.equal(s2.ts, s.ts)
    assert (s2.denoise, s2.analytic_first) == (s.denoise, s.analytic_first)
    assert s.prior_mean.shape == r.sample_shape and torch.equal(s2.prior_mean, s.prior_mean)  # kept in the folder
    x1, _ = sample_run(r, 50, method="unipc2", nfe=5, seed=3, **s2.options)
    want = sample(r.sde, r.model, None, method="unipc2", nfe=5, **s.options,
                  x_T=r.sde.prior_sample((50,) + r.sample_shape, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(x1, want)
    with torch.no_grad():
        next(r.model.parameters()).add_(1e-3)  # a new checkpoint
    s3, _ = runs.run_schedule(r, method="unipc2", nfe=5)
    assert len(searches) == 2
    unasked, _ = sample_run(r, 50, method="unipc2", nfe=5, seed=3)  # the run's schedule, from the folder
    torch.testing.assert_close(unasked, sample_run(r, 50, method="unipc2", nfe=5, seed=3, **s3.options)[0])
    fixed, _ = sample_run(r, 50, method="unipc2", nfe=5, seed=3, schedule="default")
    torch.testing.assert_close(fixed, sample(r.sde, r.model, None, method="unipc2", nfe=5, schedule="default",
                                             x_T=r.sde.prior_sample((50,) + r.sample_shape,
                                                                    torch.Generator().manual_seed(3))))
    assert len(searches) == 2 and not torch.allclose(fixed, unasked)
    with pytest.raises(InvalidValueError, match="does not combine with label"):
        sample_run(r, 4, method="unipc2", nfe=5, label=0, schedule="auto")
    for kw, why in (({"method": "unipc2", "nfe": 5, "t_end": 0.05}, "does not combine with t_end"),
                    ({"method": "dpm2m", "nfe": 5}, "applies to methods ipndm, sa3, unipc2, unipc3"),
                    ({"method": "unipc2", "nfe": 11}, "applies at 2 <= nfe <= 10")):
        with pytest.raises(InvalidValueError, match=why):
            runs.run_schedule(r, **kw)
    assert len(searches) == 2
    monkeypatch.setattr(runs, "SEARCH", runs.SEARCH + 1)  # a library whose search changed: searched again
    assert not runs.run_schedule(r, method="unipc2", nfe=5)[1] and len(searches) == 3


def test_run_schedule_keeps_one_entry_per_search_size(tiny_run, tmp_path, small_search):
    """A search of another size (n_probe) is searched once and kept beside the default's; n_probe=N_PROBE is the
    default's entry; sample_run(search_draws=) samples on the entry of that size; a size below 4 is refused,
    naming it, before any search, and search_draws beside schedule="default" too."""
    from scoresde.running import runs
    from scoresde.sampling.schedule import N_PROBE

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    r = load_run(run_dir)
    for n_probe, cached, searched in ((None, False, 1), (32, False, 2), (32, True, 2), (N_PROBE, True, 2),
                                      (None, True, 2)):
        s, was = runs.run_schedule(r, method="ipndm", nfe=4, n_probe=n_probe)
        assert was == cached and len(small_search) == searched, (n_probe, was, len(small_search))
    assert [k["n_probe"] for k in small_search] == [None, 32]
    s, _ = runs.run_schedule(r, method="ipndm", nfe=4, n_probe=32)
    torch.testing.assert_close(sample_run(r, 20, method="ipndm", nfe=4, seed=1, search_draws=32)[0],
                               sample_run(r, 20, method="ipndm", nfe=4, seed=1, **s.options)[0])
    with pytest.raises(InvalidValueError, match="n_probe must be an integer >= 4, got 3"):
        runs.run_schedule(r, method="ipndm", nfe=4, n_probe=3)
    for kw, why in (({"search_draws": 3}, "search_draws must be an integer >= 4, got 3"),
                    ({"search_draws": 32, "schedule": "default"}, "does not combine with schedule='default'")):
        with pytest.raises(InvalidValueError, match=why):
            sample_run(r, 20, method="ipndm", nfe=4, **kw)
    assert len(small_search) == 2


def test_a_named_few_step_nfe_without_a_method_samples_with_the_few_step_method(tiny_run, tmp_path, small_search):
    """sample_run(nfe=5) without a method, on a run whose sampler (em) has no automatic schedule, draws what
    ipndm on its automatic schedule draws (unipc2 at nfe 8); the run's em where the nfe is not named, above 10, or
    with schedule="default" (run_method)."""
    from scoresde.running import runs

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    r = load_run(run_dir)
    assert r.cfg.sampler == "em"
    for nfe, method in ((5, "ipndm"), (8, "unipc2")):
        assert runs.run_method(r, nfe) == method
        torch.testing.assert_close(sample_run(r, 20, nfe=nfe, seed=1)[0],
                                   sample_run(r, 20, method=method, nfe=nfe, seed=1, schedule="auto")[0])
    for kw in ({"nfe": 5, "schedule": "default"}, {"nfe": 12}, {"nfe": 5, "label": 0}, {"nfe": 5, "t_end": 0.1},
               {"nfe": 1}):
        assert runs.run_method(r, **kw) == "em", kw
    torch.testing.assert_close(sample_run(r, 20, nfe=5, seed=1, schedule="default")[0],
                               sample_run(r, 20, method="em", nfe=5, seed=1)[0])


def test_likelihood_run_checks_the_family_and_the_data(tiny_run):
    """likelihood_run is evaluate_likelihood on the run's held-out points (or another source) with the run's
    model; it refuses data of another shape."""
    r = load_run(tiny_run)
    out = likelihood_run(r, n=8, seed=3)
    want = evaluate_likelihood(r.sde, r.model, r.data.test[:8], generator=torch.Generator().manual_seed(3))
    assert out["nll"] == pytest.approx(want["nll"]) and out["data"] == "moons (held out)" and out["step"] == 30
    with pytest.raises(ValueError, match="shape"):
        likelihood_run(r, data="mixture16", n=8)
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        likelihood_run(r, n=1)


def _api_run(tiny_config, name="api"):
    """A run trained (5 steps) on 3-D points given through the API, and that data."""
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.randn(90, 3, generator=g), torch.randn(20, 3, generator=g), "mine")
    cfg = tiny_config(name=name, steps=5, checkpoint_every=5)
    Trainer(cfg, data=data).run()
    return cfg.run_dir, data


def test_a_run_on_api_data_records_it_and_needs_it_back(tiny_config):
    """config.yaml still says `data: moons`; data.yaml names the data, its shape, sizes and content hash.
    Without the data the run loads and samples in its shape; evaluation and likelihoods refuse, saying how to
    pass the data; passed back it evaluates, and other data is refused with both hashes."""
    run_dir, data = _api_run(tiny_config)
    record = read_data_record(run_dir)
    assert record == {"name": "mine", "source": "api", "shape": [3], "n_train": 90, "n_test": 20, "labels": False,
                      "sha256": content_hash(data)}
    r = load_run(run_dir)
    assert r.sample_shape == (3,) and r.record == record
    x, _ = sample_run(r, 7, nfe=5)
    assert x.shape == (7, 3)
    for call in (lambda: evaluate_run(r, 10), lambda: likelihood_run(r, n=4), lambda: write_report(r)):
        with pytest.raises(DataUnavailable, match=rf"data 'mine' given to the Trainer.*load_run\({str(run_dir)!r}, "
                                                  rf"data=Dataset\(...\)\), whose sha256 must be {record['sha256']}"):
            call()
    assert not (run_dir / "metrics.json").exists()
    back = load_run(run_dir, data=Dataset(data.train.clone(), data.test.clone(), "again"))
    assert evaluate_run(back, 10, nfe=5)["w2_n"] == 10
    other = Dataset(data.train + 1, data.test, "other")
    with pytest.raises(ValueError, match=rf"trained on data 'mine' .*sha256 {record['sha256']}\); this data 'other' "
                                         rf".*sha256 {content_hash(other)}"):
        load_run(run_dir, data=other)


def test_a_run_on_config_data_reloads_and_checks_it(tiny_config, tmp_path):
    """An image folder named in the config is reloaded and checked on load: changed after training, the run
    still samples, while its data (evaluation, inpainting) and resuming refuse with both hashes."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((8, 8), 20 * i, dtype=np.uint8)).save(folder / f"{i:02d}.png")
    cfg = tiny_config(name="folder", data=str(folder), n_test=3, net="unet", net_args={"base": 4, "mults": [1]},
                      steps=2, batch_size=4, checkpoint_every=2, data_workers=0, nfe=3)
    Trainer(cfg).run()
    record = read_data_record(cfg.run_dir)
    assert record["source"] == "config" and record["name"] == "images" and record["shape"] == [1, 8, 8]
    assert torch.equal(load_run(cfg.run_dir).data.test, load_dataset(str(folder), n_test=3, workers=0).test)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "05.png")
    r = load_run(cfg.run_dir)
    assert sample_run(r, 2)[0].shape == (2, 1, 8, 8)
    now = content_hash(load_dataset(str(folder), n_test=3, workers=0))
    for call in (lambda: r.data, lambda: inpaint_run(r, torch.ones(1, 8, 8), 1)):
        with pytest.raises(DataUnavailable, match=rf"trained on data 'images' .*sha256 {record['sha256']}\); this data "
                                                  rf"'images' .*sha256 {now}: not the same data"):
            call()
    with pytest.raises(ValueError, match=rf"sha256 {now}: not the same data.*resume it on the data it was trained on"):
        Trainer(tiny_config(**{**cfg.to_dict(), "steps": 4}))


def test_a_run_folder_without_a_data_record_loads_its_config_data(tiny_run, tmp_path):
    """A run written before runs recorded their data loads as before: its config's data, unchecked."""
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    (old / "data.yaml").unlink()
    r = load_run(old)
    assert r.record is None and r.data_name == "moons"
    assert torch.equal(r.data.test, load_run(tiny_run).data.test)
    (old / "data.yaml").write_text("name: moons\n")  # a damaged record is named, not ignored
    with pytest.raises(DamagedFileError, match=r"data.yaml is not a data record \(lacks source, shape"):
        load_run(old)


def test_none_means_the_runs_sampler_and_nfe_and_n_is_checked(tiny_run):
    r = load_run(tiny_run)
    want, _ = sample_run(r, 5, method=r.cfg.sampler, nfe=r.cfg.nfe, seed=4)
    assert torch.equal(sample_run(r, 5, method=None, nfe=None, seed=4)[0], want)
    out = evaluate_run(r, 20, method=None, nfe=None)
    assert (out["sampler"], out["nfe"]) == (r.cfg.sampler, r.cfg.nfe) == ("em", 21)
    for call in (lambda n: sample_run(r, n), lambda n: evaluate_run(r, n)):
        for n in (0, -3, 2.0):
            with pytest.raises(InvalidValueError, match=rf"n must be an integer >= 1, got {n!r}"):
                call(n)


def test_evaluate_reports_feature_metrics_for_builtin_image_sets(tmp_path, tiny_run):
    """evaluate_run on a digits run (3 training steps: its samples are not digits) adds FID-style with its floor,
    KID +- se and precision / recall on the digits feature network (trained into feature_cache): the samples
    lie far above the floor (other real digits) and KID many standard errors above 0; pixel-space data sets
    without a feature network report none."""
    from scoresde.running.config import Config

    cfg = Config(name="tiny_digits", out=str(tmp_path), data="digits", sde="vp", net="unet",
                 net_args={"base": 8, "mults": [1, 2], "emb_dim": 8}, steps=3, batch_size=16, warmup=1, eval_every=0,
                 checkpoint_every=3, n_eval=100, sampler="dpm2m", nfe=5, progress=False, ema_decay=0.9)
    Trainer(cfg).run()
    m = evaluate_run(load_run(tmp_path / "tiny_digits"), 200, feature_cache=tmp_path / "features")
    assert (tmp_path / "features" / "digits8_classifier.safetensors").is_file() and m["feature_n"] == 200
    assert m["fid_style"] > 10 * m["fid_style_floor"] > 0 and m["kid"] > 5 * m["kid_stderr"], m
    assert m["fid_style_inf"] > 10 * abs(m["fid_style_inf_floor"]), m
    assert m["class_tv"] > m["class_tv_floor"] > 0, m  # 3-step samples are not balanced over the digits
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["feature_net_accuracy"] > 0.9
    assert "fid_style" not in evaluate_run(load_run(tiny_run), 50, feature_cache=tmp_path / "none")  # moons
    with pytest.raises(InvalidValueError, match="n must be at least 20 on digits"):
        evaluate_run(load_run(tmp_path / "tiny_digits"), 10, feature_cache=tmp_path / "features")
    small = load_run(tmp_path / "tiny_digits")  # a default n (2 n_eval = 8) too small for KID: reported without
    small.cfg.n_eval = 4
    assert "fid_style" not in evaluate_run(small, feature_cache=tmp_path / "features")


def test_load_run_leaves_the_thread_count(tiny_run):
    """load_run changes no global state: a Trainer loading a consistency teacher whose config says another
    thread count keeps its own (two threads on one free core once ran the MNIST distillation 7x slower)."""
    assert load_run(tiny_run).cfg.threads == 1
    torch.set_num_threads(3)
    try:
        load_run(tiny_run)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)
