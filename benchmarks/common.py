"""Shared helpers of the benchmark harness: where outputs go, what every output records, one plot set-up.

Every benchmark writes into one folder, ``out_dir(name)`` = ``<root>/<name>/``; the root is
``benchmarks/results`` for a full run, ``runs/bench-quick`` for a ``--quick`` run (so a smoke test never
overwrites the committed outputs), or whatever ``--out`` / ``$SCORESDE_BENCH_OUT`` names. Every JSON
carries an ``"environment"`` record (machine, torch version, CUDA device, git revision, date), every PNG
the same record in its text metadata, every markdown file a first-line comment; the harness also writes
``run.json`` (the command line, the options, the wall time) into the folder of each run.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
QUICK_ROOT = REPO / "runs" / "bench-quick"
ENV_VAR = "SCORESDE_BENCH_OUT"

_state = {"root": None, "quick": False}


def configure(root: str | Path | None = None, quick: bool = False) -> Path:
    """Set the output root of this process (the harness calls it once, before the benchmark runs)."""
    root = root or os.environ.get(ENV_VAR) or (QUICK_ROOT if quick else RESULTS)
    _state["root"], _state["quick"] = Path(root).resolve(), quick
    return _state["root"]


def quick() -> bool:
    return bool(_state["quick"])


def out_dir(name: str) -> Path:
    """The output folder of benchmark `name` (created)."""
    root = _state["root"] or configure()
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def scratch_dir(name: str, default: str | Path) -> Path:
    """Run folders a benchmark trains into: `default` (relative to the repository) for a full run, a
    ``runs/`` folder inside the output folder for a quick run (so it never resumes or clobbers real runs)."""
    return out_dir(name) / "runs" if quick() else REPO / default


def choice(allowed):
    """An argparse `type` for positional lists with a list default (argparse checks `choices` against the
    whole default list when none is given)."""
    def check(value: str) -> str:
        if value not in allowed:
            import argparse

            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(allowed)}")
        return value
    return check


def positive_int(value: str) -> int:
    """An argparse `type` for a count that must be at least 1."""
    import argparse

    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 1")
    return n


def sampler_label(method: str, options: dict) -> str:
    """A sampler's name in result rows: the method and its options, e.g. "dpm2m_sde grid=uniform"."""
    return method + "".join(f" {k}={v}" for k, v in options.items())


def add_device(ap, what: str = "every model trains and samples") -> None:
    """`--device` of the benchmarks that train or sample an image model."""
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                    help=f"where {what} (auto: cuda when available); the feature network and the metrics stay on "
                         "the CPU")


def device(args):
    """The torch.device of `--device` (cpu where the benchmark has none), or exit naming the option where it is
    not available; features and metrics are computed on the CPU."""
    from scoresde.core.errors import InvalidValueError
    from scoresde.running.build import resolve_device

    try:
        return resolve_device(getattr(args, "device", "cpu"))
    except InvalidValueError as e:
        raise SystemExit(f"--device {args.device}: {e}") from None


# ---- the environment record ----------------------------------------------------------------------------

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _static() -> dict:
    import torch

    cuda = None
    if torch.cuda.is_available():
        cuda = {"device": torch.cuda.get_device_name(), "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "machine": {"platform": platform.platform(), "node": platform.node(), "cpu": _cpu_model(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cuda": cuda,
        "git": {"revision": _git("rev-parse", "HEAD") or None, "dirty": bool(status)},
    }


def environment() -> dict:
    """Machine (platform, CPU model and count), torch version and threads, CUDA device if any, git revision
    (with a dirty flag for uncommitted changes to tracked files), date and whether the run was --quick."""
    import torch

    return {**_static(), "torch_threads": torch.get_num_threads(), "quick": quick(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---- outputs ---------------------------------------------------------------------------------------------

def _path(name: str, file: str | None, suffix: str) -> Path:
    return out_dir(name) / (file or f"{name}{suffix}")


def _plain(value: Any) -> Any:
    """JSON for what json does not know: numpy scalars and arrays, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def write_json(name: str, obj: Any, file: str | None = None, indent: int | None = 1) -> Path:
    """Write `obj` to out_dir(name)/file (default <name>.json) with the environment record: a dict gets an
    "environment" key, anything else is wrapped as {"environment": ..., "data": obj} (read_json unwraps)."""
    obj = json.loads(json.dumps(obj, default=_plain))
    payload = {"environment": environment(), **obj} if isinstance(obj, dict) else {"environment": environment(), "data": obj}
    path = _path(name, file, ".json")
    path.write_text(json.dumps(payload, indent=indent) + "\n")
    return path


def read_json(path: str | Path) -> Any:
    """The object write_json was given (files written before the harness, without a record, as they are)."""
    obj = json.loads(Path(path).read_text())
    if isinstance(obj, dict) and "environment" in obj:
        obj = dict(obj)
        obj.pop("environment")
        if set(obj) == {"data"}:
            return obj["data"]
    return obj


def write_text(name: str, file: str, text: str) -> Path:
    """A text output (markdown table, report); a .md file opens with the environment as an HTML comment."""
    path = _path(name, file, ".md")
    head = f"<!-- environment: {json.dumps(environment())} -->\n" if path.suffix == ".md" else ""
    path.write_text(head + text + ("" if text.endswith("\n") else "\n"))
    return path


def plt():
    """matplotlib.pyplot on the Agg backend with the benchmarks' one style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    pyplot.rcParams.update({"figure.dpi": 100, "savefig.dpi": 110, "savefig.bbox": "tight", "font.size": 9,
                            "axes.titlesize": 10, "legend.fontsize": 8, "axes.grid": False})
    return pyplot


def save_figure(fig, name: str, file: str, dpi: int | None = None) -> Path:
    """Save `fig` as out_dir(name)/file with the environment record in the PNG text metadata, close it and
    return the path."""
    env = environment()
    path = out_dir(name) / file
    meta = {"Software": f"scoresde benchmarks ({env['git']['revision'] or 'no git'})",
            "Description": json.dumps(env)} if path.suffix == ".png" else None
    fig.savefig(path, dpi=dpi or "figure", metadata=meta)
    plt().close(fig)
    return path


def record_png(path: str | Path) -> Path:
    """Add the environment record to a PNG written by other code (e.g. scoresde's own plotting helpers)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    env = environment()
    info = PngInfo()
    info.add_text("Software", f"scoresde benchmarks ({env['git']['revision'] or 'no git'})")
    info.add_text("Description", json.dumps(env))
    with Image.open(path) as im:
        im.load()
        im.save(path, pnginfo=info)
    return Path(path)
