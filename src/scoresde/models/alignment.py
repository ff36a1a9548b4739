"""Alignment: fine-tune a score model against a terminal reward (DESIGN section 9; T 7.10-7.14).

Continuous-time RL with the score as the action. On a decreasing time grid
T = t_0 > ... > t_N = t_end the backward Euler-Maruyama chain is

    x_{k+1} = x_k + [-f(t_k, x_k) + g_k^2 s_theta(x_k, t_k)] h_k + g_k dB_k,   h_k = t_k - t_{k+1},

and the objective is J(theta) = E r(x_N) - beta KL, with the Girsanov path KL

    KL = E sum_k c_k,   c_k = (g_k^2 / 2) h_k |s_theta - s_pre|^2(x_k, t_k)

(w = g^2 / 2), which is exactly the KL between the fine-tuned and pretrained chains on
that grid and tends to the continuous-time integral as the grid is refined. The path
score is d log P_theta = sum_k g_k (grad_theta s_theta)^T dB_k (Girsanov), so

    grad J = E[sum_j g_j (grad s_theta(x_j))^T dB_j (G_j - V(x_j))] - beta E sum_k grad_theta c_k |_{x_k fixed},
    G_j = r(x_N) - beta sum_{k > j} c_k,

the second term differentiating the penalty's integrand and the first its law: a
penalty c_k depends on the actions j < k through x_k, so it enters their returns (the
"cost to go"); c_j itself does not depend on the action dB_j. Any baseline V(x_j, t_j)
that does not see dB_j leaves the estimator unbiased. `policy_loss` returns a scalar
whose autograd gradient is this estimator; the same formula serves every time grid.

Baselines on the same rollout, loop and history: DDPO (Black et al. 2305.13301): per-step
Gaussian likelihood ratios of the same chain with PPO clipping, normalised rewards and no KL
term; DPOK (Fan et al. 2305.16381): the same clipped ratios on the raw reward plus beta times the
closed-form per-step KL of the two Gaussian transitions (which is c_k), without the cost to go.
Adjoint matching is in `models.adjoint`, DRaFT in `models.reward_gradient`.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.devices import device_generator
from ..core.errors import InvalidValueError
from ..core.sde import SDE, LinearSDE, ScoreFn, batch_time, expand_like
from ..core.targets import GaussianMixture
from ..core.validate import check, integer, one_of, positive
from ..learning.networks import MLP
from ..sampling.common import check_grid
from ..sampling.grids import time_grid
from ..sampling.stochastic import em_coefficients, em_update
from .rewards import Reward, value_and_grad

__all__ = [
    "ResidualScore", "Rollout", "rollout", "returns_to_go", "leave_one_out_mean", "policy_loss", "path_kl",
    "LoopOptions", "FinetuneOptions", "DDPOOptions", "DPOKOptions", "finetune", "ddpo", "dpok", "CountedReward", "Step",
    "tilted_mixture", "mean_pairwise_distance", "BASELINES", "train_loop", "check_beta", "Callback",
]

BASELINES = ("value", "critic", "mean", "none")
Callback = Callable[[int, nn.Module, dict], None]


class CountedReward:
    """A reward that counts the points it is evaluated at: `evals` in all, `grad_evals` of them with a graph
    (x requires grad: the reward's gradient is taken there)."""

    def __init__(self, reward: Reward):
        self.reward, self.evals, self.grad_evals = reward, 0, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.evals += x.shape[0]
        self.grad_evals += x.shape[0] if x.requires_grad and torch.is_grad_enabled() else 0
        return self.reward(x)


class ResidualScore(nn.Module):
    """s(x, t) = s_pre(x, t) + net(x, t): a trainable residual on a frozen score callable.

    `net` must output zero at initialisation (networks.MLP does), so the model starts equal
    to the pretrained score.
    """

    def __init__(self, pretrained: ScoreFn, net: nn.Module):
        super().__init__()
        self.pretrained = pretrained
        self.net = net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            pre = self.pretrained(x, t)
        return pre + self.net(x, t)


def _score_pair(model: ScoreFn, pretrained: ScoreFn, x: Tensor, t: Tensor,
                pre: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(s_theta, s_pre) at (x, t); a residual model reuses the pretrained evaluation."""
    if pre is None:
        with torch.no_grad():
            pre = pretrained(x, t)
    s = pre + model.net(x, t) if isinstance(model, ResidualScore) else model(x, t)
    return s, pre


def _sq(v: Tensor) -> Tensor:
    """Squared norm per sample over all but the leading (step, batch) dimensions."""
    return v.flatten(2).pow(2).sum(-1)


@dataclass
class Rollout:
    """One batch of backward Euler-Maruyama trajectories, everything detached.

    states (N+1, B, ...), noise dB (N, B, ...), scores s_theta and pre s_pre at the states
    (N, B, ...), times (N+1,), diffusion g_k (N,), nfe the score evaluations spent.
    """

    times: Tensor
    states: Tensor
    noise: Tensor
    scores: Tensor
    pre: Tensor
    diffusion: Tensor
    nfe: int

    @property
    def steps(self) -> Tensor:
        return self.times[:-1] - self.times[1:]

    @property
    def terminal(self) -> Tensor:
        return self.states[-1]

    def cost(self, scores: Tensor | None = None) -> Tensor:
        """c_k = (g_k^2 / 2) h_k |s - s_pre|^2 (N, B), for the stored or the given scores."""
        s = self.scores if scores is None else scores
        return 0.5 * (self.diffusion**2 * self.steps)[:, None] * _sq(s - self.pre)

    def log_ratio(self, scores: Tensor) -> Tensor:
        """log p_new(x_{k+1} | x_k) / p_old(x_{k+1} | x_k) (N, B) of the Gaussian EM steps:
        g <delta, dB> - g^2 h |delta|^2 / 2, delta = s_new - s_old (the Girsanov density per step)."""
        g, h = self.diffusion[:, None], self.steps[:, None]
        delta = scores - self.scores
        return g * (delta * self.noise).flatten(2).sum(-1) - 0.5 * g**2 * h * _sq(delta)

    def rescore(self, model: ScoreFn) -> Tensor:
        """s_theta at every stored state, with gradient, in one batched call (N, B, ...)."""
        N, B = self.noise.shape[:2]
        x = self.states[:-1].flatten(0, 1)
        t = self.times[:-1].repeat_interleave(B)
        s, _ = _score_pair(model, model, x, t, pre=self.pre.flatten(0, 1))
        return s.reshape(self.noise.shape)


def rollout(sde: SDE, model: ScoreFn, pretrained: ScoreFn, shape: tuple[int, ...], grid: Tensor,
            generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Rollout:
    """Simulate the backward EM chain from the prior along `grid` (T down to t_end), no gradient, on the
    grid's device (`generator` must be there too); each step is the samplers' (`stochastic.em_update`, T 5.21)
    with dB = sqrt(h) z."""
    ts = check_grid(torch.as_tensor(grid, dtype=dtype))
    x = sde.prior_sample(shape, generator=generator, dtype=dtype, device=ts.device)
    states, noise, scores, pres, gs = [x], [], [], [], []
    per_point = 1 if isinstance(model, ResidualScore) else 2
    coefs = em_coefficients(sde, ts) if isinstance(sde, LinearSDE) else [None] * (ts.numel() - 1)
    with torch.no_grad():
        for k in range(ts.numel() - 1):
            s, pre = _score_pair(model, pretrained, x, batch_time(ts[k], x))
            z = torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device)
            x_next = em_update(sde, x, s, ts[k], ts[k + 1], z, coefs[k])
            states.append(x_next), noise.append((ts[k] - ts[k + 1]).sqrt() * z), scores.append(s), pres.append(pre)
            gs.append(sde.diffusion(ts[k]).to(dtype))
            x = x_next
    return Rollout(ts, torch.stack(states), torch.stack(noise), torch.stack(scores), torch.stack(pres),
                   torch.stack(gs), per_point * shape[0] * (ts.numel() - 1))


def path_kl(sde: SDE, model: ScoreFn, pretrained: ScoreFn, shape: tuple[int, ...], grid: Tensor,
            generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """Monte Carlo Girsanov path KL(P_model || P_pretrained) on `grid` and its standard error."""
    kl = rollout(sde, model, pretrained, shape, grid, generator, dtype).cost().sum(0)
    return float(kl.mean()), float(kl.std() / math.sqrt(kl.numel()))


def reward_of(reward: Reward, x: Tensor) -> Tensor:
    with torch.no_grad():
        r = reward(x)
    if r.shape != x.shape[:1]:
        raise InvalidValueError(f"reward must return shape ({x.shape[0]},), got {tuple(r.shape)}")
    return r.to(x.dtype)


def returns_to_go(ro: Rollout, r: Tensor, beta: float) -> Tensor:
    """G_j = r - beta sum_{k > j} c_k (N, B): what the action at step j influences."""
    c = ro.cost()
    later = c.flip(0).cumsum(0).flip(0) - c
    return r[None] - beta * later


def leave_one_out_mean(G: Tensor) -> Tensor:
    """Baseline for sample i: the mean of G over the other samples of the batch (dim 1); unbiased."""
    return (G.sum(1, keepdim=True) - G) / (G.shape[1] - 1)


def policy_loss(model: ScoreFn, ro: Rollout, advantages: Tensor, beta: float,
                clip: float | None = None) -> Tensor:
    """Surrogate -L whose gradient is minus the policy gradient of J (module docstring).

    L = mean_B [sum_j rho_j A_j m - beta sum_k c_k(theta)], rho_j the per-step likelihood
    ratio to the rollout's policy (1 at the first update, where grad rho_j = grad log rho_j),
    m = 1{|sum_j log rho_j| <= clip}: a trust region on the whole-path Girsanov ratio, so its
    meaning does not depend on the grid. The penalty is differentiated along the stored states.
    """
    s = ro.rescore(model)
    log_rho = ro.log_ratio(s)
    lr_term = (log_rho.exp() * advantages.detach()).sum(0)
    if clip is not None:
        lr_term = lr_term * (log_rho.sum(0).abs() <= clip).to(lr_term).detach()
    return -(lr_term - beta * ro.cost(s).sum(0)).mean()


def _tweedie_reward(sde: SDE, reward: Reward, ro: Rollout) -> Tensor:
    """r at the denoised points (x + sigma^2 s) / alpha (Tweedie) of every stored state (N, B)."""
    if not isinstance(sde, LinearSDE):
        return ro.states.new_zeros(ro.noise.shape[:2])
    x, t = ro.states[:-1], ro.times[:-1]
    a = expand_like(sde.alpha(t).to(x.dtype), x)
    sig = expand_like(sde.sigma(t).to(x.dtype), x)
    x0 = (x + sig**2 * ro.pre) / a
    return reward_of(reward, x0.flatten(0, 1)).reshape(ro.noise.shape[:2])


class _ValueNet(nn.Module):
    """A learned correction to a baseline's base term (r at the Tweedie point, or the batch mean), zero at
    initialisation."""

    def __init__(self, dim: int, T: float, hidden: int = 64):
        super().__init__()
        self.T = T
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight), nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x (N, B, ...), t (N,) -> (N, B)."""
        N, B = x.shape[:2]
        inp = torch.cat([x.flatten(2), (t / self.T)[:, None, None].expand(N, B, 1).to(x)], dim=-1)
        return self.net(inp).squeeze(-1)


@dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """The loop shared by every method: `steps` iterations, each a rollout of `batch_size`
    chains of `n_time_steps` EM steps on `grid` (a kind for `grids.time_grid` or a decreasing tensor
    of n_time_steps + 1 times) and an Adam update at `lr`, cosine-decayed to `lr_final` if given."""

    steps: int = 200
    batch_size: int = 256
    n_time_steps: int = 50
    lr: float = 1e-3
    lr_final: float | None = None
    grid: str | Tensor = "uniform"

    def __post_init__(self):
        integer("steps", self.steps, 1)
        integer("batch_size", self.batch_size, 2)
        integer("n_time_steps", self.n_time_steps, 1)
        positive("lr", self.lr)
        if self.lr_final is not None:
            positive("lr_final", self.lr_final)
        if not isinstance(self.grid, str):
            n = self.n_time_steps + 1
            check("grid", tuple(torch.as_tensor(self.grid).shape), torch.as_tensor(self.grid).shape == (n,),
                  f"a grid kind or a tensor of n_time_steps + 1 = {n} times")


def check_beta(beta) -> None:
    """The KL weight: a finite number > 0, else an error naming `beta`."""
    check("beta", beta, isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta)
          and beta > 0, "> 0 (the KL weight)")


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions(LoopOptions):
    """`finetune`: the KL weight `beta` (required, > 0), the `baseline` ("value": r at the Tweedie point plus a
    learned correction, fitted to the returns after they are used, which evaluates the reward at every state
    of the chain, n_time_steps times the terminal evaluations; "critic": the leave-one-out batch mean plus such a
    learned correction V(x_j, t_j), no extra reward evaluations; "mean": leave-one-out batch mean, unbiased, no
    extra reward evaluations; "none"), `updates_per_batch` and the path-ratio trust region `clip` of `policy_loss`."""

    beta: float
    baseline: str = "value"
    clip: float | None = None
    updates_per_batch: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_beta(self.beta)
        one_of("baseline", self.baseline, BASELINES)
        if self.clip is not None:
            positive("clip", self.clip)
        integer("updates_per_batch", self.updates_per_batch, 1)


@dataclass(frozen=True, kw_only=True)
class DDPOOptions(LoopOptions):
    """`ddpo`: the PPO ratio clip, the advantage clip and the number of minibatches per batch."""

    clip: float = 1e-4
    minibatches: int = 4
    adv_clip: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        positive("clip", self.clip)
        positive("adv_clip", self.adv_clip)
        integer("minibatches", self.minibatches, 1)
        check("minibatches", self.minibatches, self.minibatches <= self.batch_size, f"<= batch_size = {self.batch_size}")


def _resolve_grid(sde: SDE, options: LoopOptions) -> Tensor:
    if isinstance(options.grid, str):
        return time_grid(sde, options.n_time_steps, kind=options.grid)
    return check_grid(torch.as_tensor(options.grid, dtype=torch.float64))


def _prepare(pretrained, shape, network, generator) -> tuple[nn.Module, ScoreFn, tuple[int, ...]]:
    """The trainable model, the frozen pretrained score and the per-sample shape."""
    if shape is None:
        dim = getattr(pretrained, "dim", None)
        check("shape", shape, dim is not None, "given (per-sample shape) when pretrained has no `dim` attribute")
        shape = (dim,)
    shape = tuple(int(s) for s in shape)
    seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        if isinstance(pretrained, nn.Module):
            frozen = copy.deepcopy(pretrained).eval().requires_grad_(False)
            return copy.deepcopy(pretrained).train().requires_grad_(True), frozen, shape
        check("pretrained", pretrained, callable(pretrained), "a score network or a callable (x, t) -> score")
        if network is None:
            check("shape", shape, len(shape) == 1, "1-D for the default residual MLP; pass `network` otherwise")
            network = MLP(shape[0])
        return ResidualScore(pretrained, network), pretrained, shape


def _record(it: int, ro: Rollout, r: Tensor, nfe: int, start: float) -> dict:
    kl = ro.cost().sum(0)
    B = r.numel()
    return {"iteration": it, "reward_mean": float(r.mean()), "reward_std": float(r.std()),
            "kl": float(kl.mean()), "kl_stderr": float(kl.std() / math.sqrt(B)),
            "diversity": mean_pairwise_distance(ro.terminal), "wall_time": time.perf_counter() - start, "nfe": nfe}


@dataclass(frozen=True)
class Step:
    """What a method's update sees besides the rollout: the SDE, the trained model, the frozen pretrained
    score, the optimiser, the (counting) reward, the chains' generator and `info`, a dict the update may fill
    with diagnostics that join the iteration's history record."""

    sde: SDE
    model: nn.Module
    frozen: ScoreFn
    opt: torch.optim.Optimizer
    reward: CountedReward
    generator: torch.Generator | None = None
    info: dict = field(default_factory=dict)


def train_loop(sde, pretrained, reward, update: Callable[[Step, Rollout, Tensor, Tensor | None], int],
               options: LoopOptions, shape, network, generator, callback,
               gradient: str | None = None) -> tuple[nn.Module, list[dict]]:
    """The loop shared by every method: roll out, score, record, update. update(step, ro, r, grad) returns
    the score evaluations it spent; grad = grad r at the terminal points when `gradient` names the method
    that needs it (else None). The reward counts its own evaluations (reward_evals, all of them, and
    reward_grad_evals, those with a gradient, in the history, cumulative)."""
    ts = _resolve_grid(sde, options)
    reward = CountedReward(reward)
    model, frozen, shape = _prepare(pretrained, shape, network, generator)
    dtype, device = (p := next(model.parameters())).dtype, p.device
    ts, generator = ts.to(device), device_generator(generator, device)  # the chains run where the model is
    lr, lr_final = options.lr, options.lr_final
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    step = Step(sde, model, frozen, opt, reward, generator)
    history, nfe, start = [], 0, time.perf_counter()
    for it in range(options.steps):
        if lr_final is not None:  # cosine schedule from lr to lr_final
            opt.param_groups[0]["lr"] = lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * it / options.steps))
        ro = rollout(sde, model, frozen, (options.batch_size, *shape), ts, generator, dtype)
        r, grad = value_and_grad(reward, ro.terminal, gradient) if gradient else (reward_of(reward, ro.terminal), None)
        nfe += ro.nfe
        record = _record(it, ro, r, nfe, start)
        nfe += update(step, ro, r, grad)
        record.update(step.info, nfe=nfe, wall_time=time.perf_counter() - start, reward_evals=reward.evals,
                      reward_grad_evals=reward.grad_evals)
        history.append(record)
        if callback is not None:
            callback(it, model, record)
    return model.eval(), history


