"""Samplers for every SDE of scoresde (DESIGN section 4), run on a grid by `sample_on_grid`.

`sample_on_grid(sde, score_fn, shape, method=..., nfe=...)` (and so `sampling.sample`) spends exactly `nfe` score
evaluations (at most `nfe` for the adaptive "dopri5"). Each method is a `Method` record in `METHODS`
that declares its budget, default grid, noise, denoise and SDE rules. Budget rules, d = 1 if the final
Tweedie denoise is on (default: `Method.denoise`) else 0:

| method | function | NFE |
|---|---|---|
| em | euler_maruyama (T 5.21) | steps + d |
| ei | exponential_integrator (T 5.20) | steps + d |
| pc | predictor_corrector (T 5.22) | steps (1 + corrector_steps) + d |
| ald | annealed_langevin (NCSN) | levels steps_per_level + d, levels >= 2 |
| euler | ode_euler (probability flow) | steps + d |
| heun | heun | 2 steps + d; d defaults to nfe odd, so every nfe >= 2 works |
| dopri5 | dopri5 (adaptive) | at most nfe, else RuntimeError |
| ipndm | ipndm: Adams-Bashforth on the noise prediction in sigma / alpha (order option, default 3) | steps + d |
| dpm1, dpm2m, dpm3m | dpm_solver_multistep, order 1/2/3 | steps + d |
| unipc2, unipc3 | dpm_solver_multistep, order 2/3, corrector, extrapolated denoise | steps + d |
| sa3 | dpm_solver_multistep, order 3, corrector, tau (default 1): SA-Solver; tau = 0 is unipc3's solver | steps + d |
| adaptive_sde | adaptive_sde: EM / improved-Euler pair, batch-wise steps on one Brownian path (2105.14080) | at most nfe, else RuntimeError |
| ddim | ddim (eta option; deterministic at eta = 0) | steps + d |
| ddpm | ddpm: ancestral, variance "posterior" beta-tilde (default, = ddim eta 1) or "beta" | steps + d |
| dpm2m_sde, dpm3m_sde | sde_dpm_solver_multistep, order 2/3: SDE-DPM-Solver++ (2211.01095) | steps + d |
| edm_sde | edm_sde: EDM Alg. 2, churn (S_churn, default 40) then heun's step from the churned time | 2 steps + d, d as heun |
| consistency | consistency_method: k steps of a consistency model | steps, no denoise (d = 0) |

With the option analytic_first=True (ipndm and the dpm_solver_multistep methods) the first step takes the prior's
score at no evaluation (`common.first_score`): NFE = steps + d - 1.

Default grids: uniform in t for em, ei, pc, dpm2m_sde, ipndm; log-SNR for ald; EDM rho = 7 for euler, heun,
edm_sde; quadratic in t ("poly", power 2) for dpm1, dpm2m, dpm3m, dpm3m_sde, ddim, ddpm; cubic in t ("poly", power 3)
for unipc*, whose default t_end is `end_time_for_steps` (noise-to-signal max(0.4 / steps, 0.045); sa3's and ipndm's
0.4 / steps, down to sde.t_min); chosen by benchmarks/samplers.py, dpm2m_sde's on the MNIST models (benchmarks/RESULTS.md
session 29). Other methods end at sde.t_min.

Automatic schedule: for ipndm / unipc2 / unipc3 / sa3 (`Method.auto`) at nfe <= 10 the entry point `sampling.sample`
(`entry`) runs them on the grid, end time and denoise that `schedule.cached_schedule` chooses from the model
(searched once per score object, method and nfe); `schedule="default"` or any grid option keeps the fixed grid.

Options: `grid` ("uniform", "logsnr", "edm", "poly"), `t_end`, `rho`, `power`, or an
explicit decreasing `ts` (e.g. `fit_grid(...).ts`, a grid fitted to the model on probe draws); `denoise` (default on for linear SDEs; the general Langevin SDE has
no Tweedie step); `prior_mean` (a tensor of the sample shape added to x_T: the mean alpha_T E[X_0] of p_T that the
prior N(0, I) lacks, as `schedule.prior_shift` estimates it; the automatic schedule passes it); `dtype` (when x_T is
not given); and each
function's own keywords (eta, snr, corrector_steps, predictor, order, rtol, atol, ...), among them
`noise` ("gaussian" i.i.d. draws, the default, or "brownian": one Brownian path whatever the grid; `noise.step_noise`)
for em, ei, dpm2m_sde, dpm3m_sde and edm_sde.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from ..core.errors import BudgetExhaustedError, InvalidValueError, NonFiniteError
from ..core.registry import Registry
from ..core.sde import SDE, LinearSDE, ScoreFn
from .adaptive import adaptive_sde
from .common import Callback, require_linear
from .consistency import consistency_method
from .ddim import ddim, ddpm
from .edm import DEFAULT_S_CHURN, edm_sde
from .grids import EXTRAPOLATED_END_RATIO, end_time_for_steps, time_grid
from .ode import dopri5, dpm_solver_multistep, heun, ipndm, ode_euler
from .pc import annealed_langevin, predictor_corrector
from .sde_multistep import sde_dpm_solver_multistep
from .stochastic import euler_maruyama, exponential_integrator

__all__ = ["sample_on_grid", "prepare", "METHODS", "Method", "default_denoise", "steps_for", "GRID_OPTIONS"]


def _one(options: dict) -> int:
    return 1


def _never(options: dict) -> bool:
    return False


def _always(options: dict) -> bool:
    return True


def _always_denoise(nfe: int) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    """A sampler as `sample` drives it; every rule `sample`, `steps_for`, `default_denoise` and `fit_grid`
    apply is declared here, none is keyed on a method's name.

    fn: fn(sde, model, x_T, ts, **kw) (adaptive: without ts). evals_per_step(options): model calls per grid
    step. levels_are_points: the grid has one point per level (ald). grid, power: the default grid
    (`time_grid` kind and poly power). end_ratio: None, the default end time is sde.t_min; a number r, it is
    `end_time_for_steps` with min_ratio r (`default_t_end`). stochastic(options): it draws noise with these options
    (it then gets the generator; only deterministic fixed-grid methods can be grid-fitted). adaptive: it picks its
    own steps (nfe is a cap enforced by a counter; only t_end applies). denoise(nfe): whether the final Tweedie step
    is on by default (on linear SDEs only). linear: it needs alpha and sigma (a LinearSDE). takes: what fn's second
    argument is: "score" s(x, t) or "consistency" f(x, t) (a consistency model). auto: the automatic schedule
    (`schedule.cached_schedule`, `scoresde sample --schedule auto`) applies. quiet: the options that make a
    stochastic method deterministic on the same grid (sa3: tau = 0); the automatic schedule of the stochastic method
    is the one searched for them.
    """

    fn: Callable[..., Tensor]
    evals_per_step: Callable[[dict], int] = _one
    levels_are_points: bool = False
    grid: str = "logsnr"
    power: float = 2.0
    end_ratio: float | None = None
    stochastic: Callable[[dict], bool] = _never
    adaptive: bool = False
    denoise: Callable[[int], bool] = _always_denoise
    linear: bool = False
    takes: str = "score"
    auto: bool = False
    quiet: dict | None = None

    def __post_init__(self):
        if self.takes not in ("score", "consistency"):
            raise InvalidValueError(f"takes must be 'score' or 'consistency', got {self.takes!r}")

    def default_t_end(self, sde: SDE, n_steps: int) -> float:
        """The end time of the default grid of n_steps steps."""
        if self.end_ratio is None or not isinstance(sde, LinearSDE):
            return float(sde.t_min)
        return end_time_for_steps(sde, n_steps, min_ratio=self.end_ratio)


METHODS: "Registry[Method]" = Registry("sampling method")
for _name, _method in {
    "em": Method(euler_maruyama, grid="uniform", stochastic=_always),
    "ei": Method(exponential_integrator, grid="uniform", stochastic=_always, linear=True),
    "pc": Method(predictor_corrector, lambda o: 1 + o.get("corrector_steps", 1), grid="uniform", stochastic=_always),
    "ald": Method(annealed_langevin, lambda o: o.get("steps_per_level", 1), True, "logsnr", stochastic=_always,
                  linear=True),
    # EDM rho = 7: quadratic in t wins for Euler and Heun under VP (Heun, NFE 21, ring component-scale MMD^2
    # 1.5e-4 vs 2.8e-3) but loses under VE (swiss-roll teacher, Heun NFE 10: W2 3.40 vs 0.29), so the default
    # stays the parametrisation-free EDM grid; pass grid="poly" for VP
    "euler": Method(ode_euler, grid="edm"),
    # two evaluations per step: the final denoise is on where nfe is odd, so every nfe >= 2 works
    "heun": Method(heun, lambda o: 2, grid="edm", denoise=lambda nfe: nfe % 2 == 1),
    "dopri5": Method(dopri5, adaptive=True),
    # uniform in t and order 3: the best of its families, end times and orders at NFE 5 on the near-singular
    # selection target sing16s301; sa3's end time (noise-to-signal 0.4 / steps, down to t_min): at NFE 5 and 10 it
    # beat t_min on all six selection targets in MMD^2 and log-density gap (at t_min the thin directions kept
    # noise, gap -2430 and -1020 at NFE 5), level at NFE 20 and 50 (benchmarks/RESULTS.md, session 33); the
    # automatic schedule applies
    "ipndm": Method(ipndm, grid="uniform", end_ratio=0.0, linear=True, auto=True),
    # default grid "poly" (t quadratic): best at NFE 5 on both benchmark targets, mixed with uniform at
    # NFE 10, ahead of log-SNR and EDM rho = 7, tied at NFE >= 20 (benchmarks/RESULTS.md)
    "dpm1": Method(partial(dpm_solver_multistep, order=1), grid="poly", linear=True),
    "dpm2m": Method(partial(dpm_solver_multistep, order=2), grid="poly", linear=True),
    "dpm3m": Method(partial(dpm_solver_multistep, order=3), grid="poly", linear=True),
    # deterministic at eta = 0 (its default): the first-order exponential integrator of the flow
    "ddim": Method(ddim, grid="poly", stochastic=lambda o: bool(o.get("eta", 0.0)), linear=True),
    # ancestral sampling, variance "posterior" (beta-tilde, DDIM eta = 1) by default or "beta"
    "ddpm": Method(ddpm, grid="poly", stochastic=_always, linear=True),
    # SDE-DPM-Solver++. On exact-score toys no grid won consistently (|log-density gap|, ring and mix16, VP and VE,
    # NFE 10/20/50: "poly" best in 10 of 24 cases, uniform 10, logsnr 3, edm 1); on the MNIST models uniform in t
    # beat "poly" on sample seeds no choice saw: VP at NFE 20 and 50 and VE at NFE 20, two training seeds each
    # (FID_inf 2-22 points, benchmarks/RESULTS.md session 29). dpm3m_sde was not measured there and keeps "poly"
    "dpm2m_sde": Method(partial(sde_dpm_solver_multistep, order=2), grid="uniform", stochastic=_always, linear=True),
    "dpm3m_sde": Method(partial(sde_dpm_solver_multistep, order=3), grid="poly", stochastic=_always, linear=True),
    # EDM's stochastic sampler: heun's budget, grid and denoise rule; deterministic (= heun) at S_churn = 0
    "edm_sde": Method(edm_sde, lambda o: 2, grid="edm", stochastic=lambda o: o.get("S_churn", DEFAULT_S_CHURN) > 0,
                      denoise=lambda nfe: nfe % 2 == 1, linear=True),
    # predictor + corrector at one NFE per step; the grid, end time and extrapolated denoise won at NFE 5-20
    # schedule.cached_schedule applies (Method.auto): it won on held-out targets' MMD^2 (samplers --part heldout)
    "unipc2": Method(partial(dpm_solver_multistep, order=2, corrector=True, extrapolate=True), grid="poly",
                     power=3.0, end_ratio=EXTRAPOLATED_END_RATIO, linear=True, auto=True),
    "unipc3": Method(partial(dpm_solver_multistep, order=3, corrector=True, extrapolate=True), grid="poly",
                     power=3.0, end_ratio=EXTRAPOLATED_END_RATIO, linear=True, auto=True),
    # SA-Solver: unipc3's predictor-corrector on the reverse SDE with noise scale tau (1: the reverse SDE of
    # T 2.7); the plain Tweedie denoise (the extrapolation assumes the flow); unipc3's grid. Its end time
    # follows the steps without unipc's floor: the plain denoise shrinks a data component of sd s by
    # ratio^2 / (s^2 + ratio^2) in variance, not O(ratio^4) (at the floor 0.045 its samples came out too
    # concentrated: log-density gap +0.3 to +0.4 at NFE 20-50 on mix16). Its automatic schedule is that of
    # tau = 0: at tau <= 0.5 it kept MMD^2 at the null spread at NFE 10 on the 16-D mixtures
    # (benchmarks/stochastic.py), where the default grid is 5-20x above it
    "sa3": Method(partial(dpm_solver_multistep, order=3, corrector=True, tau=1.0), grid="poly", power=3.0,
                  end_ratio=0.0, stochastic=lambda o: bool(o.get("tau", 1.0)), linear=True, auto=True,
                  quiet={"tau": 0.0}),
    "adaptive_sde": Method(adaptive_sde, adaptive=True, stochastic=_always),
    # a consistency model's steps at the first k times of the grid (every step is a denoise, so none follows)
    "consistency": Method(consistency_method, grid="edm", stochastic=_always, denoise=lambda nfe: False,
                          linear=True, takes="consistency"),
}.items():
    METHODS.register(_name)(_method)


# the grid's options and the start's, which `sample_on_grid` reads itself (and the automatic schedule chooses)
GRID_OPTIONS = ("grid", "t_end", "rho", "power", "ts", "denoise", "prior_mean")


def _budget_counter(score_fn: ScoreFn, nfe: int, method: str) -> ScoreFn:
    calls = 0

    def counted(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls > nfe:
            raise BudgetExhaustedError(f"{method} needs more than nfe={nfe} score evaluations at these rtol/atol; "
                                       "raise nfe or loosen the tolerances")
        return score_fn(x, t)

    return counted


def default_denoise(sde: SDE, method: str, nfe: int) -> bool:
    """The final Tweedie step: on for linear SDEs where the method's rule (`Method.denoise`) says so."""
    return isinstance(sde, LinearSDE) and METHODS[method].denoise(nfe)


