"""Fault-injection machinery shared by the tests in tests/faults/ and `benchmarks/reliability.py`.

A fault is a string: `write:N`, `kill-step:S`, `term-step:S` are injected from inside the training process
(`driver.py`); `time:X` (SIGKILL) and `term-time:X` (SIGTERM) are sent from outside X seconds after the run
printed its first line (its model is built; training starts). `run_chain` runs a training run in a child
process under a list of faults, restarting it after each, until it finishes; `differences` compares its final
checkpoint with an uninterrupted run's, tensor for tensor with torch.equal. `failing_writes` makes every write
under one folder fail as on a full disk or an unwritable folder, inside this process. `sigterm_at_step`,
`disk_fault_training` and `disk_fault_sample` run one scenario each and return what a test asserts on (and the
benchmark tabulates); `cli_outcome` and `api_outcome` classify how a command or a library call ended.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver.py"
REPO = HERE.parents[1]

# a tiny run on two moons: 2.4 ms a step on one CPU thread, a checkpoint every 7 steps, every step logged
RUN = {"data": "moons", "n_train": 500, "n_test": 100, "net_args": {"hidden": 16, "depth": 1, "emb_dim": 8},
       "steps": 300, "batch_size": 32, "lr": 3e-3, "warmup": 3, "checkpoint_every": 7, "log_every": 1, "eval_every": 0,
       "n_eval": 50, "nfe": 21, "progress": False, "threads": 1}
# checkpoint tensors and metadata that make up the training state (the metadata's `extra` and a checksum
# describe the file, not the state)
STATE_META = ("step", "ema", "optim", "scaler")


def write_config(folder: str | os.PathLike, name: str = "faults", **overrides) -> Path:
    """RUN (+ overrides) as folder/name.yaml; the run is named after the file (its folder: out/name)."""
    path = Path(folder) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**RUN, **overrides}, sort_keys=False))
    return path


def child_env(fault: str = "", **extra: str) -> dict[str, str]:
    """The environment of a training child: one thread, this checkout's sources, `fault` (and `extra`) set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORESDE_FAULT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), **extra)
    if fault:
        env["SCORESDE_FAULT"] = fault
    return env


