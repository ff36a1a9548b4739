"""Adjoint matching (Domingo-Enrich, Drozdzal, Karrer, Chen, arXiv 2409.08861) on the backward EM chain of
`models.alignment` (DESIGN section 9).

Control form. The fine-tuned chain is the pretrained one plus a control u_k = g_k (s_theta - s_pre)(x_k, t_k):

    x_{k+1} = x_k + h_k [B(x_k, t_k) + g_k u_k] + g_k dB_k,   B = -f + g^2 s_pre,

and maximising E r(x_N) - beta KL(path) is, divided by beta, the control problem
min_u E[sum_k h_k |u_k|^2 / 2 - r(x_N) / beta]   (docs/math/alignment.md eq. A1; the paper's SOC problem
with lambda = 1 / beta, sigma = g).

Lean adjoint (eq. A2; the paper's "lean adjoint ODE"), run backward along the detached trajectory:

    a_N = -grad r(x_N) / beta,   a_k = (I + h_k grad_x B(x_k, t_k))^T a_{k+1},

the transpose Jacobian of the pretrained EM step's mean map x -> x + h B(x, t): the control's own
dependence on x is dropped ("lean"), which leaves the fixed point unchanged. Adjoint matching loss
(eq. A3), a regression of the control onto -g a:

    L(theta) = E sum_k (g_k^2 h_k / 2) |s_theta - s_pre (x_k, t_k) + a_{k+1}|^2,

minimised by s_theta - s_pre = -E[a_{k+1} | x_k]. The control of step k moves x_{k+1}, so it is matched to
a_{k+1}: on the chain itself (not only as h -> 0) the fixed point is the optimal control.

Memoryless condition. The control problem's optimum tilts the chain's path law given its start,
p(path | x_0) exp(r(x_N) / beta) / Z(x_0), so its terminal law is
int p_prior(x_0) p(x_N | x_0) exp(r(x_N) / beta) / Z(x_0) dx_0: the tilt p(x_N) exp(r / beta) / Z only when
x_N is independent of x_0 (memoryless; otherwise the paper's "value function bias"). The reverse SDE
started from the prior is memoryless when that prior is the SDE's limit law: the start keeps only
alpha(T) x0 of the data, and alpha(T) ~ 0 for VP, sub-VP and OU over a long horizon (VE: sigma(T) >> the
data's scale). It fails for the contractive SDEs (ContractiveOU, ContractiveVP: alpha(T) = e^{theta T} > 1,
X_T keeps alpha(T) x0). For a Gaussian chain and a linear reward c^T x the method then converges to
N(m_N + S c / beta, V_N) instead of the tilt N(m_N + V_N c / beta, V_N), with V_N = Var x_N and
S = Var(x_N | x_0) per coordinate: the tilt's mean shift is cut by the factor S / V_N = 1 - corr(x_0, x_N)^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.sde import SDE, LinearSDE, ScoreFn, batch_time
from ..core.validate import check, integer
from ..sampling.stochastic import em_coefficients, em_update
from .alignment import Callback, LoopOptions, Rollout, Step, check_beta, train_loop
from .rewards import Reward

__all__ = ["AdjointOptions", "lean_adjoint", "adjoint_loss", "adjoint_matching"]


@dataclass(frozen=True, kw_only=True)
class AdjointOptions(LoopOptions):
    """`adjoint_matching`: the KL weight `beta` (required, > 0) and `updates_per_batch` Adam steps of the
    regression on each batch of trajectories (the target does not depend on theta, so reuse is unbiased
    apart from the trajectories' law)."""

    beta: float
    updates_per_batch: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_beta(self.beta)
        integer("updates_per_batch", self.updates_per_batch, 1)


def lean_adjoint(sde: SDE, pretrained: ScoreFn, ro: Rollout, terminal: Tensor) -> Tensor:
    """The lean adjoint a_k (N+1, B, ...) along the rollout's states from a_N = `terminal` (module docstring):
    one vector-Jacobian product of the pretrained EM step per step (`stochastic.em_update`, T 5.21), so
    `pretrained` must be differentiable in x."""
    N = ro.noise.shape[0]
    coefs = em_coefficients(sde, ro.times) if isinstance(sde, LinearSDE) else [None] * N
    a = terminal.to(ro.states.dtype)
    out = [a]
    for k in reversed(range(N)):
        x = ro.states[k].detach().requires_grad_(True)
        with torch.enable_grad():
            mean = em_update(sde, x, pretrained(x, batch_time(ro.times[k], x)), ro.times[k], ro.times[k + 1],
                             None, coefs[k])
            (a,) = torch.autograd.grad(mean, x, a)
        out.append(a)
    return torch.stack(out[::-1])


def adjoint_loss(model: ScoreFn, ro: Rollout, adjoint: Tensor) -> Tensor:
    """The adjoint matching loss mean_B sum_k (g_k^2 h_k / 2) |s_theta - s_pre + a_{k+1}|^2 at the stored
    states (eq. A3 on the chain); `adjoint` (N+1, B, ...) from `lean_adjoint`."""
    return ro.cost(ro.rescore(model) + adjoint[1:].detach()).sum(0).mean()


def adjoint_matching(sde: SDE, pretrained: ScoreFn, reward: Reward, options: AdjointOptions, *,
                     shape: tuple[int, ...] | None = None, network: nn.Module | None = None,
                     generator: torch.Generator | None = None,
                     callback: Callback | None = None) -> tuple[nn.Module, list[dict]]:
    """Adjoint matching (2409.08861, Alg. 1): each iteration rolls out the current model (detached), takes
    grad r at the terminal points, runs the lean adjoint back with the pretrained score and regresses the
    control onto it. Reaches the tilt p_pre exp(r / beta) only on a memoryless chain (module docstring).
    reward: differentiable in x (an error otherwise); `pretrained` differentiable in x. `options`:
    `AdjointOptions`; the other inputs and the history as for `alignment.finetune` (nfe counts the lean
    adjoint's pretrained evaluations, each with its vector-Jacobian product).
    """
    check("options", options, isinstance(options, AdjointOptions), "an AdjointOptions")

    def update(step: Step, ro: Rollout, r: Tensor, grad: Tensor) -> int:
        adjoint = lean_adjoint(sde, step.frozen, ro, -grad / options.beta)
        for _ in range(options.updates_per_batch):
            step.opt.zero_grad()
            adjoint_loss(step.model, ro, adjoint).backward()
            step.opt.step()
        return (1 + options.updates_per_batch) * ro.noise.shape[0] * ro.noise.shape[1]

    return train_loop(sde, pretrained, reward, update, options, shape, network, generator, callback, gradient="adjoint")
