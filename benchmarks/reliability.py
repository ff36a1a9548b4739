"""Reliability: faults injected into training runs, and the bad inputs a new user tries (issue 18).

The fault campaign uses the machinery of the fault-injection tests (`tests/faults/harness.py`): `--kills`
SIGKILLs at seeded random moments of a tiny CPU run (half inside the checkpoint writer, half at a random time
of training), each run restarted until it finishes and compared tensor for tensor (torch.equal) with an
uninterrupted run; `--terms` SIGTERMs at random steps (the saved step, the message, the resumed run);
a full disk and an unwritable folder (simulated) during a checkpoint save, a metrics write and `scoresde
sample --out`. The catalogue holds about 110 bad inputs (CLI commands and library calls a new user gets
wrong: bad values, typos, missing or damaged files, NaN data, n = 0, ...); each outcome is classified as a
clear error (a ScoresdeError, or CLI status != 0 with a 1-3 line message and no traceback), warned (it went
on after a warning), unclear error, traceback (any other exception) or silently accepted.

    python -m benchmarks reliability [--quick] [--kills 20] [--terms 5]      (make bench-reliability)

Writes reliability.json (every fault and input with its outcome), reliability.md (the tables) and
reliability.png into benchmarks/results/reliability/; scratch runs under its runs/ folder.
"""
from __future__ import annotations

import errno
import io
import random
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks import common

# the fault-injection tests' machinery (tests/ is beside benchmarks/)
from tests.faults import harness

NAME = "reliability"
QUICK = {"kills": 3, "terms": 1}
OUTCOMES = ("clear error", "warned", "accepted correctly", "unclear error", "traceback", "silently accepted")
DISK_CODES = {"full disk": errno.ENOSPC, "unwritable folder": errno.EACCES}
# the tiny run the catalogue's commands work on (2-D moons, 30 steps)
TINY = {"data": "moons", "n_train": 500, "n_test": 100, "net_args": {"hidden": 16, "depth": 1, "emb_dim": 8},
        "steps": 30, "batch_size": 32, "lr": 3e-3, "warmup": 3, "checkpoint_every": 10, "eval_every": 0,
        "log_every": 5, "n_eval": 50, "nfe": 21, "progress": False}


def add_arguments(p) -> None:
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs injected (half inside the checkpoint writer)")
    p.add_argument("--terms", type=int, default=5, help="SIGTERMs at random steps")
    p.add_argument("--seed", type=int, default=18)


# ---- the fault campaign -------------------------------------------------------------------------------------

def kill_campaign(config: Path, root: Path, reference: Path, n: int, rng: random.Random) -> dict:
    runs = harness.campaign(config, root, harness.draw_faults(rng, n))
    attempts = [{"run": i, "fault": a.fault, "killed": a.killed, "returncode": a.returncode}
                for i, (_, run) in enumerate(runs) for a in run]
    finished = [{"run": i, "finished": run[-1].returncode == 0,
                 "differences": harness.differences(d, reference) if run[-1].returncode == 0 else ["did not finish"]}
                for i, (d, run) in enumerate(runs)]
    for row in finished:
        print(f"run {row['run']}: {sum(a['killed'] for a in attempts if a['run'] == row['run'])} SIGKILLs, "
              f"{'bit-identical' if not row['differences'] else 'differs: ' + ', '.join(row['differences'][:4])}")
    return {"attempts": attempts, "runs": finished}