def steps_for(method: str, nfe: int, denoise: bool, options: dict) -> int:
    """Grid steps that spend exactly `nfe` evaluations with `method` (budget rules of the module docstring);
    ValueError when nfe does not fit."""
    spec = METHODS[method]
    per_step = spec.evals_per_step(options)
    budget = nfe - int(bool(denoise))
    free = int(bool(options.get("analytic_first", False)))  # the analytical first step costs no evaluation
    n_steps = budget // per_step - int(spec.levels_are_points) + free if per_step > 0 else 0
    if per_step < 1 or budget % per_step or n_steps < 1:
        extra = " plus 1 for the final denoise" if denoise else ""
        raise InvalidValueError(f"nfe={nfe} does not fit method {method!r}: it needs a multiple of {per_step} "
                         f"(at least {per_step * (1 + int(spec.levels_are_points))}){extra}")
    return n_steps


def prepare(sde: SDE, method: str, nfe: int, shape: tuple[int, ...] | None, x_T: Tensor | None,
            generator: torch.Generator | None, dtype: torch.dtype | None) -> tuple[Method, int, Tensor]:
    """The method's record, nfe as an int and the initial state: x_T as given, or a prior draw of `shape` (at
    least one sample) in `dtype` (default torch's) on the generator's device; each refused, naming it, when bad."""
    try:
        spec = METHODS[method]
    except KeyError as err:
        raise InvalidValueError(f"method: {err.args[0]}") from None
    if int(nfe) != nfe or nfe < 1:
        raise InvalidValueError(f"nfe must be an integer >= 1, got {nfe}")
    if x_T is None:
        if shape is None:
            raise InvalidValueError("shape must be given when x_T is not")
        _check_shape("shape", tuple(shape))
        x_T = sde.prior_sample(tuple(shape), generator=generator, dtype=dtype or torch.get_default_dtype(),
                               device=None if generator is None else generator.device)
    else:
        if not (isinstance(x_T, Tensor) and x_T.is_floating_point()):
            got = x_T.dtype if isinstance(x_T, Tensor) else type(x_T).__name__
            raise InvalidValueError(f"x_T must be a real floating-point tensor, got {got}")
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise InvalidValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)}")
        _check_shape("x_T's shape", tuple(x_T.shape))
    return spec, int(nfe), x_T


