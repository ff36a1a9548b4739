"""Reward-weighted denoising score matching: the cross-entropy method of path-integral control (PICE; Kappen and
Ruiz, J. Stat. Phys. 162, 2016) on the backward EM chain of `models.alignment` (DESIGN section 9).

The optimum of E r(x_N) - beta KL(path) on the chain is the path law (docs/math/alignment.md eq. C1)

    dP* / dP_pre = exp(r(x_N) / beta) / Z,

whose terminal law is the tilt p_N(x) exp(r(x) / beta) / Z of the pretrained chain's law. `finetune` minimises
KL(P_theta || P*); this method minimises the cross-entropy KL(P* || P_theta) instead, which has the same
minimiser. Every rollout of the current model is an importance sample of P*, with the log weight (eq. C2)

    log w = r(x_N) / beta + log dP_pre / dP_theta (path),
    log dP_pre / dP_theta = -sum_k [g_k <delta_k, dB_k> + g_k^2 h_k |delta_k|^2 / 2],   delta = s_theta - s_pre,

the Girsanov density of the stored noise (`Rollout.log_ratio` at the pretrained scores). P* does not depend on
theta, so a rollout keeps its weights after the model moves: the rollouts of every iteration (or the last
`pool`) are pooled, their self-normalised weights make an importance sample of the tilt, and the model is fitted
to it by denoising score matching on draws resampled by weight (T 4.9-4.12), whose minimiser is the score of the
tilt diffused forward (eq. C3). As the model nears the tilt the weights even out (the effective sample size,
`ess` in the history, rises towards the pool's size).

It needs one reward evaluation per chain and no reward gradient. The fitted score reaches the tilt from the
prior as far as the prior is the tilt diffused to T: alpha(T) ~ 0, the condition under which the pretrained chain
reaches its own data law; the contractive SDEs, whose prior drops the alpha(T) x0 that X_T keeps, carry the same
noise-approximation bias for both (DESIGN section 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import NonFiniteError
from ..core.sde import SDE, LinearSDE, ScoreFn
from ..core.validate import check, integer
from ..learning.losses import denoising_score_matching
from .alignment import Callback, LoopOptions, Rollout, Step, check_beta, train_loop
from .rewards import Reward

__all__ = ["CrossEntropyOptions", "log_weights", "cross_entropy"]


@dataclass(frozen=True, kw_only=True)
class CrossEntropyOptions(LoopOptions):
    """`cross_entropy`: the KL weight `beta` (required, > 0), `fit_steps` Adam steps of denoising score matching
    per rollout, each on `fit_batch` draws resampled from the pool by weight, and `pool` the number of recent
    rollouts pooled (None: all of them, steps x batch_size terminal points held in memory: bound it for images)."""

    beta: float
    fit_steps: int = 4
    fit_batch: int = 512
    pool: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_beta(self.beta)
        integer("fit_steps", self.fit_steps, 1)
        integer("fit_batch", self.fit_batch, 1)
        if self.pool is not None:
            integer("pool", self.pool, 1)


def log_weights(ro: Rollout, r: Tensor, beta: float) -> Tensor:
    """log w (B,) of eq. C2: r / beta plus the Girsanov log density of the pretrained chain against the rollout's."""
    return r / beta + ro.log_ratio(ro.pre).sum(0)


def cross_entropy(sde: SDE, pretrained: ScoreFn, reward: Reward, options: CrossEntropyOptions, *,
                  shape: tuple[int, ...] | None = None, network: nn.Module | None = None,
                  generator: torch.Generator | None = None,
                  callback: Callback | None = None) -> tuple[nn.Module, list[dict]]:
    """Reward-weighted denoising score matching (module docstring): each iteration rolls out the current model,
    weights its chains by eq. C2, pools them with the earlier rollouts and takes `fit_steps` steps of denoising
    score matching on draws resampled from the pool by weight. reward: need not be differentiable; a linear SDE
    (its Gaussian transition kernel). `options`: `CrossEntropyOptions`; the other inputs and the history as for
    `alignment.finetune`, the history adding `ess`, the pool's effective sample size (sum w)^2 / sum w^2.
    """
    check("options", options, isinstance(options, CrossEntropyOptions), "a CrossEntropyOptions")
    check("sde", type(sde).__name__, isinstance(sde, LinearSDE),
          "a linear SDE (denoising score matching needs its Gaussian transition kernel)")
    points: list[Tensor] = []
    logw: list[Tensor] = []

    def update(step: Step, ro: Rollout, r: Tensor, grad: None) -> int:
        lw = log_weights(ro, r, options.beta)
        if not bool(torch.isfinite(lw).all()):
            raise NonFiniteError("cross_entropy: a chain's importance weight is not finite (the reward or the "
                                 "fine-tuned scores returned NaN or inf)")
        points.append(ro.terminal), logw.append(lw.double())
        if options.pool is not None:
            del points[:-options.pool], logw[:-options.pool]
        x, w = torch.cat(points), torch.softmax(torch.cat(logw), 0)
        step.info["ess"] = float(1 / w.pow(2).sum())
        gen = step.generator
        for _ in range(options.fit_steps):
            x0 = x[torch.multinomial(w, options.fit_batch, replacement=True, generator=gen)]
            step.opt.zero_grad()
            denoising_score_matching(step.model, sde, x0, generator=gen).mean().backward()
            step.opt.step()
        return options.fit_steps * options.fit_batch

    return train_loop(sde, pretrained, reward, update, options, shape, network, generator, callback)
