"""A full disk and an unwritable folder (simulated in-process: `harness.failing_writes`) during a checkpoint
save, a metrics write and `scoresde sample --out`: a clear error naming the file, the previous checkpoints and
outputs intact, no temporary files left, and the run resumes bit-identically."""
import errno

import pytest

from .harness import disk_fault_sample, disk_fault_training, failing_writes

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
@pytest.mark.parametrize("failing", ["checkpoint", ""], ids=["checkpoint save", "every write"])
def test_training_on_a_failing_disk_stops_clearly_keeps_its_files_and_resumes(reference, tmp_path, code, failing):
    """Writes fail after the second checkpoint: either the next checkpoint save (the metrics appends still
    fit) or every write, the first being the next step's metrics record."""
    config, ref = reference
    result = disk_fault_training(config, tmp_path, ref, code, failing)
    assert result["clear"], (result["error"], result["message"])
    assert result["kept"] and result["debris"] == []  # the previous checkpoints and records; no temporary file
    assert result["differences"] == []  # the disk is fine again: the run resumes bit-identically


@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
@pytest.mark.parametrize("suffix", [".npy", ".png"])
def test_sample_out_on_a_failing_disk_keeps_the_previous_output(tiny_run, tmp_path, code, suffix):
    result = disk_fault_sample(tiny_run, tmp_path, code, suffix)
    assert result["outcome"] == "clear error" and result["names_file"], result["output"]
    assert result["kept"]  # the previous samples, and nothing else