def finetune(sde: SDE, pretrained: ScoreFn, reward: Reward, options: FinetuneOptions, *,
             shape: tuple[int, ...] | None = None, network: nn.Module | None = None,
             generator: torch.Generator | None = None, callback: Callback | None = None) -> tuple[nn.Module, list[dict]]:
    """KL-regularised continuous-time policy gradient (DESIGN 9): maximise E r - beta KL(path).

    pretrained: a score network (a copy, all its parameters trainable, is fine-tuned) or any score
    callable (x, t) -> score (a zero-initialised residual `network`, default networks.MLP,
    is trained on top of it); `shape` the per-sample shape (default (pretrained.dim,)).
    reward(x) -> (batch,) need not be differentiable. `options`: `FinetuneOptions`.
    Returns the fine-tuned score model and one history dict per iteration (reward mean/std,
    path KL and its standard error, diversity, wall time, cumulative score evaluations; nfe
    counts every evaluation of a score network or callable made for training).
    """
    check("options", options, isinstance(options, FinetuneOptions), "a FinetuneOptions")
    beta, baseline = options.beta, options.baseline
    value = value_opt = None
    value_seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))

    def update(step: Step, ro: Rollout, r: Tensor, grad: None) -> int:
        nonlocal value, value_opt
        G = returns_to_go(ro, r, beta)
        learned = baseline in ("value", "critic")
        if learned and value is None:
            with torch.random.fork_rng():
                if value_seed is not None:
                    torch.manual_seed(value_seed)
                value = _ValueNet(ro.states[0, 0].numel(), float(sde.T)).to(G)
            value_opt = torch.optim.Adam(value.parameters(), lr=1e-3)
        base = (_tweedie_reward(sde, step.reward, ro) if baseline == "value" else
                leave_one_out_mean(G) if baseline in ("critic", "mean") else torch.zeros_like(G))
        with torch.no_grad():
            V = base + value(ro.states[:-1], ro.times[:-1]) if learned else base
        for _ in range(options.updates_per_batch):
            step.opt.zero_grad()
            policy_loss(step.model, ro, G - V, beta, options.clip).backward()
            step.opt.step()
        if learned:  # fit the correction after use, so V never saw this batch's noise
            for _ in range(4):
                value_opt.zero_grad()
                (value(ro.states[:-1], ro.times[:-1]) - (G - base)).pow(2).mean().backward()
                value_opt.step()
        return options.updates_per_batch * ro.noise.shape[0] * ro.noise.shape[1]

    return train_loop(sde, pretrained, reward, update, options, shape, network, generator, callback)


