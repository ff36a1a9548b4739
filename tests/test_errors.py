"""Issue 18: the CLI's error boundary, the atomic writers, and the errors the API raises instead of
silently returning NaN or exhausting memory."""
import errno
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scoresde.cli import app
from scoresde.core.errors import (
    InvalidValueError,
    NonFiniteError,
    OutputError,
    ScoresdeError,
)
from scoresde.running import files, runs

runner = CliRunner()


def _raising(err: BaseException):
    def load_run(*args, **kwargs):
        raise err

    return load_run


def _invoke(monkeypatch, err, *debug):
    monkeypatch.setattr(runs, "load_run", _raising(err))
    return runner.invoke(app, [*debug, "sample", "RUN", "--n", "5", "--out", "x.npy"])


@pytest.mark.parametrize("err, status, words", [
    (InvalidValueError("method must be one of em, ei; got 'rk45'"), 2, ["error: method must be one of em, ei"]),
    (OSError(errno.ENOSPC, "No space left on device", "/data/x.npy"), 2, ["disk full", "/data/x.npy"]),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/x.npy"), 2, ["/ro/x.npy", "not writable"]),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x.npy"), 2, ["/ro/x.npy", "not writable"]),
    (MemoryError(), 2, ["out of memory for n=5", "lower --n"]),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 74.50 GiB\nmore"), 2,
     ["out of memory for n=5", "74.50 GiB"]),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 40000000000000 bytes."), 2,
     ["out of memory for n=5; lower --n", "(can't allocate memory: you tried to allocate 40000000000000 bytes.)"]),
    (KeyboardInterrupt(), 130, ["interrupted"]),
    (ZeroDivisionError("float division by zero"), 1,
     ["internal error: ZeroDivisionError: float division by zero (rerun with --debug for the traceback)"]),
])
def test_the_boundary_prints_one_line_and_the_exit_status(monkeypatch, err, status, words):
    res = _invoke(monkeypatch, err)
    assert res.exit_code == status, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output
    for word in words:
        assert word in lines[0], lines[0]


def test_a_stopped_run_is_an_expected_error(monkeypatch):
    from scoresde.running.train import NonFiniteLoss

    assert issubclass(NonFiniteLoss, ScoresdeError)
    res = _invoke(monkeypatch, NonFiniteLoss("loss is nan at step 7"))
    assert res.exit_code == 2 and res.stderr.strip() == "error: loss is nan at step 7"


@pytest.mark.parametrize("signum, status", [(2, 130), (15, 143)])
def test_a_training_run_stopped_by_a_signal_exits_128_plus_the_signal(monkeypatch, signum, status):
    from scoresde.running.train import TrainingInterrupted

    res = _invoke(monkeypatch, TrainingInterrupted(signum, 7, "run/checkpoint.safetensors"))
    assert res.exit_code == status
    assert res.stderr.strip().startswith("interrupted: stopped by SIG") and "at step 7" in res.stderr


def test_debug_reraises_with_the_traceback(monkeypatch):
    err = ZeroDivisionError("bug")
    res = _invoke(monkeypatch, err, "--debug")
    assert res.exception is err
    assert res.exit_code == 1 and "internal error" not in res.output


def test_python_m_scoresde_cli_exits_2_without_a_traceback_and_debug_shows_it(tmp_path):
    cmd = [sys.executable, "-m", "scoresde.cli", "sample", str(tmp_path), "--out", str(tmp_path / "x.npy")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [(f"error: {str(tmp_path)!r} is not a run folder (needs config.yaml and "
                                                "checkpoint.safetensors)")]
    res = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("scoresde.core.errors.InvalidValueError: ")


# ---- atomic writers ----

def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writers_round_trip(tmp_path):
    x = torch.randn(5, 2, dtype=torch.float64)
    np.testing.assert_array_equal(np.load(files.save_array(tmp_path / "a.npy", x)), x.numpy())
    np.testing.assert_array_equal(np.load(files.save_array(tmp_path / "a.npz", x.numpy()))["arr_0"], x.numpy())
    assert files.save_json(tmp_path / "m.json", {"w2": 0.5}).read_text() == '{\n  "w2": 0.5\n}\n'
    assert files.save_text(tmp_path / "sub" / "t.txt", "hi").read_text() == "hi"
    with pytest.raises(InvalidValueError, match=r"must end in \.npy, \.npz, got '.*a\.txt'"):
        files.save_array(tmp_path / "a.txt", x)
    assert _only(tmp_path) == ["a.npy", "a.npz", "m.json", "sub"]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full writing"), (errno.EROFS, "is not writable"),
                                         (errno.EACCES, "is not writable")])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch, code, words):
    from scoresde.running.plots import plot_samples

    target = tmp_path / "out.json"
    files.save_json(target, {"old": 1})
    (tmp_path / "loss.png").write_bytes(b"old png")

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", fail)  # the write reaches the disk at fsync: a full disk fails there
    for write, path in ((lambda: files.save_json(target, {"new": 2}), target),
                        (lambda: files.save_array(tmp_path / "out.json.npy", np.zeros(3)), tmp_path / "out.json.npy"),
                        (lambda: plot_samples(torch.randn(9, 2), torch.randn(9, 2), tmp_path / "loss.png"), tmp_path / "loss.png")):
        with pytest.raises(OutputError) as info:
            write()
        assert isinstance(info.value, OSError) and info.value.errno == code
        assert words in str(info.value) and str(path) in str(info.value)
    assert target.read_text() == '{\n  "old": 1\n}\n' and (tmp_path / "loss.png").read_bytes() == b"old png"
    assert _only(tmp_path) == ["loss.png", "out.json"]


