"""Property-based bad inputs (hypothesis, derandomized): random config overrides, data arrays and CLI options
end in success or a ScoresdeError with a message (the CLI: status 0, or non-zero with a 1-3 line message and
no traceback), never another exception."""
import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from scoresde.cli import app
from scoresde.core.sde import VP
from scoresde.learning.losses import denoising_score_matching
from scoresde.running.config import Config, load_config
from scoresde.running.data import Dataset
from scoresde.running.train import Trainer
from scoresde.sampling import sample

from .harness import api_outcome, cli_outcome

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# a tiny run the random overrides then change; where it goes, its thread count and compile stay fixed
BASE = ["data=moons", "n_train=64", "n_test=16", "net_args={hidden: 8, depth: 1, emb_dim: 4}", "batch_size=16",
        "warmup=1", "eval_every=0", "n_eval=8", "nfe=5", "progress=false"]
FIXED = ("name", "out", "threads", "compile", "progress")
KEYS = [f.name for f in dataclasses.fields(Config) if f.name not in FIXED] + \
       ["net_args.hidden", "net_args.depth", "net_args.widht", "sde_args.beta_max", "loss_args.weighting",
        "model_args.n_steps", "stpes", "steps.x"]
# names the fields take, right for some and wrong for others; `data` only ever names built-in sets or missing
# files (a random string could name a real folder, read as an image folder)
NAMES = ["moons", "ring", "mixture3", "digits", "missing.npy", "mlp", "unet", "vp", "ve", "em", "heun", "ddpm", "vae",
         "score", "denoising", "sliced", "eps", "edm", "fp16", "bf16", "cosine", "power", "cuda", "auto"]
YAML_ODD = ["true", "null", "[]", "{}", "[1, 2]", "{a: 1}", "'3'", "2e-3", "1.0e-3", "[", "{a", ": :", "!!binary x", ""]


def _scalar(v) -> str:
    return yaml.safe_dump(v).splitlines()[0]


VALUES = st.one_of(st.integers(-3, 40).map(str), st.floats(width=32).map(_scalar), st.sampled_from(NAMES),
                   st.sampled_from(YAML_ODD), st.text("abc.:-_[]{}' ", max_size=5))
OVERRIDE = st.one_of(st.tuples(st.sampled_from(KEYS), VALUES).map("=".join),
                     st.sampled_from(["steps", "=3", "net_args.=1", "data"]))


def _train(overrides: list[str], out: str, data: Dataset | None = None) -> None:
    cfg = load_config(None, [*overrides, f"out={out}", "name=run", "threads=1", "compile=false", "progress=false"])
    Trainer(cfg, data=data, resume=False).run(until=2)


@PROPERTY
@given(overrides=st.lists(OVERRIDE, max_size=3))
def test_config_overrides_train_or_fail_clearly(overrides):
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as out:
        outcome, err = api_outcome(_train, [*BASE, *overrides], out)
    torch.set_num_threads(threads)
    event(outcome)
    assert outcome in ("success", "clear error"), f"{overrides}: {err!r}"


DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int8, np.uint8, np.bool_, np.complex64]
ARRAYS = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)))


def _through(entry: str, x: np.ndarray, folder: Path) -> None:
    """Hand the array `x` to the library through `entry`."""
    if entry == "file":
        np.save(folder / "x.npy", x)
        _train([*BASE, f"data={folder / 'x.npy'}"], str(folder))
        return
    t = torch.from_numpy(x)
    if entry == "dataset":
        _train(BASE, str(folder), data=Dataset(train=t, test=t, name="arrays"))
    elif entry == "loss":
        denoising_score_matching(lambda y, s: -y, VP(), t)
    else:
        sample(VP(), lambda y, s: -y, None, method="em", nfe=3, x_T=t)


@pytest.mark.parametrize("entry", ["file", "dataset", "loss", "sample"])
def test_data_arrays_train_or_fail_clearly(entry):
    @settings(PROPERTY, max_examples=30)
    @given(x=ARRAYS)
    def check(x):
        with tempfile.TemporaryDirectory() as folder:
            outcome, err = api_outcome(_through, entry, x, Path(folder))
        event(outcome)
        assert outcome in ("success", "clear error"), f"{x.dtype} {x.shape} {x.ravel()[:4]}: {err!r}"

    check()


# ---- CLI ----------------------------------------------------------------------------------------------------

INT = st.sampled_from(["-1", "0", "1", "2", "5", "x", "1.5", ""])
FLOAT = st.sampled_from(["-1", "0.5", "2", "nan", "inf", "x", "1e-3"])
METHOD = st.sampled_from(["em", "heun", "ddim", "dpm2m", "adaptive_sde", "bogus", "EM", ""])
OPTIONS = {
    "sample": {"--n": INT, "--nfe": INT, "--method": METHOD, "--seed": INT, "--label": INT, "--guidance": FLOAT,
               "--fit-grid": INT, "--out": st.sampled_from(["s.npy", "s.npz", "s.png", "s.txt", "", "missing/s.npy",
                                                             "."])},
    "evaluate": {"--n": INT, "--nfe": INT, "--method": METHOD, "--seed": INT},
    "likelihood": {"--n": INT, "--divergence": st.sampled_from(["exact", "auto", "hutchinson-gaussian", "bogus"]),
                   "--rtol": FLOAT, "--atol": FLOAT, "--batch-size": INT,
                   "--data": st.sampled_from(["", "ring", "moons", "bogus", "missing.npy"])},
    "inpaint": {"--mask": st.sampled_from(["mask.npy", "missing.npy", ""]), "--out": st.sampled_from(["i.npy", "i.txt"]),
                "--n": INT, "--nfe": INT, "--how": st.sampled_from(["tweedie", "replace", "bogus"])},
    "export": {},
}
RUN_ARG = st.sampled_from(["run", "run", "run", "missing", "run/config.yaml", ""])


@st.composite
def invocations(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(OPTIONS)))
    args = [command, draw(RUN_ARG)]
    if command == "export":
        args.append(draw(st.sampled_from(["exported", "run/config.yaml", ""])))
    names = draw(st.lists(st.sampled_from(sorted(OPTIONS[command])), max_size=4, unique=True)) if OPTIONS[command] else []
    for name in names:
        args += [name, draw(OPTIONS[command][name])]
    return args


@pytest.fixture(scope="module")
def workdir(tiny_run, tmp_path_factory):
    """A folder holding a copy of the tiny run (as "run"; commands write into it) and a mask file."""
    folder = tmp_path_factory.mktemp("cli")
    shutil.copytree(tiny_run, folder / "run")
    np.save(folder / "mask.npy", np.ones((2,)))
    return folder


def test_cli_options_succeed_or_fail_clearly(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    runner = CliRunner()

    @PROPERTY
    @given(args=invocations())
    def check(args):
        res = runner.invoke(app, args)
        outcome = cli_outcome(res.exit_code, res.output, res.exception)
        event(f"{args[0]}: {outcome}")
        assert outcome in ("success", "clear error"), f"scoresde {' '.join(args)} -> {res.exit_code}: " \
                                                      f"{res.output[-1500:]} {res.exception!r}"

    check()