@dataclass
class Attempt:
    """One launch of the training child: the fault it was given, its exit status and output."""

    fault: str
    returncode: int
    output: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def run_attempt(config: Path, out: Path, fault: str = "", timeout: float = 300) -> Attempt:
    """Run the driver once (resuming from out/<name>'s checkpoint) under `fault`."""
    kind, _, value = fault.partition(":")
    inside = kind in ("write", "kill-step", "term-step")
    cmd = [sys.executable, str(DRIVER), str(config), f"out={out}"]
    proc = subprocess.Popen(cmd, env=child_env(fault if inside else ""), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        if kind in ("time", "term-time"):
            for line in proc.stdout:  # the first line: the model is built, training starts
                lines.append(line)
                if line.startswith("run "):
                    time.sleep(float(value))
                    proc.send_signal(signal.SIGKILL if kind == "time" else signal.SIGTERM)
                    break
        rest, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Attempt(fault, proc.returncode, "".join(lines) + (rest or ""))


def run_chain(config: Path, out: Path, faults: list[str], max_clean: int = 2) -> list[Attempt]:
    """Run under each fault in turn (a restarted run resumes), then without one until it exits with 0.
    Stops early when a faulted attempt finishes the run (its remaining faults are not injected)."""
    attempts = []
    for fault in faults:
        attempts.append(run_attempt(config, out, fault))
        if attempts[-1].returncode == 0:
            return attempts
    for _ in range(max_clean):
        attempts.append(run_attempt(config, out))
        if attempts[-1].returncode == 0:
            break
    return attempts


def campaign(config: Path, root: Path, faults: list[str], max_runs: int = 10) -> list[tuple[Path, list[Attempt]]]:
    """Inject every fault into runs of `config` (folders root/run<i>): a chain per run; when a run finishes
    before its faults are spent, the rest (from the one that did not land) go to a fresh run. Returns each
    run's folder and attempts."""
    runs, remaining = [], list(faults)
    while remaining and len(runs) < max_runs:
        out = root / f"run{len(runs)}"
        attempts = run_chain(config, out, remaining)
        faulted = [a for a in attempts if a.fault]
        landed = len(faulted) - (faulted[-1].returncode == 0)
        remaining = remaining[landed:]
        runs.append((out / config.stem, attempts))
    return runs


def run_torchrun(config: Path, out: Path, fault: str = "", rank: int = 1, restarts: int = 1,
                 timeout: float = 500) -> Attempt:
    """The run as a 2-process torchrun job (gloo on CPU) with --max-restarts `restarts`; `fault` is injected
    in process `rank` on the first attempt only (marker file out/fault-injected)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
           str(restarts), str(DRIVER), str(config), f"out={out}"]
    # the workers' own TCP store: torchrun's shared one can hand a restarted rank its dead peer's address
    # (pytorch/pytorch#135712)
    env = child_env(fault, SCORESDE_FAULT_RANK=str(rank), SCORESDE_FAULT_ONCE=str(out / "fault-injected"),
                    TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    return Attempt(fault, res.returncode, res.stdout + res.stderr)


def draw_faults(rng: random.Random, n: int, window: float = 0.4, writer_events: int = 16) -> list[str]:
    """n faults: alternately a SIGKILL inside the checkpoint writer (event 1..writer_events) and one from
    outside at a uniform time in [0, window] seconds of training."""
    return [f"write:{rng.randint(1, writer_events)}" if i % 2 == 0 else f"time:{rng.uniform(0, window):.3f}"
            for i in range(n)]


def train_here(config: Path, out: Path, resume: bool = False) -> Path:
    """Train the run of `config` in this process (resume=False: from scratch, uninterrupted; True: from
    its checkpoint, as `scoresde train` does); returns its folder."""
    import torch

    from scoresde.running.config import load_config
    from scoresde.running.train import Trainer

    threads = torch.get_num_threads()
    try:
        trainer = Trainer(load_config(config, [f"out={out}"]), resume=resume).run()
    finally:
        torch.set_num_threads(threads)
    return trainer.run_dir


def training_state(run_dir: Path) -> tuple[dict, dict]:
    """Tensors (weights, EMA, optimiser, generator states) and the state metadata of the run's checkpoint."""
    from scoresde.running.checkpoint import CHECKPOINT, read_checkpoint

    tensors, meta = read_checkpoint(Path(run_dir) / CHECKPOINT)
    return tensors, {k: meta.get(k) for k in STATE_META}


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the run's metrics.jsonl (training records only)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def differences(run_dir: Path, reference_dir: Path) -> list[str]:
    """What differs between two runs' final states: checkpoint tensors (torch.equal, bit for bit), state
    metadata, and the loss logged at each step; empty when they are identical."""
    import torch

    (a, meta_a), (b, meta_b) = training_state(run_dir), training_state(reference_dir)
    diff = sorted(set(a) ^ set(b))
    diff += sorted(k for k in set(a) & set(b) if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])))
    diff += [f"meta:{k}" for k in STATE_META if meta_a[k] != meta_b[k]]
    if logged_losses(run_dir) != logged_losses(reference_dir):
        diff.append("metrics.jsonl losses")
    return diff


# ---- scenarios (a test asserts on what they return; benchmarks/reliability.py tabulates it) --------------------

def sigterm_at_step(config: Path, out: Path, step: int, reference: Path) -> dict:
    """SIGTERM while step `step` is computed, then resume in this process: the stop's exit status and output,
    whether its message is clear, the step its checkpoint holds, and how the resumed run differs from
    `reference` ([]: bit-identical)."""
    stopped = run_attempt(config, out, f"term-step:{step}")
    saved = int(training_state(out / config.stem)[1]["step"])
    return {"returncode": stopped.returncode, "output": stopped.output, "saved_step": saved,
            "clear": stopped.returncode > 0 and cli_outcome(stopped.returncode, stopped.output) == "clear error"
            and f"step {step}" in stopped.output,
            "differences": differences(train_here(config, out, resume=True), reference)}