def test_check_writable(tmp_path, monkeypatch):
    deep = tmp_path / "a" / "b" / "x.npy"
    assert files.check_writable(deep, suffixes=(".npy",)) == deep
    assert _only(tmp_path) == []  # nothing created
    with pytest.raises(InvalidValueError, match=r"--out must end in \.npy, \.png, got '.*x\.txt'"):
        files.check_writable(tmp_path / "x.txt", suffixes=(".npy", ".png"), name="--out")
    with pytest.raises(OutputError, match="is a folder"):
        files.check_writable(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a folder"):
        files.check_writable(tmp_path / "file" / "x.npy")
    real_access = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    with pytest.raises(OutputError, match=f"'{deep}' is not writable"):
        files.check_writable(deep)
    monkeypatch.setattr(files.os, "access", real_access)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.tempfile, "mkstemp", full)
    with pytest.raises(OutputError, match="disk full"):
        files.check_writable(tmp_path / "y.npy")
    assert _only(tmp_path) == ["file"]


# ---- the API: non-finite samples and data, empty shapes ----

def test_sample_refuses_no_samples_and_non_finite_output():
    from scoresde.core.sde import VP
    from scoresde.running.build import draw_samples
    from scoresde.sampling import sample

    sde, score = VP(), (lambda x, t: -x)
    for shape in ((0, 2), (), (4, 0)):
        with pytest.raises(InvalidValueError, match=r"shape must be \(n, \.\.\.\) with n >= 1"):
            sample(sde, score, shape, method="em", nfe=5)
    with pytest.raises(InvalidValueError, match="x_T's shape"):
        sample(sde, score, None, method="em", nfe=5, x_T=torch.zeros(0, 2))
    nan_score = lambda x, t: x * math.nan
    for method, nfe in (("em", 5), ("unipc2", 5), ("heun", 5)):
        with pytest.raises(NonFiniteError, match=f"method '{method}' at nfe={nfe} are not finite \\(4 of 4 hold NaN/inf\\)"
                                                 ": the score returned NaN/inf, or the step is unstable"):
            sample(sde, nan_score, (4, 2), method=method, nfe=nfe)
    with pytest.raises(NonFiniteError, match="not finite"):  # with trajectories (paths) too
        draw_samples(sde, nan_score, (4, 2), "em", 5, paths=2)
    x = sample(sde, nan_score, (4, 2), method="em", nfe=5, check_finite=False)
    assert x.isnan().all()


def test_losses_name_non_finite_data():
    from scoresde.core.sde import VP
    from scoresde.learning.losses import denoising_score_matching

    x0 = torch.zeros(8, 2)
    x0[3, 1] = math.inf
    with pytest.raises(InvalidValueError, match="x0 must be finite"):
        denoising_score_matching(lambda x, t: -x, VP(), x0)


# ---- memory: refuse what cannot fit, with the largest n that does ----

def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("target", ["mixture", "samples"])
def test_mmd2_memory_guard_against_the_measured_peak(monkeypatch, target):
    """The guard's estimate is checked against tracemalloc's measured peak (numpy allocations): the largest
    n it allows fits the memory it was told is available, and n + 1 would not."""
    from scoresde.core.targets import ring
    from scoresde.evaluation import metrics

    gen = np.random.default_rng(0)
    y = ring() if target == "mixture" else gen.standard_normal((300, 2))
    avail = 12_000_000
    monkeypatch.setattr(metrics, "available_memory", lambda: avail)
    with pytest.raises(InvalidValueError, match=r"mmd2 of n=5000 points needs about \d+\.\d GiB of memory, 11\.4 MiB "
                                                r"is available: the largest n that fits is \d+") as info:
        metrics.mmd2(gen.standard_normal((5000, 2)), y)
    largest = int(str(info.value).rsplit(" ", 1)[1])
    assert 50 < largest < 5000
    monkeypatch.setattr(metrics, "available_memory", lambda: None)  # unknown: no check
    assert _peak(lambda: metrics.mmd2(gen.standard_normal((largest, 2)), y)) <= avail
    assert _peak(lambda: metrics.mmd2(gen.standard_normal((largest + 2, 2)), y)) > avail


def test_w2_memory_guard(monkeypatch):
    from scoresde.evaluation import metrics

    monkeypatch.setattr(metrics, "available_memory", lambda: 48 * 100 * 50)
    x = torch.randn(200, 2)
    with pytest.raises(InvalidValueError, match="w2 against m=50 points of n=200 points needs about .* the largest n "
                                                "that fits is 100"):
        metrics.w2(x, x[:50])
    assert metrics.w2(x[:100], x[:50]) > 0


def test_available_memory_reads_the_system():
    from scoresde.evaluation.metrics import available_memory

    avail = available_memory()
    assert avail is None or 0 < avail < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