def ddpo(sde: SDE, pretrained: ScoreFn, reward: Reward, options: DDPOOptions | None = None, *,
         shape: tuple[int, ...] | None = None, network: nn.Module | None = None,
         generator: torch.Generator | None = None, callback: Callback | None = None) -> tuple[nn.Module, list[dict]]:
    """DDPO-clip (Black et al. 2305.13301, sec. 4.3): rewards normalised over the batch (clipped to
    +-adv_clip), per-step ratios rho_k of the chain's Gaussian transitions, loss
    mean_{k, i} max(-A_i rho_ik, -A_i clip(rho_ik, 1 - clip, 1 + clip)), one pass over
    `minibatches` chunks of each batch, no KL term. `options`: `DDPOOptions` (default: its defaults);
    the other inputs and the history as for `finetune` (the KL there is a diagnostic only).
    """
    options = DDPOOptions() if options is None else options
    check("options", options, isinstance(options, DDPOOptions), "a DDPOOptions")
    clip, adv_clip = options.clip, options.adv_clip

    def update(step: Step, ro: Rollout, r: Tensor, grad: None) -> int:
        A = ((r - r.mean()) / (r.std() + 1e-8)).clamp(-adv_clip, adv_clip)
        _clipped_updates(step, ro, A, clip, options.minibatches, None)
        return ro.noise.shape[0] * ro.noise.shape[1]

    return train_loop(sde, pretrained, reward, update, options, shape, network, generator, callback)