def disk_fault_training(config: Path, out: Path, reference: Path, code: int, match: str = "") -> dict:
    """Train `config` to its second checkpoint, then let writes to its run folder (whose names contain `match`)
    fail with `code` for the rest of the run, then resume with the disk fine. Returns the error and whether
    it is clear (a ScoresdeError of 1-3 lines naming the run folder), whether the files before are kept
    (metrics.jsonl may only grow), files left behind, and how the resumed run differs from `reference`."""
    from scoresde.core.errors import ScoresdeError
    from scoresde.running.config import load_config
    from scoresde.running.train import Trainer

    cfg = load_config(config, [f"out={out}"])
    trainer = Trainer(cfg, resume=False).run(until=2 * cfg.checkpoint_every)
    before, error = snapshot(cfg.run_dir), None
    with failing_writes(cfg.run_dir, code, match):
        try:
            trainer.run()
        except Exception as err:  # noqa: BLE001 - what it raises is the result
            error = err
    after = snapshot(cfg.run_dir)
    try:
        resumed = differences(train_here(config, out, resume=True), reference)
    except Exception as err:  # noqa: BLE001
        resumed = [f"resuming failed: {type(err).__name__}: {err}"]
    message = str(error) if error is not None else ""
    return {"error": type(error).__name__ if error is not None else None, "message": message,
            "clear": isinstance(error, ScoresdeError) and 1 <= len(message.splitlines()) <= 3
            and str(cfg.run_dir) in message,
            "kept": all(after.get(k) == v for k, v in before.items() if k != "metrics.jsonl")
            and after.get("metrics.jsonl", b"").startswith(before.get("metrics.jsonl", b"")),
            "debris": sorted(set(after) - set(before)), "differences": resumed}


def disk_fault_sample(run_dir: Path, folder: Path, code: int, suffix: str) -> dict:
    """`scoresde sample RUN --out folder/samples<suffix>` once, then again while writes to `folder` fail with
    `code`: the second one's outcome (`cli_outcome`) and output, whether it names the file, whether the
    folder is as the first one left it."""
    from typer.testing import CliRunner

    from scoresde.cli import app

    out = folder / f"samples{suffix}"
    args = ["sample", str(run_dir), "--out", str(out), "--n", "8", "--nfe", "5"]
    first = CliRunner().invoke(app, args)
    if first.exit_code:
        raise RuntimeError(f"scoresde {' '.join(args)} failed: {first.output}")
    before = snapshot(folder)
    with failing_writes(folder, code):
        res = CliRunner().invoke(app, [*args, "--seed", "1"])
    return {"outcome": cli_outcome(res.exit_code, res.output, res.exception), "output": res.output.strip(),
            "names_file": str(out) in res.output, "kept": snapshot(folder) == before}


# ---- outcomes -----------------------------------------------------------------------------------------------

BOX = "╭╮╰╯│─"


def message_lines(output: str) -> list[str]:
    """The lines of an error message: Typer's usage hint ("Usage: ...", "Try '... --help'") and the
    box it draws around a usage error left out."""
    lines = [line.strip(BOX + " ") for line in output.splitlines()]
    return [line for line in lines if line and not line.startswith(("Usage: ", "Try '"))]


def cli_outcome(exit_code: int, output: str, exception: BaseException | None = None) -> str:
    """How a CLI invocation ended: "success" (status 0), "clear error" (non-zero, a message of 1-3 lines, no
    traceback, not an internal error), "unclear error" (non-zero otherwise) or "traceback" (a traceback was
    printed or an exception escaped, as typer's CliRunner reports it)."""
    if "Traceback" in output or (exception is not None and not isinstance(exception, SystemExit)):
        return "traceback"
    if exit_code == 0:
        return "success"
    lines = message_lines(output)
    clear = 1 <= len(lines) <= 3 and not any(line.startswith("internal error") for line in lines)
    return "clear error" if clear else "unclear error"


