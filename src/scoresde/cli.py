"""Command-line interface (Typer); parses arguments and calls library functions only."""
from __future__ import annotations

import typer

app = typer.Typer(help="scoresde: score-based diffusion models written as SDEs.", no_args_is_help=True)


@app.command()
def demo() -> None:
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