@dataclass(frozen=True, kw_only=True)
class DPOKOptions(LoopOptions):
    """`dpok`: the KL weight `beta` (required, > 0), the PPO ratio `clip`, `minibatches` per batch and
    `updates_per_batch` passes over each batch."""

    beta: float
    clip: float = 1e-4
    minibatches: int = 1
    updates_per_batch: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_beta(self.beta)
        positive("clip", self.clip)
        integer("minibatches", self.minibatches, 1)
        check("minibatches", self.minibatches, self.minibatches <= self.batch_size, f"<= batch_size = {self.batch_size}")
        integer("updates_per_batch", self.updates_per_batch, 1)


def _clipped_updates(step: Step, ro: Rollout, A: Tensor, clip: float, minibatches: int, beta: float | None) -> None:
    """One Adam step per minibatch on the clipped surrogate l_ik = max(-A_i rho_ik, -A_i clip(rho_ik, 1 -+ clip)):
    DDPO's loss mean_{i,k} l_ik (beta None) or DPOK's mean_i [sum_k l_ik + beta sum_k c_k(theta)], the per-step
    KL c_k taken at the stored states (the sum over steps keeps the reward and the KL on one scale)."""
    for idx in torch.arange(A.numel(), device=A.device).chunk(minibatches):
        sub = Rollout(ro.times, ro.states[:, idx], ro.noise[:, idx], ro.scores[:, idx], ro.pre[:, idx],
                      ro.diffusion, 0)
        s = sub.rescore(step.model)
        rho = sub.log_ratio(s).exp()
        surrogate = torch.maximum(-A[idx] * rho, -A[idx] * rho.clamp(1 - clip, 1 + clip))
        if beta is None:
            loss = surrogate.mean()
        else:
            loss = (surrogate.sum(0) + beta * sub.cost(s).sum(0)).mean()
        step.opt.zero_grad()
        loss.backward()
        step.opt.step()


