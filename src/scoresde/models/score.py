"""The score-model family: a network wrapped by `core.precond.ScoreModel` on any SDE (VP, VE, sub-VP,
contractive); trained by the score-matching losses of `learning.losses` (or "ncsn", `models.ncsn`)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..core.precond import ScoreModel
from ..core.sde import SDE
from .family import MODELS


@MODELS.register("score")
def _score(cfg, sde: SDE, sample_shape: tuple[int, ...], network: Callable[[], nn.Module]) -> nn.Module:
    if cfg.model_args:
        raise ValueError(f"model 'score' takes no model_args, got {sorted(cfg.model_args)}")
    return ScoreModel(network(), sde, cfg.parametrization, cfg.sigma_data)
