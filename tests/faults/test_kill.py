"""Training runs killed (SIGKILL) at random moments, inside checkpoint writes too, stopped by SIGTERM, and a
torchrun job with a rank killed: each, resumed, ends bit for bit where an uninterrupted run ends (CPU)."""
import random
import re

import pytest

from .harness import (
    campaign,
    differences,
    draw_faults,
    run_attempt,
    run_chain,
    run_torchrun,
    sigterm_at_step,
    train_here,
    training_state,
    write_config,
)


def test_three_sigkills_one_inside_the_writer_resume_bit_identically(reference, tmp_path):
    config, ref = reference
    faults = draw_faults(random.Random(18), 3)
    assert sum(f.startswith("write:") for f in faults) >= 1
    attempts = run_chain(config, tmp_path, faults, max_clean=0)
    assert [a.killed for a in attempts] == [True] * 3, [(a.fault, a.returncode, a.output[-800:]) for a in attempts]
    assert differences(train_here(config, tmp_path, resume=True), ref) == []  # as `scoresde train` resumes


@pytest.mark.slow
def test_twenty_sigkills_resume_bit_identically(reference, tmp_path):
    config, ref = reference
    runs = campaign(config, tmp_path, draw_faults(random.Random(20), 20))
    attempts = [a for _, run in runs for a in run]
    assert sum(a.killed for a in attempts) == 20
    assert all(a.killed or a.returncode == 0 for a in attempts), [(a.fault, a.output[-800:]) for a in attempts
                                                                 if not a.killed and a.returncode]
    for run_dir, run in runs:
        assert run[-1].returncode == 0 and differences(run_dir, ref) == []


def _stopped_step(output: str) -> int:
    """The step a SIGTERM-stopped run reports it saved."""
    found = re.findall(r"\bstep (\d+)", output)
    assert found, output[-2000:]
    return int(found[-1])


def test_sigterm_at_a_random_step_saves_that_step_and_resumes_bit_identically(reference, tmp_path):
    config, ref = reference
    step = random.Random(181).randint(2, 298)
    result = sigterm_at_step(config, tmp_path, step, ref)
    assert result["clear"], (result["returncode"], result["output"][-3000:])  # exited itself, 1-3 lines naming the step
    assert result["saved_step"] == step
    assert result["differences"] == []


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [0.05, 0.2, 0.45])
def test_sigterm_from_outside_saves_the_step_it_reports(reference, tmp_path, seconds):
    config, ref = reference
    stopped = run_attempt(config, tmp_path, f"term-time:{seconds}")
    assert stopped.returncode > 0 and "Traceback" not in stopped.output, stopped.output[-3000:]
    assert int(training_state(tmp_path / config.stem)[1]["step"]) == _stopped_step(stopped.output)
    done = run_attempt(config, tmp_path)
    assert done.returncode == 0, done.output[-3000:]
    assert differences(tmp_path / config.stem, ref) == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_rank_killed_restarts_and_finishes_identically(tmp_path):
    config = write_config(tmp_path, steps=60, checkpoint_every=10)
    clean = run_torchrun(config, tmp_path / "clean")
    assert clean.returncode == 0, clean.output[-3000:]
    faulted = run_torchrun(config, tmp_path / "faulted", fault="kill-step:25")
    assert faulted.returncode == 0, faulted.output[-3000:]
    assert (tmp_path / "faulted" / "fault-injected").exists()  # rank 1 did kill itself on the first attempt
    assert "resuming from step 20" in faulted.output, faulted.output[-3000:]
    assert differences(tmp_path / "faulted" / config.stem, tmp_path / "clean" / config.stem) == []