def dpok(sde: SDE, pretrained: ScoreFn, reward: Reward, options: DPOKOptions, *,
         shape: tuple[int, ...] | None = None, network: nn.Module | None = None,
         generator: torch.Generator | None = None, callback: Callback | None = None) -> tuple[nn.Module, list[dict]]:
    """DPOK (Fan et al. 2305.16381, eqs. 6-7 and Alg. 1): the gradient E[-(r - b) grad log p_theta(x_{k+1} | x_k)]
    with DDPO's clipped per-step ratios on the raw reward (b the leave-one-out batch mean, no normalisation, so
    beta keeps its meaning) plus beta times the gradient of the closed-form per-step KL of the two Gaussian
    transitions, KL(N(m_theta, g^2 h I) || N(m_pre, g^2 h I)) = g^2 h |s_theta - s_pre|^2 / 2 = c_k, at the
    sampled states. Unlike `finetune` the reward term carries no cost to go: the KL's effect on the later
    states is ignored. `options`: `DPOKOptions`; the rest as for `finetune`.
    """
    check("options", options, isinstance(options, DPOKOptions), "a DPOKOptions")

    def update(step: Step, ro: Rollout, r: Tensor, grad: None) -> int:
        A = r - leave_one_out_mean(r[None])[0]
        for _ in range(options.updates_per_batch):
            _clipped_updates(step, ro, A, options.clip, options.minibatches, options.beta)
        return options.updates_per_batch * ro.noise.shape[0] * ro.noise.shape[1]

    return train_loop(sde, pretrained, reward, update, options, shape, network, generator, callback)


def tilted_mixture(mixture: GaussianMixture, c: Tensor, beta: float) -> GaussianMixture:
    """The optimum p_pre exp(c^T x / beta) / Z for a mixture and a linear reward (DESIGN 9):
    weights w_k exp(c^T mu_k / beta + c^T Sigma_k c / (2 beta^2)), means mu_k + Sigma_k c / beta."""
    positive("beta", beta)
    c = torch.as_tensor(c, dtype=mixture.dtype)
    check("c", tuple(c.shape), c.shape == (mixture.dim,), f"a vector of shape ({mixture.dim},)")
    Sc = mixture.covariances @ c
    logw = mixture.weights.log() + mixture.means @ c / beta + Sc @ c / (2 * beta**2)
    return GaussianMixture(torch.softmax(logw, 0), mixture.means + Sc / beta, mixture.covariances)


def mean_pairwise_distance(x: Tensor) -> float:
    """Diversity: the mean Euclidean distance between distinct samples."""
    return float(torch.pdist(x.flatten(1).double()).mean())