def sample_on_grid(sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...] | None, *, method: str, nfe: int,
                   generator: torch.Generator | None = None, x_T: Tensor | None = None,
                   callback: Callback | None = None, check_finite: bool = True, **options) -> Tensor:
    """Draw samples with `method` (a name in METHODS) spending exactly `nfe` score evaluations, on the method's
    fixed grid or the one the options give (`sampling.sample` adds the automatic schedule).

    score_fn(x, t), t of shape (batch,). x_T (default: a prior draw of `shape`, at least one sample, in
    `options["dtype"]`, default torch's default dtype, on the generator's device) fixes the dtype and device
    of the whole run.
    callback(step, t, x) sees every grid time (t = 0 for the denoised output).
    Raises ValueError when `nfe` does not fit the method's budget rule (module docstring), and
    `NonFiniteError` when the samples hold NaN/inf (one check of the output, skipped with
    check_finite=False, e.g. by a caller that scores unstable grids itself).
    """
    spec, nfe, x_T = prepare(sde, method, nfe, shape, x_T, generator, options.pop("dtype", None))
    if spec.linear:
        require_linear(sde, f"method {method!r}")
    denoise = options.pop("denoise", default_denoise(sde, method, nfe))
    if denoise not in (True, False):
        raise InvalidValueError(f"denoise must be true or false, got {denoise!r}")
    grid_opts = {k: options.pop(k) for k in GRID_OPTIONS if k in options and k != "denoise"}
    x_T = _moved(x_T, grid_opts.pop("prior_mean", None))
    _check_options(method, spec.fn, options)
    if spec.takes == "score":  # a consistency model is passed on as it is (its sampler reads its type)
        score_fn = _shape_checked(score_fn)
    kwargs = dict(options, denoise=bool(denoise), callback=callback)
    if spec.stochastic(options):
        kwargs["generator"] = generator
    if spec.adaptive:
        if "t_end" in grid_opts:
            kwargs["t_end"] = grid_opts["t_end"]
        x = spec.fn(sde, _budget_counter(score_fn, nfe, method), x_T, **kwargs)
        return _finite(x, method, nfe) if check_finite else x
    n_steps = steps_for(method, nfe, denoise, options)
    ts = grid_opts.get("ts")
    if ts is None:
        t_end = grid_opts.get("t_end")
        if t_end is None:
            t_end = spec.default_t_end(sde, n_steps)
        ts = time_grid(sde, n_steps, kind=grid_opts.get("grid", spec.grid), t_end=t_end,
                       rho=grid_opts.get("rho", 7.0), power=grid_opts.get("power", spec.power),
                       dtype=x_T.dtype, device=x_T.device)
    else:
        ts = torch.as_tensor(ts).to(device=x_T.device, dtype=x_T.dtype)
    if len(ts) != n_steps + 1:
        raise InvalidValueError(f"ts has {len(ts)} times but nfe={nfe} gives {n_steps} steps ({n_steps + 1} times)")
    x = spec.fn(sde, score_fn, x_T, ts, **kwargs)
    return _finite(x, method, nfe) if check_finite else x


