"""Command-line interface (Typer); parses arguments and calls library functions only.

One error boundary (`_Boundary`) serves every command: an expected failure (a `ScoresdeError`, an OSError
from a file, running out of memory) prints one `error: ...` line naming the parameter or file and exits
with status 2 (a warning prints one `warning: ...` line); Ctrl-C prints "interrupted" and exits with 130 (a training run stopped by SIGINT / SIGTERM
after saving its checkpoint: 128 + the signal, 130 / 143); anything else is a bug: one line
"internal error: ..." and status 1. `scoresde --debug COMMAND ...` re-raises with the full traceback.
Typer's own usage errors (unknown option, bad number) print as Typer prints them (status 2)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from .core.errors import InvalidValueError, ScoresdeError, describe_os_error

EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


def _is_out_of_memory(err: BaseException) -> bool:
    """MemoryError (numpy), torch.OutOfMemoryError (CUDA), or torch's CPU allocator failing (a RuntimeError)."""
    torch = sys.modules.get("torch")
    return (isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError))
            or (type(err) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(err)))


def _message(err: BaseException, n: object) -> tuple[str, int]:
    """The line printed for an exception that reached the boundary, and the exit status."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(err, ScoresdeError) and isinstance(getattr(err, "signum", None), int):  # TrainingInterrupted
        return f"interrupted: {err}", 128 + err.signum
    if isinstance(err, ScoresdeError):
        return f"error: {err}", EXIT_ERROR
    if _is_out_of_memory(err):
        first = str(err).splitlines()[0].split("DefaultCPUAllocator: ")[-1] if str(err) else type(err).__name__
        return (f"error: out of memory{'' if n is None else f' for n={n}'}; lower --n / the batch size "
                f"({first})"), EXIT_ERROR
    if isinstance(err, OSError):
        return f"error: {describe_os_error(err)}", EXIT_ERROR
    first = str(err).splitlines()[0] if str(err) else ""
    return f"internal error: {type(err).__name__}: {first} (rerun with --debug for the traceback)", EXIT_INTERNAL


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


class _Boundary(TyperGroup):
    """The commands' group, whose `invoke` is the one error boundary of the CLI (module docstring)."""

    def invoke(self, ctx: typer.Context) -> object:
        args = [*ctx._protected_args, *ctx.args]  # the command and its arguments (consumed by invoke)
        try:
            with warnings.catch_warnings():
                if not ctx.params.get("debug"):  # one line per warning, without Python's file:line and source line
                    warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except (TyperException, typer.Exit, typer.Abort):  # usage errors, --help, exits: Typer prints them
            raise
        except (Exception, KeyboardInterrupt) as err:
            if ctx.params.get("debug"):
                raise
            line, status = _message(err, self._param(ctx, args, "n") if _is_out_of_memory(err) else None)
            typer.echo(line, err=True)
            raise typer.Exit(status) from None

    def _param(self, ctx: typer.Context, args: list[str], name: str) -> object:
        """The value of the command's parameter `name` in `args` (parsed again, leniently), or None."""
        try:
            _, cmd, rest = self.resolve_command(ctx, list(args))
            return cmd.make_context(cmd.name, rest, parent=ctx, resilient_parsing=True).params.get(name)
        except (TyperException, typer.Exit, typer.Abort):
            return None


app = typer.Typer(cls=_Boundary, help="scoresde: score-based diffusion models written as SDEs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="on an error, show the full traceback (errors exit "
                                                            "with 2, interruptions 130, internal errors 1)")) -> None:
    """scoresde: score-based diffusion models written as SDEs."""


def _at_least_one(name: str, value: int | None, run_default: str = "") -> None:
    if value is not None and value < 1:
        hint = f", or omit it for {run_default}" if run_default else ""
        raise InvalidValueError(f"{name} must be >= 1{hint}, got {value}")


