"""python -m benchmarks NAME [--quick] [--out DIR] [the benchmark's own options]; python -m benchmarks --list."""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads BLAS: idle BLAS threads spin on the shared cores

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from benchmarks import BENCHMARKS, common  # noqa: E402


def module(name: str):
    return importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")


def summary(name: str) -> str:
    doc = module(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def parser_for(name: str, mod) -> argparse.ArgumentParser:
    doc = (mod.__doc__ or "").strip()
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc.splitlines()[0] if doc else None,
                                epilog=f"outputs: benchmarks/results/{name}/ (--quick: runs/bench-quick/{name}/)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the code path, not a result")
    p.add_argument("--out", default=None, help=f"output root (default benchmarks/results, or ${common.ENV_VAR})")
    mod.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                  usage="python -m benchmarks (--list | NAME [--quick] [options])")
    top.add_argument("--list", action="store_true", help="list the benchmarks")
    top.add_argument("name", nargs="?", choices=sorted(BENCHMARKS), metavar="NAME")
    top.add_argument("rest", nargs=argparse.REMAINDER)
    ns = top.parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    if ns.list or not ns.name:
        if not ns.list:
            top.print_usage()
        width = max(map(len, BENCHMARKS))
        for name in BENCHMARKS:
            print(f"{name:<{width}}  {summary(name)}")
        return 0
    name, rest = ns.name, argv[1:]
    mod = module(name)
    parser = parser_for(name, mod)
    if "--quick" in rest:
        parser.set_defaults(**getattr(mod, "QUICK", {}))
    args = parser.parse_args(rest)
    common.configure(args.out, args.quick)
    import torch

    torch.set_num_threads(1)
    tag = mod.run_tag(args) if hasattr(mod, "run_tag") else ""
    stem = f"run-{tag}" if tag else "run"
    log = common.out_dir(name) / f"{stem}.log"
    # the log so far, one per process (two runs of one name side by side keep theirs); it replaces the last one
    # when the run ends
    partial = log.with_name(f"{log.name}.{os.getpid()}.partial")
    tic = time.perf_counter()
    with open(partial, "w") as fh, contextlib.redirect_stdout(_Tee(sys.stdout, fh)):
        mod.run(args)
    os.replace(partial, log)
    common.write_json(name, {"benchmark": name, "command": f"python -m benchmarks {' '.join([name, *rest])}",
                             "options": vars(args), "seconds": round(time.perf_counter() - tic, 1),
                             "log": log.name}, file=f"{stem}.json")
    print(f"outputs: {common.out_dir(name)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
