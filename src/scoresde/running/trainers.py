"""Which training loop trains a run: a declared mapping from family name to `Trainer` class.

Families trained by the plain `train.Trainer` are not listed; the "consistency" family (model score,
loss consistency) needs the target network and stateful loss of `consistency_train.ConsistencyTrainer`.
"""
from __future__ import annotations

from .build import family_of
from .config import Config
from .consistency_train import ConsistencyTrainer
from .train import Trainer

__all__ = ["TRAINERS", "trainer_for"]

TRAINERS: dict[str, type[Trainer]] = {"consistency": ConsistencyTrainer}


def trainer_for(cfg: Config) -> type[Trainer]:
    """The Trainer class of the run's family (`build.family_of`; ValueError for an invalid model/loss)."""
    return TRAINERS.get(family_of(cfg).name, Trainer)
