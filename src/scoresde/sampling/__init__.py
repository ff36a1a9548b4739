"""Sampling layer: the samplers behind `sample` (DESIGN section 4), likelihood through the probability
flow, guidance and inpainting, and consistency sampling."""
from .consistency import ConsistencyModel, consistency_sample
from .ddim import ddim, ddpm
from .grids import GRIDS, end_time_for_steps, time_grid
from .entry import sample
from .methods import METHODS, Method, default_denoise, sample_on_grid, steps_for
from .ode import dopri5, dpm_solver_multistep, heun, ode_euler
from .pc import annealed_langevin, predictor_corrector
from .schedule import Schedule, auto_schedule
from .stochastic import euler_maruyama, exponential_integrator
from .tuning import GridFit, fit_grid

__all__ = [
    "sample", "sample_on_grid", "METHODS", "Method", "time_grid", "end_time_for_steps", "GRIDS", "euler_maruyama",
    "exponential_integrator", "predictor_corrector", "annealed_langevin", "ode_euler", "heun", "dopri5",
    "dpm_solver_multistep", "ddim", "ddpm", "fit_grid", "GridFit", "default_denoise", "steps_for",
    "ConsistencyModel", "consistency_sample", "auto_schedule", "Schedule",
]
