"""Reward backpropagation through the sampler: DRaFT-K (Clark, Vicol, Swersky, Fleet, arXiv 2309.17400) on the
backward EM chain of `models.alignment` (DESIGN section 9).

DRaFT-K (docs/math/alignment.md eq. D1): the chain is rolled out without a graph, then its last K steps are
re-simulated from the stored x_{N-K} with the stored noise and a graph, and the loss -r(x_N) is
backpropagated through them; the earlier steps are treated as constants (K = N is plain reward
backpropagation, the pathwise gradient of E r). With a KL weight beta the path KL sum_k c_k is added to the
loss, differentiated along the re-simulated steps (pathwise) and at the stored states before them, so
K = N gives the exact pathwise gradient of E r - beta KL on the chain; beta None is DRaFT as published.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.sde import SDE, LinearSDE, ScoreFn, batch_time
from ..core.validate import check, integer
from ..sampling.stochastic import em_coefficients, em_update
from .alignment import (
    Callback,
    LoopOptions,
    ResidualScore,
    Rollout,
    Step,
    check_beta,
    train_loop,
)
from .rewards import Reward, differentiable

__all__ = ["DRaFTOptions", "draft_loss", "draft"]


@dataclass(frozen=True, kw_only=True)
class DRaFTOptions(LoopOptions):
    """`draft`: backpropagate through the last `k` EM steps (None: all n_time_steps) and the KL weight `beta`
    (None: no KL term, DRaFT as published; > 0: the path KL is added)."""

    k: int | None = None
    beta: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.k is not None:
            integer("k", self.k, 1)
            check("k", self.k, self.k <= self.n_time_steps, f"<= n_time_steps = {self.n_time_steps}")
        if self.beta is not None:
            check_beta(self.beta)


def _live_scores(model: nn.Module, frozen: ScoreFn, x: Tensor, t: Tensor, need_pre: bool) -> tuple[Tensor, Tensor | None]:
    """(s_theta, s_pre) at (x, t) with the graph in x (and theta): a residual model's pretrained part included."""
    if isinstance(model, ResidualScore):
        pre = model.pretrained(x, t)
        return pre + model.net(x, t), pre
    return model(x, t), frozen(x, t) if need_pre else None


def draft_loss(sde: SDE, model: nn.Module, frozen: ScoreFn, ro: Rollout, reward: Reward, k: int,
               beta: float | None = None) -> Tensor:
    """-mean_B [r(x_N) - beta sum_j c_j] with x_{N-k}, ..., x_N re-simulated from the rollout's x_{N-k} and
    noise with a graph (eq. D1); c_j of the earlier steps at the stored states. `reward` differentiable in x."""
    N = ro.noise.shape[0]
    start = N - k
    coefs = em_coefficients(sde, ro.times) if isinstance(sde, LinearSDE) else [None] * N
    x, kl = ro.states[start], ro.states.new_zeros(ro.noise.shape[1])
    if beta is not None and start > 0:
        head = Rollout(ro.times[:start + 1], ro.states[:start + 1], ro.noise[:start], ro.scores[:start],
                       ro.pre[:start], ro.diffusion[:start], 0)
        kl = kl + head.cost(head.rescore(model)).sum(0)
    for j in range(start, N):
        s, pre = _live_scores(model, frozen, x, batch_time(ro.times[j], x), beta is not None)
        if beta is not None:
            kl = kl + 0.5 * ro.diffusion[j] ** 2 * ro.steps[j] * (s - pre).flatten(1).pow(2).sum(1)
        x = em_update(sde, x, s, ro.times[j], ro.times[j + 1], ro.noise[j] / ro.steps[j].sqrt(), coefs[j])
    r = differentiable(reward, x, "draft")
    return -(r - (0.0 if beta is None else beta) * kl).mean()


def draft(sde: SDE, pretrained: ScoreFn, reward: Reward, options: DRaFTOptions | None = None, *,
          shape: tuple[int, ...] | None = None, network: nn.Module | None = None,
          generator: torch.Generator | None = None, callback: Callback | None = None) -> tuple[nn.Module, list[dict]]:
    """DRaFT-K (2309.17400, Alg. 1 with truncation K): one Adam step per rollout on `draft_loss`.
    reward: differentiable in x (an error otherwise). `options`: `DRaFTOptions` (default: its defaults);
    the other inputs and the history as for `alignment.finetune`.
    """
    options = DRaFTOptions() if options is None else options
    check("options", options, isinstance(options, DRaFTOptions), "a DRaFTOptions")
    k = options.k or options.n_time_steps

    def update(step: Step, ro: Rollout, r: Tensor, grad: None) -> int:
        step.opt.zero_grad()
        draft_loss(sde, step.model, step.frozen, ro, step.reward, k, options.beta).backward()
        step.opt.step()
        B, per_point = ro.noise.shape[1], 1 if isinstance(step.model, ResidualScore) or options.beta is None else 2
        return B * (k * per_point + (ro.noise.shape[0] - k if options.beta is not None else 0))

    return train_loop(sde, pretrained, reward, update, options, shape, network, generator, callback)
