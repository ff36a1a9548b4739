"""The score-model family: a network wrapped by `core.precond.ScoreModel` on any SDE (VP, VE, sub-VP,
contractive), trained by the score-matching losses of `learning.losses` or "ncsn" (`models.ncsn`), sampled
by every `sampling.METHODS` entry that takes a score. With loss "consistency" (`models.consistency`,
trained by `running.consistency_train.ConsistencyTrainer`) the run belongs to the variant family
"consistency": the same x0-parametrised module read as a consistency function (`sampling.consistency`),
whose output is not a score."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..core.errors import InvalidValueError
from ..core.precond import ScoreModel
from ..core.sde import SDE
from ..sampling.methods import METHODS
from .family import EVALUATIONS, Family, register


def _score(cfg, sde: SDE, sample_shape: tuple[int, ...], network: Callable[[], nn.Module]) -> nn.Module:
    if cfg.model_args:
        raise InvalidValueError(f"model 'score' takes no model_args, got {sorted(cfg.model_args)}")
    return ScoreModel(network(), sde, cfg.parametrization, cfg.sigma_data, cfg.c_noise)


def _consistency(cfg, sde: SDE, sample_shape: tuple[int, ...], network: Callable[[], nn.Module]) -> nn.Module:
    if cfg.parametrization != "x0":
        raise InvalidValueError(f"a consistency model's F is an x0 prediction: set parametrization x0, "
                         f"got {cfg.parametrization!r}")
    return _score(cfg, sde, sample_shape, network)


def _methods(takes: str) -> tuple[str, ...]:
    return tuple(m for m in METHODS if METHODS[m].takes == takes)


CONSISTENCY = Family("consistency", _consistency, losses=("consistency",), methods=_methods("consistency"))
SCORE = register(Family(
    "score", _score, losses=("denoising", "sliced", "implicit", "explicit", "ncsn", "consistency"),
    methods=("em",) + tuple(m for m in _methods("score") if m != "em"), has_score=True,
    evaluations=frozenset(EVALUATIONS), variants={"consistency": CONSISTENCY}))
