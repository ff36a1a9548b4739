"""Command-line interface (Typer); parses arguments and calls library functions only."""
from __future__ import annotations

from pathlib import Path

import typer

from .core.errors import InvalidValueError

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
    from .running.config import load_config
    from .running.runs import load_run, write_report
    from .running.train import NonFiniteLoss
    from .running.trainers import trainer_for

    try:
        cfg = load_config(config, overrides or [])
        trainer = trainer_for(cfg)(cfg, resume=not restart).run()
        if trainer.rank == 0:
            _report(write_report(load_run(trainer.run_dir)))
    except (ValueError, NonFiniteLoss) as err:
        _fail(err)
    import torch.distributed as dist

    if dist.is_initialized():
        # every rank waits for rank 0's report, then all tear down together: a gloo rank that destroys
        # its group while a peer is still connected can abort ("terminate called without an active exception")
        dist.barrier()
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
           method: str = typer.Option("em", "--method", "--sampler", help="sampling method (scoresde.sampling.METHODS, "
                                      "or the run's family's own: ddpm, decoder)"),
           nfe: int = typer.Option(500, "--nfe", "--steps", help="score evaluations"),
           n: int = typer.Option(1000, "--n", help="number of samples"),
           out: Path = typer.Option(..., "--out", help=".npy / .npz (array) or .png (plot beside data)"),
           seed: int = typer.Option(0),
           label: int = typer.Option(None, "--label", help="class of a class-conditional run (net_args.n_classes)"),
           guidance: float = typer.Option(0.0, "--guidance", help="classifier-free guidance weight w (with --label)"),
           fit_grid: int = typer.Option(0, "--fit-grid", help="fit the time grid to the model on this many probe "
                                        "prior draws first (sampling.fit_grid; deterministic methods, 0: off)")) -> None:
    """Draw samples from a trained run with its EMA weights (of one class with --label)."""
    from .running.runs import fit_run_grid, load_run, sample_run

    try:
        if out.suffix not in (".npy", ".npz", ".png"):
            raise InvalidValueError(f"--out must end in .npy, .npz or .png, got {str(out)!r}")
        if fit_grid < 0:
            raise InvalidValueError(f"--fit-grid must be >= 0 (0: off), got {fit_grid}")
        if fit_grid and label is not None:
            raise InvalidValueError("--fit-grid fits an unconditional model's grid; it does not combine with --label")
        r = load_run(run)
        options = {}
        if fit_grid:
            fitted = fit_run_grid(r, method=method, nfe=nfe, n_probe=fit_grid, seed=seed)
            options["ts"] = fitted.ts
            typer.echo(f"fitted grid: probe error {fitted.start_error:.3g} -> {fitted.error:.3g} "
                       f"({fitted.evaluations} probe-batch evaluations); times {[round(t, 4) for t in fitted.ts.tolist()]}")
        x, _ = sample_run(r, n, method=method, nfe=nfe, seed=seed, label=label, guidance=guidance, **options)
    except ValueError as err:
        _fail(err)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        from .running.plots import plot_samples

        plot_samples(x, r.data.test[:n], out, title=f"{r.cfg.name}: {method}, nfe {nfe}")
    else:
        import numpy as np

        (np.save if out.suffix == ".npy" else np.savez)(out, x.numpy())
    typer.echo(f"{n} samples -> {out}")


@app.command()
def inpaint(run: Path = typer.Argument(..., help="run folder of a score model on images"),
            mask: Path = typer.Option(..., "--mask", help=".npy (nonzero = known) or .png (bright = known), shape (H, W) "
                                                            "or (C, H, W)"),
            out: Path = typer.Option(..., "--out", help=".png (masked, inpainted, original) or .npy (inpainted)"),
            n: int = typer.Option(16, "--n", help="held-out images to inpaint"),
            method: str = typer.Option("em", "--method", "--sampler", help="sampling method"),
            nfe: int = typer.Option(200, "--nfe", "--steps", help="score evaluations"),
            how: str = typer.Option("tweedie", "--how", help="tweedie (default: the h-transform, exact for Gaussian "
                                                             "data, CG solves per step) or replace (Song et al.: one "
                                                             "score call per step, biased at any NFE)"),
            seed: int = typer.Option(0)) -> None:
    """Fill the unknown pixels of the run's first n held-out images with any sampler (scoresde.sampling.guidance)."""
    from .running.plots import save_grid
    from .running.runs import inpaint_run, load_run

    try:
        if out.suffix not in (".npy", ".png"):
            raise InvalidValueError(f"--out must end in .npy or .png, got {str(out)!r}")
        known, m, x = inpaint_run(load_run(run), mask, n, how=how, method=method, nfe=nfe, seed=seed)
    except ValueError as err:
        _fail(err)
    if out.suffix == ".png":
        save_grid([m * known, x, known], out, ["known", "inpainted", "original"], cols=n)
    else:
        import numpy as np

        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, x.numpy())
    typer.echo(f"{known.shape[0]} inpainted images -> {out}")