def _check_guidance(label: int | None, guidance: float) -> None:
    if guidance < 0:
        raise InvalidValueError(f"--guidance must be >= 0 (classifier-free guidance weight w), got {guidance}")
    if guidance and label is None:
        raise InvalidValueError(f"--guidance {guidance:g} needs --label (it guides towards that class)")


DEMO = dict(name="demo", data="moons", sde="vp", net="mlp", net_args={"hidden": 128, "depth": 3},
            parametrization="eps", steps=4000, batch_size=256, lr=2e-3, warmup=100, lr_schedule="cosine",
            ema_decay=0.999, eval_every=0, checkpoint_every=1000, nfe=500, n_test=2000)


@app.command()
def train(config: Path = typer.Argument(..., help="YAML config (see configs/)"),
          overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. steps=2000 net_args.hidden=256"),
          restart: bool = typer.Option(False, help="start from step 0 even if the run folder holds a checkpoint")) -> None:
    """Train a score model (resumes from the run folder's checkpoint); under torchrun, data-parallel."""
    from .running.config import load_config
    from .running.runs import load_run, write_report
    from .running.trainers import trainer_for

    cfg = load_config(config, overrides or [])
    trainer = trainer_for(cfg)(cfg, resume=not restart).run()
    if trainer.rank == 0:
        _report(write_report(load_run(trainer.run_dir, device=trainer.device)))
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        # every rank waits for rank 0's report, then all tear down together: a gloo rank that destroys
        # its group while a peer is still connected can abort ("terminate called without an active exception");
        # the trainer's DDP model holds the group too, so it goes first, or the group outlives destroy_process_group
        # and is torn down at interpreter exit (that aborted a rank in 2 of 4 fresh-clone test runs under load)
        del trainer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _report(paths: dict) -> None:
    import json

    metrics = json.loads(paths["metrics"].read_text())
    typer.echo(f"W2 to held-out data {metrics['w2']:.4f} (finite-sample floor {metrics['w2_floor']:.4f}, "
               f"ratio {metrics['w2_ratio']:.2f}, n={metrics['w2_n']})")
    for name, path in paths.items():
        typer.echo(f"  {name:13s} {path}")


DEVICE_HELP = "cpu | cuda | auto (cuda where there is one); default: the run's config device"