def api_outcome(fn, *args, **kwargs) -> tuple[str, BaseException | None]:
    """How a library call ended: ("success", None), ("clear error", e) for a ScoresdeError with a non-empty
    message, ("unclear error", e) for one without, ("other exception", e) for any other exception."""
    from scoresde.core.errors import ScoresdeError

    try:
        fn(*args, **kwargs)
    except ScoresdeError as err:
        return ("clear error" if str(err).strip() else "unclear error"), err
    except Exception as err:  # noqa: BLE001 - the point: anything else is a finding
        return "other exception", err
    return "success", None


# ---- disk faults ------------------------------------------------------------------------------------------

def _fd_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class _FullDisk:
    """A file on a full disk: each write stores half of its data, then raises ENOSPC."""

    def __init__(self, f, name: str):
        self._f, self._name = f, name

    def write(self, data) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_ENTRY_CALLS = ("replace", "rename", "unlink", "remove", "link", "mkdir", "rmdir")


@contextmanager
def failing_writes(folder: str | os.PathLike, code: int = errno.ENOSPC, match: str = "") -> Iterator[None]:
    """Inside the block, writes to files under `folder` (whose names contain `match`) fail in this process as
    on a full disk (code ENOSPC: files open, each write stores half its bytes, then raises) or in an
    unwritable folder (EACCES: opening a file for writing, creating, renaming or removing one raises). Root
    ignores chmod, so this is simulated: builtins.open / io.open, os.open, os.fdopen, os.write and the os
    calls that change folder entries are replaced for the duration."""
    folder = Path(os.path.abspath(folder))
    real = {name: getattr(os, name) for name in ("open", "fdopen", "write", *_ENTRY_CALLS)}
    real_open = builtins.open

    def hit(path) -> bool:
        name = _fd_name(path) if isinstance(path, int) else os.fsdecode(path)
        return bool(name) and match in os.path.basename(name) and Path(os.path.abspath(name)).is_relative_to(folder)

    def deny(path) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), _fd_name(path) if isinstance(path, int)
                              else os.fsdecode(path))

    def writing(mode: str, file) -> bool:
        return any(c in mode for c in "wax+") and hit(file)

    def py_open(file, mode="r", *args, **kwargs):
        if not writing(mode, file):
            return real_open(file, mode, *args, **kwargs)
        if code == errno.EACCES:
            deny(file)
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f, _fd_name(file) if isinstance(file, int) else os.fsdecode(file))

    def os_open(path, flags, *args, **kwargs):
        if code == errno.EACCES and flags & _WRITE_FLAGS and hit(path):
            deny(path)
        return real["open"](path, flags, *args, **kwargs)

    def os_fdopen(fd, mode="r", *args, **kwargs):
        f = real["fdopen"](fd, mode, *args, **kwargs)
        return _FullDisk(f, _fd_name(fd)) if code == errno.ENOSPC and writing(mode, fd) else f

    def os_write(fd, data):
        if hit(fd):
            raise OSError(code, os.strerror(code), _fd_name(fd))
        return real["write"](fd, data)

    def entries(name: str):
        def change(*args, **kwargs):
            if code == errno.EACCES and any(hit(p) for p in args[:2] if isinstance(p, (str, bytes, os.PathLike))):
                deny(args[0])
            return real[name](*args, **kwargs)
        return change

    patched = {"open": os_open, "fdopen": os_fdopen, "write": os_write, **{n: entries(n) for n in _ENTRY_CALLS}}
    try:
        for name, fn in patched.items():
            setattr(os, name, fn)
        builtins.open = io.open = py_open
        yield
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
        builtins.open = io.open = real_open


def snapshot(folder: str | os.PathLike) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes), hidden temporary files included."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
