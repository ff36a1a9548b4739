"""Data-parallel training launched by torchrun (2 CPU processes, gloo) agrees with one process."""
import os
import subprocess
import sys

import pytest
import torch

from scoresde.running.checkpoint import checkpoint_weights, read_checkpoint
from scoresde.running.config import load_config
from scoresde.running.train import Trainer

CONFIG = ("data: moons\nn_train: 400\nn_test: 50\nnet_args: {hidden: 16, depth: 2, emb_dim: 8}\nsteps: 12\n"
          "batch_size: 64\nlr: 0.01\nwarmup: 2\ncheckpoint_every: 6\neval_every: 0\nn_eval: 20\nnfe: 11\nprogress: false\n")


@pytest.mark.timeout(300)
def test_torchrun_two_processes_match_one(tmp_path):
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scoresde.cli", "train", str(cfg_path), f"out={tmp_path / 'ddp'}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    meta = read_checkpoint(tmp_path / "ddp" / "ddp" / "checkpoint.safetensors")[1]
    assert '"world_size": 2' in meta["extra"]  # really two processes, each on half of the batch
    single = Trainer(load_config(cfg_path, [f"out={tmp_path / 'one'}"])).run()
    ddp = checkpoint_weights(tmp_path / "ddp" / "ddp" / "checkpoint.safetensors", "model")
    ddp_ema = checkpoint_weights(tmp_path / "ddp" / "ddp" / "checkpoint.safetensors", "ema")
    own = single.model.state_dict()
    # same global batch, gradients averaged across the two halves: equal up to float rounding
    for k, v in own.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ddp_ema[k], single.ema.shadow[k], rtol=1e-4, atol=1e-5)
    moved = max((v - single.ema.shadow[k]).abs().max().item() for k, v in own.items())
    assert moved > 1e-3  # the comparison is not vacuous: training changed the weights


# one torchrun process; its steps take 20 ms more (the weights are unchanged), so that a signal lands mid-run
SIGNALLED = """
import os, sys, time
from scoresde.running.config import load_config
from scoresde.running.train import Trainer, TrainingInterrupted
tr = Trainer(load_config(sys.argv[1], sys.argv[2:]))
with open(os.path.join(os.path.dirname(sys.argv[1]), f"pid{tr.rank}.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(f.name, f.name[:-4])
step = tr._train_step
tr._train_step = lambda: (time.sleep(0.02), step())[1]
try:
    tr.run()
except TrainingInterrupted as err:
    print(f"rank {tr.rank}: {err}", flush=True)
    sys.exit(3)
"""


@pytest.mark.timeout(300)
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """SIGTERM to rank 1 only: rank 0, which writes the checkpoints, stops after the same step and saves it."""
    import re
    import signal
    import time

    cfg_path, script = tmp_path / "ddp.yaml", tmp_path / "signalled.py"
    cfg_path.write_text(CONFIG.replace("steps: 12", "steps: 2000").replace("checkpoint_every: 6", "checkpoint_every: 5000")
                        + "log_every: 1\n")
    script.write_text(SIGNALLED)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(cfg_path), f"out={tmp_path / 'ddp'}"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log, deadline = tmp_path / "ddp" / "ddp" / "metrics.jsonl", time.monotonic() + 200
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
    out, _ = proc.communicate(timeout=200)
    steps = {int(s) for s in re.findall(r"rank \d: stopped by SIGTERM at step (\d+); checkpoint saved to", out)}
    assert "rank 1: stopped by SIGTERM" in out and len(steps) == 1, out[-3000:]
    stopped = steps.pop()
    assert 3 <= stopped < 2000
    assert int(read_checkpoint(tmp_path / "ddp" / "ddp" / "checkpoint.safetensors")[1]["step"]) == stopped
