"""A training run to interrupt: `python driver.py CONFIG.yaml [key=value ...]` runs `scoresde train` (the CLI
command, so a run resumes from its folder's checkpoint and a stop goes through the CLI's error boundary), with
one fault injected from inside the process when SCORESDE_FAULT says so:

    write:N      SIGKILL at the N-th event (N >= 1) of the checkpoint writer: an event is the moment just
                 before or just after an os.fsync / os.replace / os.rename / os.link / os.unlink whose file
                 is a checkpoint, so N walks through every point of a write (temp file filled, synced,
                 renamed, an older file rotated)
    kill-step:S  SIGKILL while optimisation step S is computed (the process dies with step S - 1 done)
    term-step:S  SIGTERM while optimisation step S is computed (the run should finish step S, save it, stop)

SCORESDE_FAULT_RANK=r injects it in the process of that torchrun RANK only; SCORESDE_FAULT_ONCE=FILE injects
it only when FILE does not exist yet (and creates it first), so a restarted job runs clean. No hook in the
library is needed: the driver wraps the os functions and `Trainer._train_step` of its own process.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

MARK = "checkpoint"


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _armed() -> bool:
    """Whether this process injects the fault (its rank, its first attempt)."""
    rank = os.environ.get("SCORESDE_FAULT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return False
    once = os.environ.get("SCORESDE_FAULT_ONCE")
    if once:
        if Path(once).exists():
            return False
        Path(once).touch()
    return True


def _arm_writer(n: int) -> None:
    """SIGKILL this process at the n-th before/after event of a checkpoint file operation."""
    events = [0]

    def event() -> None:
        events[0] += 1
        if events[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn, paths):
        def wrapped(*args, **kwargs):
            hit = any(MARK in os.path.basename(str(p)) for p in paths(args))
            if hit:
                event()
            out = fn(*args, **kwargs)
            if hit:
                event()
            return out
        return wrapped

    os.fsync = wrap(os.fsync, lambda a: [_fd_path(a[0])] if isinstance(a[0], int) else [])
    for name in ("replace", "rename", "link"):
        setattr(os, name, wrap(getattr(os, name), lambda a: a[:2]))
    os.unlink = wrap(os.unlink, lambda a: a[:1])


def _arm_step(step: int, sig: int) -> None:
    """Send `sig` to this process as optimisation step `step` (counted from 1) begins."""
    from scoresde.running.train import Trainer

    train_step = Trainer._train_step

    def wrapped(self):
        if self.step == step - 1:
            os.kill(os.getpid(), sig)
        return train_step(self)

    Trainer._train_step = wrapped


def main(argv: list[str]) -> None:
    fault = os.environ.get("SCORESDE_FAULT", "")
    if fault and _armed():
        kind, _, value = fault.partition(":")
        if kind == "write":
            _arm_writer(int(value))
        elif kind in ("kill-step", "term-step"):
            _arm_step(int(value), signal.SIGKILL if kind == "kill-step" else signal.SIGTERM)
        else:
            raise SystemExit(f"driver: unknown SCORESDE_FAULT {fault!r}")
    from scoresde.cli import app

    app(["train", *argv], prog_name="scoresde")


if __name__ == "__main__":
    main(sys.argv[1:])