def _moved(x_T: Tensor, prior_mean: Tensor | None) -> Tensor:
    """x_T + prior_mean (in x_T's dtype and device); refused, naming prior_mean, unless it is a finite tensor of
    x_T's sample shape."""
    if prior_mean is None:
        return x_T
    if not isinstance(prior_mean, Tensor) or tuple(prior_mean.shape) != tuple(x_T.shape[1:]):
        got = f"shape {tuple(prior_mean.shape)}" if isinstance(prior_mean, Tensor) else type(prior_mean).__name__
        raise InvalidValueError(f"prior_mean must be a tensor of the sample shape {tuple(x_T.shape[1:])}, got {got}")
    if not bool(torch.isfinite(prior_mean).all()):
        raise InvalidValueError("prior_mean must be finite")
    return x_T + prior_mean.to(device=x_T.device, dtype=x_T.dtype)


def _check_options(method: str, fn: Callable, options: dict) -> None:
    """InvalidValueError naming the options `fn` (the method's solver) does not take, and the ones it does."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    own = {"sde", "score_fn", "x_T", "ts", "denoise", "callback", "generator"}
    valid = sorted(k for k, p in params.items() if k not in own and p.kind is not p.VAR_POSITIONAL)
    unknown = sorted(set(options) - set(params) - {"generator"})
    if unknown:
        raise InvalidValueError(f"method {method!r} takes no option {', '.join(map(repr, unknown))}; its options: "
                                f"{', '.join(valid) or 'none'} (and {', '.join(GRID_OPTIONS)}, dtype)")


def _shape_checked(score_fn: ScoreFn) -> ScoreFn:
    """score_fn, refusing an output that is not a tensor of the input's shape (which would broadcast silently)."""
    def checked(x: Tensor, t: Tensor) -> Tensor:
        s = score_fn(x, t)
        if not isinstance(s, Tensor) or s.shape != x.shape:
            got = f"shape {tuple(s.shape)}" if isinstance(s, Tensor) else type(s).__name__
            raise InvalidValueError(f"score_fn(x, t) must return a tensor of the shape of x {tuple(x.shape)}, got {got}")
        return s

    return checked


def _check_shape(name: str, shape: tuple[int, ...]) -> None:
    if not shape or any(int(k) < 1 for k in shape):
        raise InvalidValueError(f"{name} must be (n, ...) with n >= 1 samples and every size >= 1, got {shape}")


def _finite(x: Tensor, method: str, nfe: int) -> Tensor:
    """x, or NonFiniteError when it holds NaN/inf (one reduction, one host sync)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).sum())
        raise NonFiniteError(f"the samples of method {method!r} at nfe={nfe} are not finite ({bad} of {x.shape[0]} "
                             "hold NaN/inf): the score returned NaN/inf, or the step is unstable (raise nfe or "
                             "use another method)")
    return x