@app.command()
def evaluate(run: Path = typer.Argument(..., help="run folder"),
             n: int = typer.Option(0, help="samples (0: 2 n_eval, at most the held-out size)"),
             method: str = typer.Option("", "--method", "--sampler", help="sampling method (default: the run's)"),
             nfe: int = typer.Option(0, "--nfe", "--steps", help="score evaluations (0: the run's nfe)"),
             seed: int = typer.Option(0)) -> None:
    """W2 to held-out data with its floor, MMD^2, and for analytic data TV and the T 5.2 bound from the
    measured score error; writes RUN/eval.json."""
    import json

    from .running.files import atomic_write
    from .running.runs import evaluate_run, load_run

    try:
        metrics = evaluate_run(load_run(run), n or None, method=method or None, nfe=nfe or None, seed=seed)
    except ValueError as err:
        _fail(err)
    text = json.dumps(metrics, indent=2)
    atomic_write(run / "eval.json", (text + "\n").encode())
    typer.echo(text)


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
               seed: int = typer.Option(0)) -> None:
    """Mean NLL (and bits/dim for 8-bit images) with a 95% CI through the probability-flow ODE of the
    run's EMA model, at the SDE's t_min; writes RUN/likelihood.json."""
    import json

    from .running.files import atomic_write
    from .running.runs import likelihood_run, load_run

    try:
        out = likelihood_run(load_run(run), data=data, n=n, seed=seed, divergence=divergence, batch_size=batch_size,
                             rtol=rtol, atol=atol)
    except ValueError as err:
        _fail(err)
    atomic_write(run / "likelihood.json", (json.dumps(out, indent=2) + "\n").encode())
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

    cfg = Config(**{**DEMO, "out": out, "steps": steps})
    typer.echo(f"training {cfg.steps} steps ({cfg.sde}, {cfg.net}, {cfg.data}) into {cfg.run_dir} ...")
    trainer = Trainer(cfg, resume=False).run()
    _report(write_report(load_run(trainer.run_dir)))


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


@app.command()
def finetune(run: Path = typer.Argument(..., help="run folder of a trained score model"),
             reward: str = typer.Option(..., "--reward", help="scoresde.rewards.REWARDS: linear, distance, region"),
             param: list[str] = typer.Option([], "--param", help="reward parameter key=value, repeatable: c=0,1 "
                                             "points=0,1;1,0 low=0,0 high=1,1 sharpness=10"),
             beta: float = typer.Option(..., "--beta", help="weight of the path KL to the pretrained model"),
             out: Path = typer.Option(None, "--out", help="new run folder (default: RUN-finetuned)"),
             steps: int = typer.Option(200, help="policy-gradient iterations"),
             batch_size: int = typer.Option(256, "--batch-size"),
             n_time_steps: int = typer.Option(50, "--n-time-steps", help="Euler-Maruyama steps of the rollouts"),
             lr: float = typer.Option(1e-3), baseline: str = typer.Option("value", help="value | mean | none"),
             n: int = typer.Option(2000, "--n", help="samples drawn before and after"),
             seed: int = typer.Option(0)) -> None:
    """Fine-tune a run against a reward (KL-regularised continuous-time RL, DESIGN 9) into a new run folder."""
    from .models.alignment import FinetuneOptions
    from .models.rewards import parse_reward
    from .running.finetune import finetune_run

    try:
        out = out or run.parent / f"{run.name}-finetuned"
        options = FinetuneOptions(beta=beta, steps=steps, batch_size=batch_size, n_time_steps=n_time_steps, lr=lr,
                                  baseline=baseline)
        res = finetune_run(run, out, parse_reward(reward, param), options, n_samples=n, seed=seed)
    except ValueError as err:
        _fail(err)
    typer.echo(f"mean reward {res['reward_before']:.4f} -> {res['reward_after']:.4f}, path KL {res['kl']:.4f}")
    for name, path in res["paths"].items():
        typer.echo(f"  {name:15s} {path}")


@app.command()
def export(run: Path = typer.Argument(..., help="run folder (holds config.yaml and checkpoint.safetensors)"),
           out: Path = typer.Argument(..., help="folder for model.safetensors (EMA weights) and model.json")) -> None:
    """Write a run's EMA weights and what rebuilds its model (scoresde.load_model reads them back)."""
    from .running.export import export_run

    try:
        paths = export_run(run, out)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    for name, path in paths.items():
        typer.echo(f"  {name:8s} {path}")


@app.command()
def version() -> None:
    """Print the version."""
    from . import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
