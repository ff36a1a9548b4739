"""scoresde: score-based diffusion models written as stochastic differential equations."""
from . import sde, targets
from . import families  # noqa: F401  (completes the registries: losses ddpm/ncsn/vae, sampler "consistency")
from .sde import OU, VE, VEEDM, VP, ContractiveOU, ContractiveVP, Langevin, SubVP

__version__ = "0.1.0"
__all__ = ["sde", "targets", "OU", "VE", "VEEDM", "VP", "SubVP", "ContractiveOU", "ContractiveVP", "Langevin"]
