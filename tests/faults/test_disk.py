"""A full disk and an unwritable folder (simulated in-process: `harness.failing_writes`) during a checkpoint
save, a metrics write and `scoresde sample --out`: a clear error naming the file, the previous checkpoint and
outputs intact, no temporary files left, and the run resumes bit-identically."""
import errno

import pytest
from typer.testing import CliRunner

from scoresde.cli import app
from scoresde.core.errors import OutputError
from scoresde.running.train import Trainer

from .harness import cli_outcome, differences, failing_writes, snapshot

CODES = {"full disk": errno.ENOSPC, "unwritable folder": errno.EACCES}


@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
def test_the_simulation_fails_writes_in_the_folder_only(tmp_path, code):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    (inside / "old").write_bytes(b"old")
    with failing_writes(inside, code):
        with pytest.raises(OSError) as err, open(inside / "new", "wb") as f:
            f.write(b"abcd")
        with pytest.raises(OSError):
            (inside / "old").write_text("changed")
        (outside / "fine").write_bytes(b"ok")
    assert err.value.errno == code
    # refused, or truncated by "wb" and then half of "changed" written
    assert (inside / "old").read_bytes() == {errno.EACCES: b"old", errno.ENOSPC: b"cha"}[code]
    assert (inside / "new").exists() == (code == errno.ENOSPC) and (outside / "fine").read_bytes() == b"ok"
    if code == errno.ENOSPC:
        assert (inside / "new").read_bytes() == b"ab"  # half of the write landed
    (inside / "after").write_bytes(b"x")  # restored on exit


@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
@pytest.mark.parametrize("failing", [
    pytest.param("checkpoint", id="checkpoint save"),
    pytest.param("", id="every write", marks=pytest.mark.xfail(strict=False, reason="waiting for C: Trainer._log appends "
                 "to metrics.jsonl unguarded (a raw OSError), and resuming fails on the half-written record")),
])
def test_training_on_a_failing_disk_stops_clearly_keeps_its_files_and_resumes(tiny_config, code, failing):
    """Writes fail after step 10's checkpoint: either the checkpoint save at step 20 (the metrics appends
    still fit) or every write, the first being step 11's metrics record."""
    cfg = tiny_config(log_every=1)
    trainer = Trainer(cfg).run(until=10)
    before = snapshot(cfg.run_dir)
    with failing_writes(cfg.run_dir, code, match=failing), pytest.raises(OutputError) as err:
        trainer.run()
    assert str(cfg.run_dir) in str(err.value) and len(str(err.value).splitlines()) <= 3, str(err.value)
    after = snapshot(cfg.run_dir)
    assert sorted(after) == sorted(before)  # no temporary file left
    assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == \
        {k: v for k, v in before.items() if k != "metrics.jsonl"}
    assert after["metrics.jsonl"].startswith(before["metrics.jsonl"])  # the records before are intact
    Trainer(cfg).run()  # the disk is fine again: the run resumes from step 10
    reference = Trainer(tiny_config(name="reference", log_every=1)).run()
    assert differences(cfg.run_dir, reference.run_dir) == []


@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
@pytest.mark.parametrize("suffix", [".npy", ".png"])
def test_sample_out_on_a_failing_disk_keeps_the_previous_output(tiny_run, tmp_path, code, suffix):
    out = tmp_path / f"samples{suffix}"
    args = ["sample", str(tiny_run), "--out", str(out), "--n", "8", "--nfe", "5"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    before = snapshot(tmp_path)
    with failing_writes(tmp_path, code):
        res = CliRunner().invoke(app, [*args, "--seed", "1"])
    assert cli_outcome(res.exit_code, res.output, res.exception) == "clear error", res.output
    assert str(out) in res.output, res.output
    assert snapshot(tmp_path) == before  # the previous samples, and nothing else
