"""Consistency distillation and training through the library's `Trainer` (DESIGN section 5).

Same loop, AdamW, warm-up, clipping, checkpoints, resume, DDP and CLI as score models; what
changes is the loss (`consistency.consistency_loss`), the target network and sampling:

- the trained module is a `ScoreModel` with parametrization "x0"; the consistency function is
  `ConsistencyModel(it)` (F = its x0 prediction), so checkpoints have the usual layout;
- the target network theta^- is the trainer's EMA, refreshed before every step: set `ema_decay`
  (a constant schedule) to CM's mu (0.95 for CD; 0 gives iCT's stop-gradient target), as the
  default warm-up schedule (`ema_schedule: power`) is no CM target; it is checkpointed and resumed
  with the run, bit-identically, and sampling uses it; the loss gets it and the step (its
  curriculum) as arguments and keeps no state;
- samples are `nfe`-step consistency samples (`sampler: consistency`), here and in `runs`.

Config: `loss: consistency`, `parametrization: x0`, `sampler: consistency`, `loss_args: {mode: cd | ct, teacher: RUN |
exact, ...}` plus any field of `ConsistencyOptions` (n_steps, solver, distance, huber_c,
curriculum, max_steps, index, p_mean, p_std, weighting, rho; total_steps defaults to `steps`).
`teacher` (mode cd) is a trained run folder, whose EMA score model is the teacher, or "exact"
for the analytic data sets (ring, grid, mixture<d>).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import InvalidValueError
from ..core.sde import SDE, LinearSDE, ScoreFn
from ..core.validate import construct
from ..models.consistency import ConsistencyOptions, consistency_loss
from ..sampling.consistency import ConsistencyModel
from .config import Config
from .data import Dataset
from .precision import training_view
from .train import Trainer

__all__ = ["ConsistencyTrainer", "load_teacher"]


def load_teacher(spec: str, sde: SDE, data: Dataset) -> ScoreFn:
    """The teacher score: "exact" (the analytic data set's true score) or a run folder's EMA model."""
    if spec == "exact":
        if data.mixture is None:
            raise InvalidValueError(f"teacher 'exact' needs an analytic data set (ring, grid, mixture<d>), got {data.name!r}")
        return data.mixture.score_fn(sde)
    from .runs import load_run

    run = load_run(spec)
    if run.sde != sde:
        raise InvalidValueError(f"the teacher run {spec!r} uses {run.sde}, the student {sde}: they must match")
    if run.sample_shape != data.sample_shape:
        raise InvalidValueError(f"the teacher run {spec!r} has samples of shape {run.sample_shape}, "
                         f"the data {data.sample_shape}")
    return run.model.eval().requires_grad_(False)


class ConsistencyTrainer(Trainer):
    """A `Trainer` for consistency models (module docstring); `run()`, `save()`, resume as usual."""

    def __init__(self, cfg: Config, data: Dataset | None = None, resume: bool = True):
        if cfg.loss != "consistency":
            raise InvalidValueError(f"ConsistencyTrainer needs loss 'consistency', got {cfg.loss!r}")
        if cfg.sampler != "consistency":
            raise InvalidValueError(f"a consistency run samples with sampler consistency (nfe = steps), got {cfg.sampler!r}")
        if cfg.parametrization != "x0":
            raise InvalidValueError(f"a consistency model's F is an x0 prediction: set parametrization x0, "
                             f"got {cfg.parametrization!r}")
        super().__init__(cfg, data, resume)
        if not isinstance(self.sde, LinearSDE):
            raise InvalidValueError(f"consistency models need a linear SDE, got {type(self.sde).__name__}")
        self._target = self.ema.copy()
        self._target_step = self.step
        # teacher and target at the run's precision (bf16 on MNIST: 1.2x the steps per second of fp32, 1 thread)
        self._target_view = training_view(self._target, self.device, self.precision)
        if isinstance(self.teacher, nn.Module):
            self.teacher = training_view(self.teacher, self.device, self.precision)

    def _loss_setup(self) -> tuple[Callable[..., Tensor], dict[str, Any], dict[str, Any]]:
        args = dict(self.cfg.loss_args)
        mode, teacher = args.pop("mode", "cd"), args.pop("teacher", None)
        if mode == "cd" and teacher is None:
            raise InvalidValueError("loss_args.teacher (a run folder or 'exact') is required for mode 'cd'")
        if mode == "ct" and teacher is not None:
            raise InvalidValueError("mode 'ct' trains without a teacher: drop loss_args.teacher")
        args.setdefault("total_steps", self.cfg.steps)
        self.options = construct(ConsistencyOptions, args, "loss_args for 'consistency'", mode=mode)
        self.teacher = load_teacher(str(teacher), self.sde, self.data) if mode == "cd" else None
        if isinstance(self.teacher, nn.Module):
            self.teacher = self.teacher.to(self.device)
        return self._loss, {}, {"importance": False}

    def _loss(self, model: nn.Module, sde: SDE, x0: Tensor, *, t: Tensor | None = None,
              noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """The trainer's loss call: `t` is unused (the loss draws grid indices), `noise` is z."""
        if self._target_step != self.step:  # theta^- <- the EMA after the last optimiser step
            self._target.load_state_dict(self.ema.shadow)
            self._target_step = self.step
        sd = self.cfg.sigma_data
        return consistency_loss(sde, self.options, ConsistencyModel(model, sde, sd),
                                ConsistencyModel(self._target_view, sde, sd), x0, self.step, teacher=self.teacher,
                                generator=generator, noise=noise)