def _device(device: str | None) -> str | None:
    """--device checked: one of cpu, cuda (where there is one), auto, or None (the run's config device)."""
    import torch

    if device not in (None, "cpu", "cuda", "auto"):
        raise InvalidValueError(f"--device must be one of cpu, cuda, auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError("--device cuda: CUDA is not available here; use --device cpu or auto")
    return device


def _open_run(run: Path, device: str | None):
    """`runs.load_run` on `device` (--device; None: the run's config device), and torch's thread count set to
    the run's `threads`."""
    import torch

    from .running.runs import load_run

    r = load_run(run, device=_device(device))
    torch.set_num_threads(r.cfg.threads)
    return r


SCHEDULE_HELP = ("auto | default. auto: ipndm / unipc2 / unipc3 / sa3 at nfe <= 10 (sa3 with tau > 0: nfe <= 20) on a "
                 "schedule searched once per model and nfe (about 11e6 score evaluations at nfe 5, 28e6 at nfe 10; "
                 "--search-draws shrinks it) and kept in the run folder; default: the fixed grid. Unset: auto where "
                 "it applies at nfe <= 10, else the fixed grid")
SEARCH_DRAWS_HELP = ("prior draws per stage of the automatic schedule's search (default 2048; implies --schedule "
                     "auto), kept in the run folder per size. Its cost is about linear in them; on held-out mixtures "
                     "the samples' MMD^2 grew 1.35x at 512 (a quarter of the cost) and 1.95x at 256 (geometric "
                     "means; benchmarks/RESULTS.md, session 46)")


def _check_schedule(schedule: str | None, search_draws: int | None = None) -> str | None:
    """--schedule checked, and set to auto by --search-draws (`sampling.entry.resolve_schedule`)."""
    from .sampling.entry import resolve_schedule

    if schedule not in (None, "default", "auto"):
        raise InvalidValueError(f"--schedule must be one of default, auto; got {schedule!r}")
    return resolve_schedule(schedule, search_draws, names=("--schedule default", "--search-draws"))


OPTION_HELP = ("a sampler option KEY=VALUE, repeatable: the method's own (sa3: tau=0.5; edm_sde: S_churn=10; "
               "noise=brownian) or grid, t_end, rho, power, denoise; the value is read as YAML (0.5, 1e-3, true, poly)")


GRID_KEYS = {key: "the grid: --fit-grid, --schedule auto, or grid / t_end / power / rho" for key in ("ts", "dtype")}


def _option_pairs(pairs: list[str] | None, *callees, also: tuple[str, ...] = (),
                  reserved: dict[str, str] | None = None) -> dict:
    """--option KEY=VALUE pairs as keyword options of the sampler (or of `finetune`'s method), which checks them
    against the method's (naming the method's options where one is unknown); the named arguments of `callees`
    (the functions the command calls: method, nfe, seed, ...) and `also` come from the command's own options,
    and `reserved` names keys that no --option sets, with where they come from instead (the samplers' GRID_KEYS)."""
    import inspect

    from .running.config import read_yaml

    own = {name for f in callees for name, p in inspect.signature(f).parameters.items()
           if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD} | set(also)
    options: dict = {}
    for pair in pairs or []:
        key, sep, text = (part.strip() for part in pair.partition("="))
        if not sep or not key.isidentifier():
            raise InvalidValueError(f"--option must be KEY=VALUE (e.g. tau=0.5), got {pair!r}")
        if key in (reserved or {}):
            raise InvalidValueError(f"--option {key} is not a command-line option ({reserved[key]})")
        if key in own:
            raise InvalidValueError(f"--option {key} is not an --option: the command sets it (see --help) or it "
                                    "is not settable here")
        if key in options:
            raise InvalidValueError(f"--option {key} is given twice")
        value = read_yaml(text, f"--option {key}") if text else None
        if isinstance(value, (list, dict)) or value is None:
            raise InvalidValueError(f"--option {key}: give a number, true / false or a word, got {text!r}")
        options[key] = value
    return options


def _schedule(r, schedule: str | None, method: str, nfe: int, n: int, eligible: bool = True,
              search_draws: int | None = None, **options) -> dict:
    """The sampler options (ts, denoise, analytic_first, prior_mean) of --schedule: the run's automatic schedule
    (searched on `search_draws` probe draws, None: the default) where asked for (refused, naming why, where it does
    not apply) or, unset, where it applies (`auto_applies`) and `eligible`; else none."""
    from .running.progress import counting_calls
    from .running.runs import SCHEDULES, auto_applies, run_schedule

    if schedule is None:
        schedule = "auto" if eligible and auto_applies(r, method=method, nfe=nfe, **options) else "default"
    if schedule == "default":
        return {"schedule": "default"}
    with counting_calls(r.model, f"automatic schedule of {method} at nfe {nfe} (once per model; --schedule "
                        "default skips it)", None, enable=r.cfg.progress):
        s, cached = run_schedule(r, method=method, nfe=nfe, n_probe=search_draws, **options)
    typer.echo(f"automatic schedule ({'cached in ' + SCHEDULES if cached else 'searched'}): {s.summary}; "
               f"cost {s.evaluations} "
               f"score evaluations, {s.seconds:.1f} s (the samples: {n * nfe})", err=True)
    return s.options


def _method(r, method: str | None, nfe: int | None, options: dict, label: int | None = None,
            schedule: str | None = None, fit_grid: int = 0) -> tuple[str, int]:
    """The method and nfe of --method / --nfe (unset: the run's); a named few-step --nfe without --method takes
    `running.runs.run_method`'s choice, said on stderr."""
    from .running.runs import run_method

    if method is None:
        method = r.cfg.sampler if fit_grid else run_method(r, nfe, label=label, schedule=schedule, **options)
        if method != r.cfg.sampler:
            typer.echo(f"--nfe {nfe} without --method: the run's sampler {r.cfg.sampler} has no automatic schedule; "
                       f"sampling with {method} on its automatic schedule (--method {r.cfg.sampler} keeps it)",
                       err=True)
    return method, nfe or r.cfg.nfe


@app.command()
def sample(run: Path = typer.Argument(..., help="run folder (holds config.yaml and checkpoint.safetensors)"),
           method: str = typer.Option(None, "--method", "--sampler", help="sampling method (scoresde.sampling.METHODS, "
                                      "or the run's family's own: ddpm, decoder; default: the run's sampler, or at a "
                                      "named --nfe <= 10 where it has no automatic schedule ipndm (nfe <= 5) / unipc2 "
                                      "on theirs)"),
           nfe: int = typer.Option(None, "--nfe", "--steps", help="score evaluations (default: the run's nfe)"),
           n: int = typer.Option(1000, "--n", help="number of samples"),
           out: Path = typer.Option(..., "--out", help=".npy / .npz (array) or .png (plot beside data)"),
           seed: int = typer.Option(0),
           label: int = typer.Option(None, "--label", help="class of a class-conditional run (net_args.n_classes)"),
           guidance: float = typer.Option(0.0, "--guidance", help="classifier-free guidance weight w >= 0 (with --label)"),
           fit_grid: int = typer.Option(0, "--fit-grid", help="fit the time grid to the model on this many probe "
                                        "prior draws first (sampling.fit_grid; deterministic methods, 0: off)"),
           schedule: str = typer.Option(None, "--schedule", help=SCHEDULE_HELP),
           search_draws: int = typer.Option(None, "--search-draws", help=SEARCH_DRAWS_HELP),
           option: list[str] = typer.Option(None, "--option", metavar="KEY=VALUE", help=OPTION_HELP),
           device: str = typer.Option(None, "--device", help=DEVICE_HELP)) -> None:
    """Draw samples from a trained run with its EMA weights (of one class with --label)."""
    from .running.files import check_writable, save_array
    from .running.progress import counting_calls
    from .running.runs import fit_run_grid, sample_run
    from .sampling import sample

    check_writable(out, suffixes=(".npy", ".npz", ".png"), name="--out")
    _at_least_one("--n", n)
    _check_guidance(label, guidance)
    asked = "--search-draws" if search_draws is not None else "--schedule auto"
    schedule = _check_schedule(schedule, search_draws)
    options = _option_pairs(option, sample, sample_run, reserved=GRID_KEYS)
    if fit_grid < 0:
        raise InvalidValueError(f"--fit-grid must be >= 0 (0: off), got {fit_grid}")
    if fit_grid and label is not None:
        raise InvalidValueError("--fit-grid fits an unconditional model's grid; it does not combine with --label")
    if fit_grid and schedule == "auto":
        raise InvalidValueError(f"--fit-grid and {asked} both choose the time grid; pass one of them")
    if label is not None and schedule == "auto":
        raise InvalidValueError(f"{asked}: the automatic schedule is searched for the unconditional model; it does "
                                "not combine with --label")
    r = _open_run(run, device)
    _at_least_one("--nfe", nfe, f"the run's nfe {r.cfg.nfe}")
    method, nfe = _method(r, method, nfe, options, label, schedule, fit_grid)
    held_out = r.data.test[:n] if out.suffix == ".png" else None  # the plot's data, before sampling
    if fit_grid:
        fitted = fit_run_grid(r, method=method, nfe=nfe, n_probe=fit_grid, seed=seed, **options)
        options["ts"] = fitted.ts
        typer.echo(f"fitted grid: probe error {fitted.start_error:.3g} -> {fitted.error:.3g}, on check draws "
                   f"{fitted.check_start_error:.3g} -> {fitted.check_error:.3g}: "
                   f"{'fitted grid' if fitted.fitted else 'the default grid (the fit lost on the check draws)'} "
                   f"({fitted.evaluations} probe-batch evaluations); times {[round(t, 4) for t in fitted.ts.tolist()]}")
    options.update(_schedule(r, schedule, method, nfe, n, eligible=not fit_grid and label is None,
                             search_draws=search_draws, **options))
    calls = nfe * (2 if label is not None and guidance else 1)
    with counting_calls(r.model, f"sampling {method}", calls, enable=r.cfg.progress):
        x, _ = sample_run(r, n, method=method, nfe=nfe, seed=seed, label=label, guidance=guidance, **options)
    if held_out is not None:
        from .running.plots import plot_samples

        plot_samples(x, held_out, out, title=f"{r.cfg.name}: {method}, nfe {nfe}")
    else:
        save_array(out, x)
    typer.echo(f"{n} samples -> {out}")


@app.command()
def inpaint(run: Path = typer.Argument(..., help="run folder of a score model on images"),
            mask: Path = typer.Option(..., "--mask", help=".npy (nonzero = known) or .png (bright = known), shape (H, W) "
                                                            "or (C, H, W)"),
            out: Path = typer.Option(..., "--out", help=".png (masked, inpainted, original) or .npy (inpainted)"),
            n: int = typer.Option(16, "--n", help="held-out images to inpaint"),
            method: str = typer.Option(None, "--method", "--sampler", help="sampling method (default: the run's)"),
            nfe: int = typer.Option(None, "--nfe", "--steps", help="score evaluations (default: the run's nfe)"),
            how: str = typer.Option("tweedie", "--how", help="tweedie (default: the h-transform, exact for Gaussian "
                                                             "data, CG solves per step), replace (Song et al.: one "
                                                             "score call per step, biased at any NFE) or smc (twisted "
                                                             "SMC: exact for any data as --particles grow; em or ei)"),
            particles: int = typer.Option(None, "--particles", help="smc: particles per image (default 8; each "
                                                                     "costs nfe score evaluations with gradients)"),
            cg_iters: int = typer.Option(None, "--cg-iters", help="tweedie: CG iterations per step (default 5; more "
                                                                   "trust the learned covariance further, see docs)"),
            weight: float = typer.Option(1.0, "--weight", help="tweedie: likelihood weight w, the score of p_t(x) "
                                                                "p(known | x_t)^w (1: the exact h-transform; 4-8 "
                                                                "recovered MNIST digit classes far more often); smc: "
                                                                "the twisting weight (any w stays exact)"),
            seed: int = typer.Option(0),
            option: list[str] = typer.Option(None, "--option", metavar="KEY=VALUE",
                                             help=OPTION_HELP + "; --how smc: sigma_y, ess_min"),
            device: str = typer.Option(None, "--device", help=DEVICE_HELP)) -> None:
    """Fill the unknown pixels of the run's first n held-out images with any sampler (scoresde.sampling.guidance)."""
    from .running.files import check_writable, save_array
    from .running.plots import save_grid
    from .running.progress import counting_calls
    from .running.runs import inpaint_run
    from .sampling.guidance import inpaint as inpaint_images
    from .sampling.methods import sample_on_grid

    check_writable(out, suffixes=(".npy", ".png"), name="--out")
    _at_least_one("--n", n)
    options = _option_pairs(option, inpaint_run, inpaint_images, sample_on_grid, also=("particles",), reserved=GRID_KEYS)
    r = _open_run(run, device)
    _at_least_one("--nfe", nfe, f"the run's nfe {r.cfg.nfe}")
    _at_least_one("--cg-iters", cg_iters, "the default 5")
    if not weight > 0 or weight == float("inf"):
        raise InvalidValueError(f"--weight must be a finite number > 0, got {weight}")
    if how == "replace" and weight != 1:
        raise InvalidValueError(f"--weight applies to --how tweedie and smc only (replace has no likelihood term), "
                                f"got {weight}")
    _at_least_one("--particles", particles, "the default 8")
    if particles is not None and how != "smc":
        raise InvalidValueError(f"--particles applies to --how smc only, got --how {how}")
    with counting_calls(r.model, f"inpainting ({how})", nfe or r.cfg.nfe, enable=r.cfg.progress):
        known, m, x = inpaint_run(r, mask, n, how=how, method=method, nfe=nfe, seed=seed, weight=weight,
                                  **({} if cg_iters is None else {"cg_iters": cg_iters}),
                                  **({} if particles is None else {"particles": particles}), **options)
    if out.suffix == ".png":
        save_grid([m * known, x, known], out, ["known", "inpainted", "original"], cols=n)
    else:
        save_array(out, x)
    typer.echo(f"{known.shape[0]} inpainted images -> {out}")


@app.command()
def evaluate(run: Path = typer.Argument(..., help="run folder"),
             n: int = typer.Option(None, "--n", help="samples (default: 2 n_eval, at most the held-out size)"),
             method: str = typer.Option(None, "--method", "--sampler", help="sampling method (default: as for "
                                        "`sample`)"),
             nfe: int = typer.Option(None, "--nfe", "--steps", help="score evaluations (default: the run's nfe)"),
             seed: int = typer.Option(0),
             schedule: str = typer.Option(None, "--schedule", help=SCHEDULE_HELP),
             search_draws: int = typer.Option(None, "--search-draws", help=SEARCH_DRAWS_HELP),
             option: list[str] = typer.Option(None, "--option", metavar="KEY=VALUE", help=OPTION_HELP),
             device: str = typer.Option(None, "--device", help=DEVICE_HELP)) -> None:
    """W2 to held-out data with its floor, MMD^2, for analytic data TV and the T 5.2 bound from the measured
    score error, and for the built-in image sets (digits, mnist) FID-style with its floor, KID and k-NN
    precision / recall on a download-free feature network (trained once into runs/features; not comparable
    with Inception FIDs); writes RUN/eval.json."""
    import json

    from .evaluation.metrics import check_mmd2_memory
    from .running.files import check_writable, save_json
    from .running.runs import evaluate_run, sample_run
    from .sampling import sample

    check_writable(run / "eval.json")
    _at_least_one("--n", n, "the default: 2 n_eval, at most the held-out size")
    schedule = _check_schedule(schedule, search_draws)
    options = _option_pairs(option, sample, sample_run, evaluate_run, reserved=GRID_KEYS)
    r = _open_run(run, device)
    _at_least_one("--nfe", nfe, f"the run's nfe {r.cfg.nfe}")
    if n is not None:  # refuse before sampling what the MMD's kernel matrices could not hold
        check_mmd2_memory(n, None if r.data.mixture is not None else min(n, r.data.test.shape[0]))
    method, nfe = _method(r, method, nfe, options, schedule=schedule)
    grid = _schedule(r, schedule, method, nfe, n or r.cfg.n_eval * 2, search_draws=search_draws, **options)
    metrics = {**evaluate_run(r, n, method=method, nfe=nfe, seed=seed, **options, **grid),
               "schedule": grid.get("schedule", "auto"), "options": options}
    if search_draws is not None:
        metrics["search_draws"] = search_draws
    save_json(run / "eval.json", metrics)
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def likelihood(run: Path = typer.Argument(..., help="run folder"),
               data: str = typer.Option("", "--data", help="data source as in configs (default: the run's held-out set)"),
               n: int = typer.Option(500, "--n", help="number of points evaluated"),
               divergence: str = typer.Option("auto", help="exact | hutchinson-gaussian | hutchinson-rademacher | "
                                                           "auto (exact up to 32 dimensions)"),
               rtol: float = typer.Option(1e-6, help="ODE relative tolerance (1e-6, the library default: < 0.01 "
                                                     "nats per point even in the tails of the benchmark mixtures)"),
               atol: float = typer.Option(1e-6, help="ODE absolute tolerance"),
               batch_size: int = typer.Option(256, help="points per ODE solve"),
               seed: int = typer.Option(0),
               device: str = typer.Option(None, "--device", help=DEVICE_HELP)) -> None:
    """Mean NLL (and bits/dim for 8-bit images) with a 95% CI through the probability-flow ODE of the
    run's EMA model, at the SDE's t_min; writes RUN/likelihood.json."""
    from .running.files import check_writable, save_json
    from .running.progress import counting_calls
    from .running.runs import likelihood_run

    check_writable(run / "likelihood.json")
    r = _open_run(run, device)
    with counting_calls(r.model, "likelihood (adaptive ODE)", enable=r.cfg.progress):
        out = likelihood_run(r, data=data, n=n, seed=seed, divergence=divergence, batch_size=batch_size,
                             rtol=rtol, atol=atol)
    save_json(run / "likelihood.json", out)
    typer.echo(f"{out['n']} points of {out['data']}, {out['dim']} dims; {out['divergence']} divergence, "
               f"t_min {out['t_min']:g}, {out['nfe_per_batch']:.0f} NFE per batch")
    typer.echo(f"NLL = {out['nll']:.4f} +- {out['nll_ci']:.4f} nats (95% CI) = {out['nll_per_dim']:.4f} nats/dim")
    if out["eight_bit"]:
        typer.echo(f"bits/dim = {out['bpd']:.4f} +- {out['bpd_ci']:.4f} (uniform dequantisation, Gaussian decoder)")
    else:
        typer.echo("bits/dim: not reported (the data are not 8-bit images); NLL is of the density p_{t_min}")


@app.command()
def demo(out: str = typer.Option("runs", help="parent folder of runs/demo"),
         steps: int = typer.Option(DEMO["steps"], help="training steps")) -> None:
    """Train a VP score model on 2-D two moons on CPU (a few minutes), sample it, write plots and W2."""
    from .running.config import Config
    from .running.runs import load_run, write_report
    from .running.train import Trainer

    cfg = Config(**{**DEMO, "out": out, "steps": steps, "warmup": min(DEMO["warmup"], steps)})
    typer.echo(f"training {cfg.steps} steps ({cfg.sde}, {cfg.net}, {cfg.data}) into {cfg.run_dir} ...")
    trainer = Trainer(cfg, resume=False).run()
    _report(write_report(load_run(trainer.run_dir, device=trainer.device)))


@app.command()
def tour() -> None:
    """A short tour: forward SDEs and their exact marginals on an analytic mixture."""
    import torch

    from .core import sde as S
    from .core.targets import ring

    torch.set_num_threads(1)
    mix = ring()
    for sde in (S.VP(), S.SubVP(), S.VE(), S.VEEDM(), S.OU(), S.ContractiveOU(), S.ContractiveVP()):
        t = torch.tensor(sde.T, dtype=torch.float64)
        typer.echo(f"{type(sde).__name__:14s} alpha(T)={float(sde.alpha(t)):9.3g} sigma(T)={float(sde.sigma(t)):9.3g} "
                   f"prior std={sde.prior_std:9.3g}  E log p_T(x_T)={float(mix.at_time(sde, t).log_prob(mix.at_time(sde, t).sample(2000)).mean()):8.3f}")


# the loop options `scoresde finetune` passes unless told otherwise (benchmarks/alignment.py --parts default-method)
FINETUNE_DEFAULTS = {"steps": 200, "batch_size": 256, "n_time_steps": 50, "lr": 1e-3}


def _reward_help() -> str:
    from .models.rewards import REWARDS

    return f"one of {', '.join(REWARDS.names())} (scoresde.models.rewards.REWARDS; class takes a classifier: Python only)"


@app.command()
def finetune(run: Path = typer.Argument(..., help="run folder of a trained score model"),
             reward: str = typer.Option(..., "--reward", help=_reward_help()),
             param: list[str] = typer.Option([], "--param", help="reward parameter key=value, repeatable: c=0,1 "
                                             "points=0,1;1,0 low=0,0 high=1,1 sharpness=10"),
             beta: float = typer.Option(None, "--beta", help="weight > 0 of the path KL to the pretrained model "
                                        "(required by pg, ce, adjoint, dpok; optional for draft; not for ddpo)"),
             method: str = typer.Option("pg", "--method", help="pg (KL-regularised policy gradient) | ce "
                                        "(reward-weighted denoising score matching) | adjoint (adjoint matching) | "
                                        "dpok | draft (DRaFT-K) | ddpo"),
             k: int = typer.Option(None, "--k", help="draft: backpropagate through the last K steps (default all)"),
             out: Path = typer.Option(None, "--out", help="new run folder (default: RUN-finetuned)"),
             steps: int = typer.Option(FINETUNE_DEFAULTS["steps"], help="training iterations (one rollout each)"),
             batch_size: int = typer.Option(FINETUNE_DEFAULTS["batch_size"], "--batch-size"),
             n_time_steps: int = typer.Option(FINETUNE_DEFAULTS["n_time_steps"], "--n-time-steps",
                                              help="Euler-Maruyama steps of the rollouts"),
             lr: float = typer.Option(FINETUNE_DEFAULTS["lr"]), baseline: str = typer.Option(None, help="pg: value (default; also evaluates the reward "
                                                                        "at every rollout state) | critic | mean | none"),
             option: list[str] = typer.Option(None, "--option", help="another option of the method, KEY=VALUE, "
                                              "repeatable: lr_final=1e-4, fit_steps=4 (ce), clip=0.2 (dpok), ..."),
             n: int = typer.Option(2000, "--n", help="samples drawn before and after"),
             seed: int = typer.Option(0),
             device: str = typer.Option(None, "--device", help=DEVICE_HELP)) -> None:
    """Fine-tune a run against a reward into a new run folder: KL-regularised continuous-time RL (pg, DESIGN 9),
    reward-weighted denoising score matching (ce), adjoint matching, DPOK, DRaFT-K or DDPO."""
    from .models.rewards import parse_reward
    from .running.files import check_writable
    from .running.finetune import finetune_run, method_options

    out = out or run.parent / f"{run.name}-finetuned"
    check_writable(out / "config.yaml", name="--out")
    _at_least_one("--n", n)
    loop = dict(steps=steps, batch_size=batch_size, n_time_steps=n_time_steps, lr=lr, baseline=baseline)
    options = method_options(method, beta=beta, k=k, **loop, **_option_pairs(option, method_options, also=tuple(loop)))
    res = finetune_run(run, out, parse_reward(reward, param), options, n_samples=n, seed=seed,
                       device=_device(device))
    typer.echo(f"mean reward {res['reward_before']:.4f} -> {res['reward_after']:.4f}, path KL {res['kl']:.4f}")
    for name, path in res["paths"].items():
        typer.echo(f"  {name:15s} {path}")


@app.command()
def export(run: Path = typer.Argument(..., help="run folder (holds config.yaml and checkpoint.safetensors)"),
           out: Path = typer.Argument(..., help="folder for model.safetensors (EMA weights) and model.json")) -> None:
    """Write a run's EMA weights and what rebuilds its model (scoresde.load_model reads them back)."""
    from .running.export import WEIGHTS, export_run
    from .running.files import check_writable

    check_writable(out / WEIGHTS, name="export OUT")
    for name, path in export_run(run, out).items():
        typer.echo(f"  {name:8s} {path}")


@app.command()
def version() -> None:
    """Print the version."""
    from . import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
