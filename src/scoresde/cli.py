"""Command-line interface (Typer); parses arguments and calls library functions only."""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="scoresde: score-based diffusion models written as SDEs.", no_args_is_help=True)


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


DEMO = dict(name="demo", data="moons", sde="vp", net="mlp", net_args={"hidden": 128, "depth": 3},
            parametrization="eps", steps=4000, batch_size=256, lr=2e-3, warmup=100, lr_schedule="cosine",
            ema_decay=0.999, eval_every=0, checkpoint_every=1000, nfe=500, n_test=2000)


@app.command()
def train(config: Path = typer.Argument(..., help="YAML config (see configs/)"),
          overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. steps=2000 net_args.hidden=256"),
          restart: bool = typer.Option(False, help="start from step 0 even if the run folder holds a checkpoint")) -> None:
    """Train a score model (resumes from the run folder's checkpoint); under torchrun, data-parallel."""
    from .config import load_config
    from .runs import load_run, write_report
    from .train import NonFiniteLoss, Trainer

    try:
        trainer = Trainer(load_config(config, overrides or []), resume=not restart).run()
        if trainer.rank == 0:
            _report(write_report(load_run(trainer.run_dir)))
    except (ValueError, NonFiniteLoss) as err:
        _fail(err)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _report(paths: dict) -> None:
    import json

    metrics = json.loads(paths["metrics"].read_text())
    typer.echo(f"W2 to held-out data {metrics['w2']:.4f} (finite-sample floor {metrics['w2_floor']:.4f}, "
               f"ratio {metrics['w2_ratio']:.2f}, n={metrics['w2_n']})")
    for name, path in paths.items():
        typer.echo(f"  {name:13s} {path}")


@app.command()
def sample(run: Path = typer.Argument(..., help="run folder (holds config.yaml and checkpoint.safetensors)"),
           method: str = typer.Option("em", "--method", "--sampler", help="sampling method (scoresde.samplers.METHODS)"),
           nfe: int = typer.Option(500, "--nfe", "--steps", help="score evaluations"),
           n: int = typer.Option(1000, "--n", help="number of samples"),
           out: Path = typer.Option(..., "--out", help=".npy / .npz (array) or .png (plot beside data)"),
           seed: int = typer.Option(0)) -> None:
    """Draw samples from a trained run with its EMA weights."""
    from .runs import load_run, sample_run

    try:
        if out.suffix not in (".npy", ".npz", ".png"):
            raise ValueError(f"--out must end in .npy, .npz or .png, got {str(out)!r}")
        r = load_run(run)
        x, _ = sample_run(r, n, method=method, nfe=nfe, seed=seed)
    except ValueError as err:
        _fail(err)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        from .plots import plot_samples

        plot_samples(x, r.data.test[:n], out, title=f"{r.cfg.name}: {method}, nfe {nfe}")
    else:
        import numpy as np

        (np.save if out.suffix == ".npy" else np.savez)(out, x.numpy())
    typer.echo(f"{n} samples -> {out}")


@app.command()
def evaluate(run: Path = typer.Argument(..., help="run folder"),
             n: int = typer.Option(0, help="samples (0: 2 n_eval, at most the held-out size)"),
             method: str = typer.Option("", "--method", "--sampler", help="sampling method (default: the run's)"),
             nfe: int = typer.Option(0, "--nfe", "--steps", help="score evaluations (0: the run's nfe)"),
             seed: int = typer.Option(0)) -> None:
    """W2 of samples to held-out data with its finite-sample floor; writes RUN/eval.json."""
    import json

    from .config import atomic_write
    from .runs import evaluate_run, load_run

    try:
        metrics = evaluate_run(load_run(run), n or None, method=method or None, nfe=nfe or None, seed=seed)
    except ValueError as err:
        _fail(err)
    text = json.dumps(metrics, indent=2)
    atomic_write(run / "eval.json", (text + "\n").encode())
    typer.echo(text)


@app.command()
def demo(out: str = typer.Option("runs", help="parent folder of runs/demo"),
         steps: int = typer.Option(DEMO["steps"], help="training steps")) -> None:
    """Train a VP score model on 2-D two moons on CPU (a few minutes), sample it, write plots and W2."""
    from .config import Config
    from .runs import load_run, write_report
    from .train import Trainer

    cfg = Config(**{**DEMO, "out": out, "steps": steps})
    typer.echo(f"training {cfg.steps} steps ({cfg.sde}, {cfg.net}, {cfg.data}) into {cfg.run_dir} ...")
    trainer = Trainer(cfg, resume=False).run()
    _report(write_report(load_run(trainer.run_dir)))


@app.command()
def tour() -> None:
    """A short tour: forward SDEs and their exact marginals on an analytic mixture."""
    import torch

    from . import sde as S
    from .targets import ring

    torch.set_num_threads(1)
    mix = ring()
    for sde in (S.VP(), S.SubVP(), S.VE(), S.VEEDM(), S.OU(), S.ContractiveOU(), S.ContractiveVP()):
        t = torch.tensor(sde.T, dtype=torch.float64)
        typer.echo(f"{type(sde).__name__:14s} alpha(T)={float(sde.alpha(t)):9.3g} sigma(T)={float(sde.sigma(t)):9.3g} "
                   f"prior std={sde.prior_std:9.3g}  E log p_T(x_T)={float(mix.at_time(sde, t).log_prob(mix.at_time(sde, t).sample(2000)).mean()):8.3f}")


@app.command()
def version() -> None:
    """Print the version."""
    from . import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
