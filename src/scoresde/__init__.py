"""scoresde: score-based diffusion models written as stochastic differential equations.

Layers (a module imports only from its own layer and the ones listed before it; enforced by the
import-linter contract in pyproject.toml):

    core        sde, targets, gaussian, precond, registry, validate, errors
    learning    losses, networks, estimation
    sampling    methods (sample, METHODS) and the solvers, likelihood, guidance, consistency
    evaluation  metrics, bounds, features
    models      one module per family: score, ddpm, ncsn, vae, consistency, alignment, rewards
    running     config, files, build, data, checkpoint, train, runs, plots, ...
    cli

The names below are re-exported here on first use (`from scoresde import sample, VP, Trainer`).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "core.sde": ["SDE", "LinearSDE", "OU", "Langevin", "VE", "VEEDM", "VP", "SubVP", "ContractiveOU", "ContractiveVP",
                 "SDES", "reverse_drift", "probability_flow_drift", "simulate"],
    "core.targets": ["GaussianMixture", "ring", "grid", "random_mixture"],
    "core.precond": ["ScoreModel", "edm_scalings"],
    "core.errors": ["ScoresdeError", "InvalidValueError", "MissingFileError", "DamagedFileError", "OutputError"],
    "learning.losses": ["LOSSES", "denoising_score_matching", "sliced_score_matching", "implicit_score_matching",
                        "explicit_score_matching"],
    "learning.networks": ["MLP", "UNet", "EMA"],
    "sampling.entry": ["sample"],
    "sampling.methods": ["METHODS", "Method"],
    "sampling.tuning": ["fit_grid"],
    "sampling.grids": ["time_grid"],
    "sampling.likelihood": ["log_likelihood", "bits_per_dim"],
    "sampling.guidance": ["inpaint", "classifier_free"],
    "sampling.consistency": ["ConsistencyModel", "consistency_sample"],
    "evaluation.metrics": ["w2", "mmd2", "tv", "frechet_distance"],
    "evaluation.bounds": ["tv_bound", "w2_bound"],
    "models.family": ["FAMILIES", "Family"],
    "models.alignment": ["finetune", "ddpo", "FinetuneOptions", "DDPOOptions"],
    "models.consistency": ["ConsistencyOptions", "consistency_loss"],
    "running.config": ["Config", "load_config"],
    "running.data": ["Dataset", "load_dataset"],
    "running.train": ["Trainer"],
    "running.runs": ["load_run", "sample_run", "evaluate_run"],
    "running.export": ["export_run", "load_model", "load_sde"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'scoresde' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