def term_campaign(config: Path, root: Path, reference: Path, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        step = rng.randint(2, harness.RUN["steps"] - 2)
        r = harness.sigterm_at_step(config, root / f"term{i}", step, reference)
        rows.append({"step": step, "saved_step": r["saved_step"], "clear": r["clear"], "returncode": r["returncode"],
                     "message": harness.message_lines(r["output"])[-1:], "differences": r["differences"]})
        print(f"SIGTERM at step {step}: saved {r['saved_step']}, exit {r['returncode']}, "
              f"{'bit-identical' if not r['differences'] else 'differs'}")
    return rows


def disk_campaign(config: Path, root: Path, reference: Path, run_dir: Path) -> list[dict]:
    rows = []
    for where, code in DISK_CODES.items():
        for target, match in (("checkpoint save", "checkpoint"), ("metrics write", "")):
            r = harness.disk_fault_training(config, root / f"disk-{code}-{target[:4]}", reference, code, match)
            rows.append({"fault": where, "target": target, "clear": r["clear"], "kept": r["kept"] and not r["debris"],
                         "message": r["message"] or r["error"], "resumed_identical": not r["differences"]})
        for suffix in (".npy", ".png"):
            folder = root / f"disk-{code}-sample{suffix}"
            folder.mkdir(parents=True)
            r = harness.disk_fault_sample(run_dir, folder, code, suffix)
            rows.append({"fault": where, "target": f"sample --out {suffix}", "clear": r["outcome"] == "clear error",
                         "kept": r["kept"], "message": r["output"][-300:], "resumed_identical": None})
    for row in rows:
        print(f"{row['fault']} during {row['target']}: {'clear' if row['clear'] else 'NOT clear'}, "
              f"{'files kept' if row['kept'] else 'FILES CHANGED'}: {row['message'][:120]}")
    return rows


# ---- the catalogue of bad inputs ----------------------------------------------------------------------------

def _cli(*args: str | Path) -> tuple[str, str]:
    from typer.testing import CliRunner

    from scoresde.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    outcome = harness.cli_outcome(res.exit_code, res.output, res.exception)
    if outcome == "success":
        outcome = "warned" if "warn" in res.output.lower() else "silently accepted"
    message = res.output if outcome != "traceback" or res.exception is None else \
        f"{type(res.exception).__name__}: {res.exception}"
    return outcome, message.strip()[-400:]


def _api(fn: Callable[[], object]) -> tuple[str, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            outcome, err = harness.api_outcome(fn)
    if outcome == "other exception":
        outcome = "traceback"
    if outcome == "success":
        outcome = "warned" if any(issubclass(w.category, UserWarning) for w in caught) else "silently accepted"
    message = f"{type(err).__name__}: {err}" if err is not None else "; ".join(str(w.message) for w in caught)
    return outcome, message.strip()[-400:]


def _png(path: Path, size: int, value: int = 128) -> None:
    from PIL import Image

    Image.new("L", (size, size), value).save(path)


def workspace(folder: Path) -> dict[str, Path]:
    """The files the catalogue's inputs name: a trained tiny run and damaged copies of it, a tiny config,
    bad data files and image folders."""
    from scoresde.running.checkpoint import CHECKPOINT, previous_checkpoint
    from scoresde.running.config import Config
    from scoresde.running.train import Trainer

    folder.mkdir(parents=True, exist_ok=True)
    with redirect_stdout(io.StringIO()):
        run = Trainer(Config(name="run", out=str(folder), **TINY)).run().run_dir
    p = {"run": run, "cfg": folder / "tiny.yaml"}
    p["cfg"].write_text(yaml.safe_dump({**TINY, "steps": 5, "checkpoint_every": 5}, sort_keys=False))
    ckpt = run / CHECKPOINT
    for name, damage in (("truncated", "both"), ("truncated-newest", "newest"), ("text-checkpoint", "text"),
                         ("no-config", "config"), ("garbage-config", "garbage")):
        d = p[name] = folder / name
        shutil.copytree(run, d)
        saved = yaml.safe_load((d / "config.yaml").read_text())
        (d / "config.yaml").write_text(yaml.safe_dump({**saved, "name": name}, sort_keys=False))  # the copy's own run
        if damage in ("both", "newest"):
            data = ckpt.read_bytes()
            (d / CHECKPOINT).write_bytes(data[: len(data) // 2])
            if damage == "both":
                previous_checkpoint(d / CHECKPOINT).unlink(missing_ok=True)
        elif damage == "text":
            (d / CHECKPOINT).write_text("not a checkpoint\n")
            previous_checkpoint(d / CHECKPOINT).unlink(missing_ok=True)
        elif damage == "config":
            (d / "config.yaml").unlink()
        else:
            (d / "config.yaml").write_text("steps: [1, 2\n")
    arrays = {"empty.npy": np.zeros((0, 2)), "nan.npy": np.array([[0.0, np.nan]] * 50),
              "inf.npy": np.array([[0.0, np.inf]] * 50), "vector.npy": np.zeros(50), "five-d.npy": np.zeros((4,) * 5),
              "mask.npy": np.ones(2)}
    texts = {"text.npy": "1,2\n3,4\n", "blank.npy": "", "data.csv": "1,2\n3,4\n"}
    for name, a in arrays.items():
        np.save(folder / name, a)
    for name, text in texts.items():
        (folder / name).write_text(text)
    p.update({name: folder / name for name in [*arrays, *texts]})
    for name in ("broken-images", "mixed-images", "no-images"):
        (folder / name).mkdir()
        p[name] = folder / name
    for i in range(6):
        _png(p["broken-images"] / f"{i}.png", 8)
        _png(p["mixed-images"] / f"{i}.png", 8 if i % 2 else 12)
    (p["broken-images"] / "bad.png").write_text("not a png")
    (p["no-images"] / "readme.txt").write_text("no images here")
    return p


def catalogue(folder: Path, p: dict[str, Path]) -> list[tuple]:
    """The bad inputs: (category, what was tried, a call returning (outcome, message)[, a check that it did
    the right thing when accepting it is right]); every path is absolute, nothing is written outside `folder`."""
    from scoresde.core.sde import VP
    from scoresde.evaluation.metrics import w2
    from scoresde.learning.losses import denoising_score_matching
    from scoresde.running.config import Config, load_config
    from scoresde.running.data import Dataset, load_dataset
    from scoresde.running.export import export_run, load_model
    from scoresde.running.runs import load_run
    from scoresde.running.train import Trainer
    from scoresde.sampling import sample

    runs = folder / "runs"
    count = iter(range(10_000))

    def train(*overrides: str, cfg: Path | str = p["cfg"], name: str = "") -> Callable[[], tuple[str, str]]:
        """`scoresde train cfg` into its own run folder runs/<name> (an override of name or out still wins)."""
        name = name or f"case{next(count)}"
        return lambda: _cli("train", cfg, f"out={runs}", f"name={name}", *overrides)

    def yaml_file(name: str, text: str) -> Path:
        path = folder / name
        path.write_text(text)
        return path

    def cli(*args) -> Callable[[], tuple[str, str]]:
        return lambda: _cli(*args)

    def api(fn: Callable[[], object]) -> Callable[[], tuple[str, str]]:
        return lambda: _api(fn)

    def resumed_differently() -> tuple[str, str]:
        first = _cli("train", p["cfg"], f"out={runs}", "name=twice")
        if first[0] not in ("silently accepted", "warned"):
            return "unclear error", f"the first run failed: {first[1]}"
        return _cli("train", p["cfg"], f"out={runs}", "name=twice", "seed=1")

    def on_disk(code: int, *args) -> Callable[[], tuple[str, str]]:
        out = folder / f"out-{code}"
        out.mkdir(exist_ok=True)

        def call() -> tuple[str, str]:
            with harness.failing_writes(out, code):
                return _cli(*args, "--out", out / "s.npy")
        return call

    score, vp, run, sample_args = (lambda x, t: -x), VP(), p["run"], ("--n", "16", "--nfe", "5")
    tiny = {**TINY, "out": str(runs), "steps": 2}
    cases = [
        # config files and overrides
        ("config", "train a config file that does not exist", train(cfg=folder / "missing.yaml")),
        ("config", "train a folder as the config", train(cfg=folder)),
        ("config", "YAML syntax error", train(cfg=yaml_file("syntax.yaml", "steps: [1, 2\n"))),
        ("config", "YAML holding a list, not a mapping", train(cfg=yaml_file("list.yaml", "- steps\n- 5\n"))),
        ("config", "YAML with a tab indent", train(cfg=yaml_file("tab.yaml", "net_args:\n\thidden: 8\n"))),
        ("config", "unknown key in the YAML (typo)", train(cfg=yaml_file("typo.yaml", "stpes: 5\n"))),
        ("config", "lr: 2e-3 in the YAML (YAML 1.1 reads a string)",
         train(cfg=yaml_file("lr.yaml", yaml.safe_dump({**TINY, "steps": 5, "lr": None}).replace("lr: null", "lr: 2e-3")),
               name="lr-2e-3"),
         lambda: yaml.safe_load((runs / "lr-2e-3" / "config.yaml").read_text())["lr"] == 2e-3),
        ("config", "net_args: 5 (not a mapping)", train("net_args=5")),
        ("config", "override without '='", train("steps")),
        ("config", "override with an empty key", train("=5")),
        ("config", "unknown override key (typo stpes)", train("stpes=10")),
        ("config", "dict entry on a non-dict key", train("steps.x=1")),
        ("config", "steps=0", train("steps=0")),
        ("config", "steps=-5", train("steps=-5")),
        ("config", "steps=abc", train("steps=abc")),
        ("config", "steps=1.5", train("steps=1.5")),
        ("config", "lr=0", train("lr=0")),
        ("config", "lr=-1", train("lr=-1")),
        ("config", "lr=.nan", train("lr=.nan")),
        ("config", "lr=.inf (diverges)", train("lr=.inf")),
        ("config", "batch_size=0", train("batch_size=0")),
        ("config", "warmup=1000 > steps=5", train("warmup=1000")),
        ("config", "sde=vpp (typo)", train("sde=vpp")),
        ("config", "net=unet on 2-D data", train("net=unet")),
        ("config", "net=transformer (no such net)", train("net=transformer")),
        ("config", "net_args.hidden=-1", train("net_args.hidden=-1")),
        ("config", "net_args.widht=8 (typo)", train("net_args.widht=8")),
        ("config", "loss=bogus", train("loss=bogus")),
        ("config", "loss_args.weighting=bogus", train("loss_args.weighting=bogus")),
        ("config", "sampler=bogus", train("sampler=bogus")),
        ("config", "device=gpu", train("device=gpu")),
        ("config", "precision=fp8", train("precision=fp8")),
        ("config", "ema_decay=1.5", train("ema_decay=1.5")),
        ("config", "ema_decay with ema_schedule=power", train("ema_decay=0.99", "ema_schedule=power")),
        ("config", "accumulate=0", train("accumulate=0")),
        ("config", "label_dropout=2", train("label_dropout=2")),
        ("config", "n_test=0", train("n_test=0")),
        ("config", "checkpoint_every=0", train("checkpoint_every=0")),
        ("config", "name=a/b", train("name=a/b")),
        ("config", "threads=0", train("threads=0")),
        ("config", "model=gan", train("model=gan")),
        ("config", "model=vae with loss=denoising", train("model=vae")),
        ("config", "parametrization=bogus", train("parametrization=bogus")),
        ("config", "sde_args.beta_max=-1", train("sde_args.beta_max=-1")),
        ("config", "lr_schedule=linear", train("lr_schedule=linear")),
        ("config", "net_args.n_classes=10 on unlabelled data", train("net_args.n_classes=10")),
        ("config", "resume a run folder with a different config", resumed_differently),
        # data
        ("data", "data=missing.npy", train(f"data={folder / 'missing.npy'}")),
        ("data", "data=a folder that does not exist", train(f"data={folder / 'nowhere'}/")),
        ("data", "data=bogus (no such built-in set)", train("data=bogus")),
        ("data", "a text file named .npy", train(f"data={p['text.npy']}")),
        ("data", "an empty file named .npy", train(f"data={p['blank.npy']}")),
        ("data", "a .csv file", train(f"data={p['data.csv']}")),
        ("data", "an empty array (0, 2)", train(f"data={p['empty.npy']}")),
        ("data", "NaN in the data", train(f"data={p['nan.npy']}")),
        ("data", "inf in the data", train(f"data={p['inf.npy']}")),
        ("data", "a 1-D array", train(f"data={p['vector.npy']}")),
        ("data", "a 5-D array", train(f"data={p['five-d.npy']}")),
        ("data", "a non-image file named .png in an image folder", train(f"data={p['broken-images']}", "net=unet")),
        ("data", "images of different sizes, no image_size", train(f"data={p['mixed-images']}", "net=unet")),
        ("data", "an image folder without images", train(f"data={p['no-images']}", "net=unet")),
        ("data", "mixture0 (no dimensions)", train("data=mixture0")),
        ("data", "API: Dataset of an empty tensor", api(lambda: Trainer(Config(**tiny), data=Dataset(
            train=torch.zeros(0, 2), test=torch.zeros(0, 2), name="empty")).run())),
        ("data", "API: Dataset holding NaN", api(lambda: Trainer(Config(**tiny), data=Dataset(
            train=torch.full((64, 2), float("nan")), test=torch.zeros(8, 2), name="nan")).run())),
        ("data", "API: Dataset of a 1-D tensor", api(lambda: Trainer(Config(**tiny), data=Dataset(
            train=torch.zeros(64), test=torch.zeros(8), name="vector")).run())),
        ("data", "API: load_dataset('bogus')", api(lambda: load_dataset("bogus"))),
        # sampling and the other commands
        ("commands", "sample a run folder that does not exist", cli("sample", folder / "missing", "--out", folder / "s.npy")),
        ("commands", "sample a folder that is not a run", cli("sample", p["no-images"], "--out", folder / "s.npy")),
        ("commands", "sample --out s.txt", cli("sample", run, "--out", folder / "s.txt", *sample_args)),
        ("commands", "sample --out an existing folder", cli("sample", run, "--out", folder, *sample_args)),
        ("commands", "sample --n 0", cli("sample", run, "--out", folder / "s.npy", "--n", "0")),
        ("commands", "sample --n -3", cli("sample", run, "--out", folder / "s.npy", "--n", "-3")),
        ("commands", "sample --n abc", cli("sample", run, "--out", folder / "s.npy", "--n", "abc")),
        ("commands", "sample --n 10^12 (no memory for it)", cli("sample", run, "--out", folder / "s.npy",
                                                                "--n", str(10**12))),
        ("commands", "sample --nfe 0", cli("sample", run, "--out", folder / "s.npy", "--nfe", "0")),
        ("commands", "sample --method bogus", cli("sample", run, "--out", folder / "s.npy", "--method", "bogus")),
        ("commands", "sample --method EM (case)", cli("sample", run, "--out", folder / "s.npy", "--method", "EM")),
        ("commands", "sample --guidance 2 without --label", cli("sample", run, "--out", folder / "s.npy",
                                                                "--guidance", "2", *sample_args)),
        ("commands", "sample --label 3 on an unconditional run", cli("sample", run, "--out", folder / "s.npy",
                                                                     "--label", "3", *sample_args)),
        ("commands", "sample --fit-grid -1", cli("sample", run, "--out", folder / "s.npy", "--fit-grid", "-1")),
        ("commands", "sample --fit-grid with a stochastic method", cli("sample", run, "--out", folder / "s.npy",
                                                                       "--fit-grid", "8", "--method", "em")),
        ("commands", "sample --method adaptive_sde --nfe 5 (budget too small)",
         cli("sample", run, "--out", folder / "s.npy", "--method", "adaptive_sde", "--nfe", "5", "--n", "16")),
        ("commands", "sample with no arguments", cli("sample")),
        ("commands", "an unknown command", cli("smaple", run)),
        ("commands", "an unknown option", cli("sample", run, "--out", folder / "s.npy", "--samples", "5")),
        ("commands", "evaluate a missing run", cli("evaluate", folder / "missing")),
        ("commands", "evaluate --n 1", cli("evaluate", run, "--n", "1", "--nfe", "5")),
        ("commands", "evaluate --nfe -1", cli("evaluate", run, "--nfe", "-1")),
        ("commands", "evaluate --method bogus", cli("evaluate", run, "--method", "bogus")),
        ("commands", "likelihood --rtol 0", cli("likelihood", run, "--rtol", "0", "--n", "8")),
        ("commands", "likelihood --divergence bogus", cli("likelihood", run, "--divergence", "bogus", "--n", "8")),
        ("commands", "likelihood --data missing.npy", cli("likelihood", run, "--data", folder / "missing.npy")),
        ("commands", "likelihood --data digits on a 2-D run", cli("likelihood", run, "--data", "digits", "--n", "8")),
        ("commands", "likelihood --batch-size 0", cli("likelihood", run, "--batch-size", "0", "--n", "8")),
        ("commands", "likelihood --n 1", cli("likelihood", run, "--n", "1")),
        ("commands", "inpaint a 2-D run", cli("inpaint", run, "--mask", p["mask.npy"], "--out", folder / "i.png")),
        ("commands", "inpaint --out i.txt", cli("inpaint", run, "--mask", p["mask.npy"], "--out", folder / "i.txt")),
        ("commands", "export a missing run", cli("export", folder / "missing", folder / "exported")),
        ("commands", "export into a path that is a file", cli("export", run, p["cfg"])),
        ("commands", "finetune --reward bogus", cli("finetune", run, "--reward", "bogus", "--beta", "1")),
        ("commands", "finetune --beta -1", cli("finetune", run, "--reward", "linear", "--beta", "-1")),
        ("commands", "finetune --param c=abc", cli("finetune", run, "--reward", "linear", "--param", "c=abc",
                                                   "--beta", "1")),
        # files: damaged runs, unwritable outputs
        ("files", "a truncated checkpoint, no previous one", cli("sample", p["truncated"], "--out", folder / "s.npy",
                                                                 *sample_args)),
        ("files", "a truncated checkpoint, the previous one intact",
         cli("sample", p["truncated-newest"], "--out", folder / "s.npy", *sample_args)),
        ("files", "a text file named checkpoint.safetensors", cli("sample", p["text-checkpoint"], "--out",
                                                                  folder / "s.npy", *sample_args)),
        ("files", "a run folder without config.yaml", cli("sample", p["no-config"], "--out", folder / "s.npy")),
        ("files", "a damaged config.yaml", cli("sample", p["garbage-config"], "--out", folder / "s.npy")),
        ("files", "resume training from a truncated checkpoint, no previous one",
         cli("train", p["truncated"] / "config.yaml")),
        ("files", "sample --out on a full disk", on_disk(errno.ENOSPC, "sample", run, *sample_args)),
        ("files", "sample --out in an unwritable folder", on_disk(errno.EACCES, "sample", run, *sample_args)),
        ("files", "API: load_run of a missing folder", api(lambda: load_run(folder / "missing"))),
        ("files", "API: load_config of a missing file", api(lambda: load_config(folder / "missing.yaml"))),
        ("files", "API: load_model of a missing folder", api(lambda: load_model(folder / "missing"))),
        ("files", "API: export_run of a damaged run", api(lambda: export_run(p["text-checkpoint"], folder / "ex"))),
        # library calls
        ("API", "sample n = 0", api(lambda: sample(vp, score, (0, 2), method="em", nfe=5))),
        ("API", "sample nfe = 0", api(lambda: sample(vp, score, (8, 2), method="em", nfe=0))),
        ("API", "sample nfe = 2.5", api(lambda: sample(vp, score, (8, 2), method="em", nfe=2.5))),
        ("API", "sample method bogus", api(lambda: sample(vp, score, (8, 2), method="bogus", nfe=5))),
        ("API", "sample x_T holding NaN", api(lambda: sample(vp, score, None, method="em", nfe=5,
                                                             x_T=torch.full((8, 2), float("nan"))))),
        ("API", "sample with a score returning NaN", api(lambda: sample(vp, lambda x, t: x * float("nan"), (8, 2),
                                                                        method="heun", nfe=5))),
        ("API", "sample with a score of the wrong shape", api(lambda: sample(vp, lambda x, t: x[:, :1], (8, 2),
                                                                             method="em", nfe=5))),
        ("API", "sample with an unknown option", api(lambda: sample(vp, score, (8, 2), method="em", nfe=5, eta=1))),
        ("API", "loss on NaN data", api(lambda: denoising_score_matching(score, vp, torch.full((8, 2), float("nan"))))),
        ("API", "loss on an empty batch", api(lambda: denoising_score_matching(score, vp, torch.zeros(0, 2)))),
        ("API", "loss with t of the wrong shape", api(lambda: denoising_score_matching(score, vp, torch.zeros(8, 2),
                                                                                      t=torch.rand(3)))),
        ("API", "VP(beta_min=-1)", api(lambda: sample(VP(beta_min=-1.0), score, (8, 2), method="em", nfe=5))),
        ("API", "w2 of 2-D against 3-D points", api(lambda: w2(torch.zeros(10, 2), torch.zeros(10, 3)))),
        ("API", "Config(steps='10')", api(lambda: Config(steps="10"))),
        ("API", "Config(sde=None)", api(lambda: Config(sde=None))),
    ]
    return cases


def run_catalogue(folder: Path, p: dict[str, Path]) -> list[dict]:
    rows = []
    for category, what, call, *check in catalogue(folder, p):
        torch.set_num_threads(1)
        outcome, message = call()
        if check and outcome in ("warned", "silently accepted") and check[0]():
            outcome = "accepted correctly"
        rows.append({"category": category, "input": what, "outcome": outcome, "message": message})
        print(f"[{outcome:17s}] {category:8s} {what}: {message.splitlines()[-1][:140] if message else ''}")
    torch.set_num_threads(1)
    return rows


# ---- report ----------------------------------------------------------------------------------------------------

def summary(kills: dict, terms: list[dict], disk: list[dict], rows: list[dict]) -> dict:
    killed = [a for a in kills["attempts"] if a["killed"]]
    categories = sorted({r["category"] for r in rows}, key=[r["category"] for r in rows].index)
    return {
        "sigkills": len(killed), "inside_writer": sum(a["fault"].startswith("write:") for a in killed),
        "runs": len(kills["runs"]), "runs_identical": sum(not r["differences"] for r in kills["runs"]),
        "sigterms": len(terms), "sigterm_saved_step": sum(t["saved_step"] == t["step"] for t in terms),
        "sigterm_clear": sum(t["clear"] for t in terms), "sigterm_identical": sum(not t["differences"] for t in terms),
        "disk_faults": len(disk), "disk_clear": sum(d["clear"] for d in disk), "disk_kept": sum(d["kept"] for d in disk),
        "disk_resumed": [sum(bool(d["resumed_identical"]) for d in disk if d["resumed_identical"] is not None),
                         sum(d["resumed_identical"] is not None for d in disk)],
        "inputs": len(rows), "outcomes": dict(Counter(r["outcome"] for r in rows)),
        "by_category": {c: dict(Counter(r["outcome"] for r in rows if r["category"] == c)) for c in categories},
    }


def markdown(s: dict, rows: list[dict], disk: list[dict]) -> str:
    resumed, tried = s["disk_resumed"]
    faults = s["sigkills"] + s["sigterms"] + s["disk_faults"]
    clear = s["outcomes"].get("clear error", 0)
    lines = [
        "| faults injected | resumed bit-identical | bad inputs tried | clear errors |", "|---:|---:|---:|---:|",
        (f"| {faults} ({s['sigkills']} SIGKILL, {s['sigterms']} SIGTERM, {s['disk_faults']} disk) | "
        f"{s['runs_identical'] + s['sigterm_identical'] + resumed}/{s['runs'] + s['sigterms'] + tried} runs | "
        f"{s['inputs']} | {clear} (+ {s['outcomes'].get('warned', 0)} warned, "
        f"{s['outcomes'].get('accepted correctly', 0)} accepted correctly) |"),
        "",
        "| fault injected | count | resumed bit-identical | other checks |", "|---|---:|---:|---|",
        (f"| SIGKILL at a random moment | {s['sigkills']} ({s['inside_writer']} inside the checkpoint writer) | "
        f"{s['runs_identical']}/{s['runs']} runs | every killed run restarted from its last checkpoint |"),
        (f"| SIGTERM at a random step | {s['sigterms']} | {s['sigterm_identical']}/{s['sigterms']} | saved that step "
        f"{s['sigterm_saved_step']}/{s['sigterms']}, clear message {s['sigterm_clear']}/{s['sigterms']} |"),
        (f"| full disk / unwritable folder | {s['disk_faults']} | {resumed}/{tried} training runs | clear error "
        f"{s['disk_clear']}/{s['disk_faults']}, previous files kept {s['disk_kept']}/{s['disk_faults']} |"),
        "", "| bad inputs | tried | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
    for name, counts in [*s["by_category"].items(), ("all", s["outcomes"])]:
        lines.append(f"| {name} | {sum(counts.values())} | " + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES) + " |")
    unclear = [d for d in disk if not (d["clear"] and d["kept"])]
    misses = [r for r in rows if r["outcome"] not in ("clear error", "warned", "accepted correctly")]
    if unclear or misses:
        lines += ["", "Not yet clear:", ""]
        lines += [f"- {d['fault']} during {d['target']}: {'' if d['kept'] else 'files changed; '}{_last(d['message'])}"
                  for d in unclear]
        lines += [f"- {r['category']}: {r['input']} ({r['outcome']}): {_last(r['message'])}" for r in misses]
    return "\n".join(lines) + "\n"


def _last(message: str) -> str:
    """The last line of a message, as inline code (or "no message")."""
    line = message.strip().splitlines()[-1][:200] if message.strip() else ""
    return f"`{line}`" if line else "no message"


def figure(s: dict) -> None:
    plt = common.plt()
    names = list(s["by_category"])
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bottom = np.zeros(len(names))
    colours = {"clear error": "#4c9a2a", "warned": "#a4d46c", "accepted correctly": "#2a6fb0", "unclear error": "#f0a030",
               "traceback": "#d03030", "silently accepted": "#7f7f7f"}
    for outcome in OUTCOMES:
        counts = np.array([s["by_category"][n].get(outcome, 0) for n in names], dtype=float)
        ax.bar(names, counts, bottom=bottom, color=colours[outcome], label=outcome)
        bottom += counts
    ax.set_ylabel("bad inputs tried")
    ax.set_title(f"{s['inputs']} bad inputs; {s['sigkills']} SIGKILLs resumed bit-identically in "
                 f"{s['runs_identical']}/{s['runs']} runs")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    common.save_figure(fig, NAME, f"{NAME}.png")


def run(args) -> None:
    rng = random.Random(args.seed)
    root = common.scratch_dir(NAME, f"runs/bench-{NAME}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = harness.write_config(root)
    reference = harness.train_here(config, root / "reference")
    print(f"## faults (tiny run: {harness.RUN['steps']} steps, a checkpoint every {harness.RUN['checkpoint_every']})")
    kills = kill_campaign(config, root / "kills", reference, args.kills, rng)
    terms = term_campaign(config, root / "terms", reference, args.terms, rng)
    files = workspace(root / "catalogue")
    disk = disk_campaign(config, root / "disk", reference, files["run"])
    print("## bad inputs")
    rows = run_catalogue(root / "catalogue", files)
    s = summary(kills, terms, disk, rows)
    common.write_json(NAME, {"summary": s, "kills": kills, "terms": terms, "disk": disk, "inputs": rows})
    text = markdown(s, rows, disk)
    common.write_text(NAME, f"{NAME}.md", text)
    figure(s)
    print(text)

