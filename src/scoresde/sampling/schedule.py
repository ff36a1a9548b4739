"""The automatic few-step schedule: end time, knots and final denoise chosen from the model alone by the
distance between the law of the few-step samples and the law of the model's converged sampler.

A few-step sampler's error in law is set mostly by where it stops and whether it denoises, which the path
error of `fit_grid` does not see (two runs can differ point by point and still draw the same law). Here the
objective is a distance between laws: the squared MMD (Gretton et al. 2012, JMLR, Lemma 6: the unbiased
estimate of equal-size samples, over the pairs i != j) between the outputs of the candidate schedule and of the same method at
`reference_nfe` evaluations (its converged law, the target of every schedule), both from the same prior draws moved by
the mean alpha_T E[X_0] of p_T that the prior N(0, I) lacks, as the model estimates it (`prior_shift`), a move the
schedule keeps (`Schedule.prior_mean`) and the sampler applies. The converged law from N(0, I) carries the prior's
error: on near-singular 16-32-D mixtures under VP it sat 1-5e-5 (paired MMD^2 at the report's bandwidths) from the one
from the moved draws, whose mode weights are nearer the data's (session 42), the level of every 10-step sampler's own
error there; knots fitted to it copied that error (ipndm's at NFE 10 on a near-singular mixture were 2.8e-5 farther
from the data than its fixed grid at n = 20000, session 39), and knots fitted from N(0, I) to the moved law's could
only offset it by chance (session 41). The kernels are Gaussian, at bandwidths {1/16, 1/8, 1/4, 1/2, 1, 2}
sqrt(tr Cov) of the reference. Sharing the prior draws cancels most of the estimate's noise in the comparison of
schedules (common random numbers), while the i != j pairs keep it an estimate of the distance between laws, not of
the path error.

The search, as Align Your Steps (Sabour et al. 2404.14507) does, starts from a hand-made grid and then
moves its knots: (1) every grid family of `time_grid` ("poly" powers 2 and 3, "logsnr", "edm", and the
method's own default grid) to end noise-to-signal ratios sigma / alpha in [0.01, 0.5], with the final denoise
on (nfe - 1 steps) or off (nfe steps), and with the analytical first step (`common.first_score`: the prior's
score at T, one step more for the same nfe) off or on unless the options fix it; (2) Nelder-Mead from the best
of (1) over the log step lengths in lambda = log(alpha / sigma) and the end time, twice, each time on probe
draws of its own; (3) a check on probe draws that no choice saw, four times as many as one stage's (the check
runs up to 9 schedules, the search about 70 per first-step setting): the schedule returned is the best on that
set of the method's default, the three best of (1) with each analytical-first setting, and each end of (2), where it
beats the default there by more than
twice the standard error of the paired difference (`mmd2_paired_difference`), else the default. (The winner of (1)
and the end of (2) are both selected on the fit draws, so the selection flatters their fine-scale statistic
(below): on a near-singular mixture both passed it there and failed it on the check, the end of (2) with an excess
of 2.1 against log 3 and 13.5 nats of log-density lost; the runners-up of (1) passed, at 0.4x the MMD^2 of the grid
kept without them, session 40. Checking only the
best of (1) overall, the winner of (1) with the first step on, and its moved knots, lost on the check to the
default on a near-singular mixture, where the best of (1) with it off would have halved the default's error.
Without the margin, ipndm's moved knots at NFE 10 won a check of 512 draws on two near-singular mixtures by
0.5-0.65 standard errors and drew 2-2.8x the default's MMD^2 to the data on 20000 samples; with the margin on 512
check draws, unipc2's moved knots on a 32-D one were kept out at -1.8 standard errors while they had a third of
the default's MMD^2 to the data, session 38.)

Stages (1) and (2) see 2048 probe draws (the check 8192). At NFE 10 the schedules differ by about 1e-5 in MMD^2,
the noise of the objective on 512 draws, and the knots moved on them were a choice among ties: on two near-singular
selection mixtures, 2048 draws brought the schedules of unipc2 and ipndm 3-8x nearer the data's law (at 3.7x the
evaluations; search 9, session 43). With 2048 check draws, ipndm's moved knots at NFE 10 gained 3.8e-6 on the
default at a standard error of 6.2e-6 on a fresh near-singular mixture and the default was kept, 3.2x farther from
the data's law than the knots; on 8192 the gain was 2.9 standard errors and the knots were kept (search 10).

Where Nelder-Mead ends is itself a draw: at NFE 10 many grids fit the probe draws within their noise, and unipc2's
knots on a near-singular 16-D mixture ended 1.6e-5 and 6.5e-6 from the data's law (3 x 4000 samples) from two probe
seeds, at fit values of 5.7e-6 and -3.7e-7. Their check values, 1.49e-5 and 4.5e-6, ranked them as the data did, so
the knots move a second time, from the same grid of (1) on draws of its own, and the check chooses between the two
ends (search 11, session 44). NFE 5 kept 512 draws and one move until unipc2's schedule drew 0.83x the closest
diffusers configuration's MMD^2 on a fresh 32-D near-singular mixture, where 2048 draws reach 0.50x; with two moves on
2048 draws each, the largest ratio to the closest peer on the selection mixtures fell from 0.22x to 0.17x, at 6.4x
the evaluations (search 12, session 45).

The kernels cannot see leftover noise in directions much thinner than sqrt(tr Cov): on a mixture of rank-3
components plus 1e-4 I (thin sd 0.01) the MMD-best schedule stopped at noise-to-signal 0.03-0.2 without the final
denoise, and the samples' mean log-density fell by 90-400 nats while their MMD^2 improved. Leftover noise e in a
direction of variance v raises the score at t_min by about e / v, and costs e^2 / (2 v) of log-density, without
bound; collapsing onto the direction costs at most 1/2. So a schedule is admitted only where the log of its
outputs' mean squared score at t_min, less the largest 1 % (`log_score_level`), exceeds the reference's by at most
the default's excess or log 3 (one evaluation per output; a one-sided constraint: lower is a sampler that ends
nearer the data's thin directions, as the converged one does). Without the trim, five outputs of 512 between thin
components carried 97-100 % of the mean square, so the statistic of one schedule moved by 0.9-2.7 between the fit
and check halves of probes, and the check rejected the moved knots with the lowest MMD^2 on both halves (unipc2 at
NFE 5 on three near-singular reporting targets, session 37). The mean of the logs, robust too, let a schedule
through that cost 16 nats of log-density on a selection target: noise left in a tenth of the outputs moves it by a
tenth of their log.

A stochastic method with a deterministic limit on the same grid (`Method.quiet`: sa3 at tau = 0) gets the
schedule of that limit. The paired estimate loses its common random numbers when the outputs carry fresh noise
(searched on sa3 at tau = 0.25 itself, the objective on 512 draws went to -7e-4 and the default grid was kept),
while the limit's schedule served sa3 at tau <= 0.5 at the null spread at NFE 10 (docs/math/samplers.md). Above
AUTO_MAX_NFE, up to AUTO_STOCHASTIC_MAX_NFE, a stochastic method gets stage (1) and the check, not the knot move:
knots moved to fit the deterministic limit at NFE 20 served it but not sa3's noise (docs/math/samplers.md).
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor
from tqdm.auto import tqdm

from ..core.errors import InvalidValueError
from ..core.sde import LinearSDE, ScoreFn
from ..core.validate import integer
from .common import data_prediction
from .grids import logsnr_grid, time_grid
from .methods import GRID_OPTIONS, METHODS, default_denoise, sample_on_grid, steps_for

__all__ = ["Schedule", "auto_schedule", "auto_by_default", "cached_schedule", "check_auto", "clear_schedule_cache",
           "log_score_level", "mmd2_paired", "mmd2_paired_difference", "prior_shift", "search_options", "AUTO_MAX_NFE",
           "AUTO_STOCHASTIC_MAX_NFE", "N_PROBE", "SEARCH"]

SEARCH = 12  # the search's version (benchmarks/RESULTS.md, "search N"): a schedule stored by another is searched again
AUTO_MAX_NFE = 10  # the automatic schedule applies at nfe <= this (methods with Method.auto; `check_auto`)
AUTO_STOCHASTIC_MAX_NFE = 20  # and a stochastic one up to this, without the knot move
_FAMILIES = (("poly", 2.0), ("poly", 3.0), ("logsnr", 2.0), ("edm", 2.0))
_END_RATIOS = tuple(np.geomspace(0.01, 0.5, 8))
_DENOISE = (True, False)  # candidates with and without the final denoise
_BANDWIDTHS = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)  # set on the selection targets (benchmarks/samplers.py)
_FINE_SLACK = math.log(3.0)  # the rise of the fine-scale statistic always allowed; set on the selection targets
_MARGIN = 2.0  # stage (3) leaves the default for a gain beyond this many standard errors (a 2.3 % one-sided test)
_RUNNERS = 3  # grids of stage (1) per analytical-first setting that stage (3) checks
N_PROBE = 2048  # probe draws per stage of the search (auto_schedule's n_probe; the check 4 times as many)
_MOVES = 2  # knot moves, each on its own n_probe draws (module docstring)
_BATCH = 1024  # draws per sampler run of the search (the model's batch)
_ROWS = 128  # rows per block of the MMD's kernel matrices
_TRIM = 100  # the fine-scale statistic leaves out the largest 1 / _TRIM of the squared scores (module docstring)


@dataclass(frozen=True)
class Schedule:
    """ts: the grid (float64, sde.T down to the end time), denoise: the final denoise, analytic_first: the
    analytical first step, prior_mean: the shift of the prior draws (`prior_shift`, None where the model gave no
    finite one), to pass as `sample(..., **schedule.options)`; choice: which candidate won on the check
    draws ("default", "family", "fitted"); check / default_check: the objective (MMD^2 to the converged law) of
    the returned schedule and of the method's default one on the check draws (for a stochastic method: of its
    deterministic limit); evaluations: score evaluations spent, one per point (a call on a batch of m points counts
    m; compare n * nfe for n samples); seconds: wall time of the search."""

    ts: Tensor
    denoise: bool
    choice: str
    check: float
    default_check: float
    evaluations: int
    seconds: float
    analytic_first: bool = False
    prior_mean: Tensor | None = None

    @property
    def options(self) -> dict:
        """The sampler options that run this schedule."""
        return {"ts": self.ts, "denoise": self.denoise, "analytic_first": self.analytic_first,
                "prior_mean": self.prior_mean}

    @property
    def summary(self) -> str:
        """The choice, denoise, first step, times and the prior mean's norm, in words."""
        norm = "none" if self.prior_mean is None else f"{float(self.prior_mean.norm()):.3g}"
        return (f"{self.choice}, denoise {self.denoise}, analytic first step {self.analytic_first}, times "
                f"{[round(t, 4) for t in self.ts.tolist()]}, prior mean of norm {norm}")


def _kernel(a: Tensor, b: Tensor, bandwidths: Tensor) -> Tensor:
    """The (len(a), len(b)) sums over `bandwidths` of exp(-|a_i - b_j|^2 / (2 h^2)), in float64. Going down the
    bandwidths, one r times narrower than the one before has that kernel to the power r^2: where r^2 is a power of
    2, squarings in place of an exponential (the search's ladder of halvings costs one exponential)."""
    d2 = torch.cdist(a.to(torch.float64), b.to(torch.float64)).square_()
    widths = sorted((float(h) for h in bandwidths), reverse=True)
    k = torch.exp(d2 * (-0.5 / widths[0] ** 2))
    total = k.clone()
    for wide, narrow in zip(widths, widths[1:]):
        squarings = math.log2(wide / narrow) * 2
        if squarings == int(squarings):
            for _ in range(int(squarings)):
                k.square_()
        else:
            k = torch.exp(d2 * (-0.5 / narrow**2))
        total += k
    return total


def _pair_term_rows(x: Tensor, y: Tensor, bandwidths: Tensor) -> Iterator[Tensor]:
    """The (n, n) terms k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(y_i, x_j) of `mmd2_paired`, 0 on the diagonal,
    in blocks of _ROWS rows (a block stays in cache: 15-20x faster than the whole matrix at n = 2048)."""
    for start in range(0, x.shape[0], _ROWS):
        rows = slice(start, start + _ROWS)
        terms = (_kernel(x[rows], x, bandwidths) + _kernel(y[rows], y, bandwidths)
                 - _kernel(x[rows], y, bandwidths) - _kernel(y[rows], x, bandwidths))
        own = torch.arange(terms.shape[0], device=terms.device)
        terms[own, start + own] = 0.0
        yield terms


def mmd2_paired(x: Tensor, y: Tensor, bandwidths: Tensor) -> float:
    """Unbiased squared MMD between the laws of x and y (n, d), pairs (x_i, y_i) drawn jointly and pairs
    i != j independently: the mean over i != j of k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(y_i, x_j), k the
    sum of Gaussian kernels exp(-|a - b|^2 / (2 h^2)) over `bandwidths` (Gretton et al. 2012, Lemma 6)."""
    n = x.shape[0]
    return sum(float(terms.sum()) for terms in _pair_term_rows(x, y, bandwidths)) / (n * (n - 1))


def mmd2_paired_difference(x: Tensor, x0: Tensor, y: Tensor, bandwidths: Tensor) -> tuple[float, float]:
    """mmd2_paired(x, y) - mmd2_paired(x0, y) for triples z_i = (x_i, x0_i, y_i) drawn jointly, and its standard
    error. The difference U is a U-statistic of order 2 with kernel h (the pairs' terms), whose variance is
    (4 (n - 2) zeta_1 + 2 zeta_2) / (n (n - 1)), zeta_1 = Cov(h(z_1, z_2), h(z_1, z_3)), zeta_2 = Var h(z_1, z_2)
    (Hoeffding 1948); E[h_12 h_13] and E[h_12^2] are estimated by their means over distinct indices, theta^2 by U^2."""
    n = x.shape[0]
    total = squares = row_squares = 0.0
    for terms, base in zip(_pair_term_rows(x, y, bandwidths), _pair_term_rows(x0, y, bandwidths)):
        terms -= base
        total += float(terms.sum())
        squares += float(terms.square().sum())
        row_squares += float(terms.sum(1).square().sum())
    u = total / (n * (n - 1))
    zeta_1 = (row_squares - squares) / (n * (n - 1) * (n - 2)) - u**2
    zeta_2 = squares / (n * (n - 1)) - u**2
    return u, math.sqrt(max(4 * (n - 2) * zeta_1 + 2 * zeta_2, 0.0) / (n * (n - 1)))


def log_score_level(score_fn: ScoreFn, x: Tensor, t: float) -> float:
    """log of the mean of |score_fn(x_i, t)|^2 over the points x (n, ...) less the largest ceil(n / 100): the
    automatic schedule's fine-scale statistic (module docstring). A score 0 everywhere: -inf."""
    squares = score_fn(x, torch.full((len(x),), t, dtype=x.dtype, device=x.device)).double().square()
    squares = squares.flatten(1).sum(1).sort().values
    return float(squares[:len(squares) - math.ceil(len(squares) / _TRIM)].mean().log())


def prior_shift(sde: LinearSDE, score_fn: ScoreFn, x_T: Tensor) -> Tensor:
    """alpha_T E[X_0] as the model sees it: the mean over prior draws x_T of alpha_T E[X_0 | X_T = x_T] (Tweedie,
    `common.data_prediction`), the mean that the prior N(0, prior_std^2 I) lacks; one evaluation per draw, in
    batches of _BATCH."""
    T = torch.tensor(float(sde.T), dtype=x_T.dtype, device=x_T.device)
    total = sum(data_prediction(sde, score_fn, x, T).sum(0) for x in x_T.split(_BATCH))
    return sde.alpha(T) * total / x_T.shape[0]


def auto_schedule(sde: LinearSDE, score_fn: ScoreFn, sample_shape: tuple[int, ...], *, method: str, nfe: int,
                  n_probe: int | None = None, n_check: int | None = None, reference_nfe: int = 101,
                  max_iter: int | None = None, seed: int = 0, dtype: torch.dtype | None = None, device=None,
                  progress: bool = False, **options) -> Schedule:
    """The schedule (grid, end time, denoise) of `sample(sde, score_fn, method=method, nfe=nfe, **options)`
    that minimises MMD^2 to the method's converged law (module docstring), from the model alone, with the shift of
    the prior draws (`prior_shift`) it is searched from; a stochastic method above AUTO_MAX_NFE gets the best grid
    family without the knot move.

    m n_probe + n_check prior draws (seeded by `seed`, apart from any generator of the caller), m the knot moves (2;
    1 draw set and no move for a stochastic method above AUTO_MAX_NFE): stage (1) and the first move see the first
    n_probe (default 2048), the second move the next n_probe, the choice is checked on the other n_check (default 4
    n_probe). Where the converged run is not finite (a score returning NaN/inf) it returns the default schedule
    (check inf). Costs at most about (m n_probe + n_check) (reference_nfe + 1) + (nfe + 1) (n_probe (136 + m (1 + 2
    max_iter)) + (7 + m) n_check) score evaluations (68 and 4 in place of 136 and 7 where the options fix
    analytic_first; max_iter: Nelder-Mead iterations, default 30 (steps + 1), each one or two evaluations of the
    objective), shown as a progress bar on stderr with `progress`; the model sees batches of at most 1024 draws. The
    method first runs once on one point with the caller's options (nfe evaluations), so that a bad option is
    refused, naming it, before the search is paid.
    """

    started = time.perf_counter()
    if not isinstance(sde, LinearSDE):
        raise InvalidValueError(f"sde must be a linear SDE for auto_schedule, got {type(sde).__name__}")
    spec = METHODS[method] if method in METHODS else None
    if spec is None or spec.adaptive or spec.takes != "score" or (spec.stochastic(options) and spec.quiet is None):
        fixed = [m for m in METHODS if not METHODS[m].adaptive and METHODS[m].takes == "score"
                 and (not METHODS[m].stochastic({}) or METHODS[m].quiet is not None)]
        raise InvalidValueError(f"method must be a deterministic fixed-grid sampler or one with a deterministic limit "
                                f"(Method.quiet): {', '.join(fixed)}; got {method!r}")
    for name in GRID_OPTIONS:
        if name in options:
            raise InvalidValueError(f"auto_schedule chooses the grid, end time and denoise itself: do not pass {name}")
    integer("nfe", nfe, 2)
    n_probe = N_PROBE if n_probe is None else n_probe
    integer("n_probe", n_probe, 4)
    n_check = 4 * n_probe if n_check is None else n_check
    integer("n_check", n_check, 4)
    integer("reference_nfe", reference_nfe, nfe + 1)
    sample_shape = tuple(int(k) for k in sample_shape)
    dtype = dtype or torch.get_default_dtype()
    # the method's own checks of the caller's options (and of the score's shape), on one point, before the search
    sample_on_grid(sde, score_fn, None, method=method, nfe=nfe, x_T=torch.zeros((1,) + sample_shape, dtype=dtype,
                   device=device), generator=torch.Generator(device or "cpu").manual_seed(seed), check_finite=False,
                   **options)
    move_knots = not (spec.stochastic(options) and nfe > AUTO_MAX_NFE)
    options = search_options(method, options)
    given = options.pop("analytic_first", None)  # fixed by the caller, else searched
    afs_choices = (False, True) if given is None else (given,)
    fits = [f"fit{i}" for i in range(_MOVES if move_knots else 1)]
    probe = sde.prior_sample((len(fits) * n_probe + n_check,) + sample_shape, torch.Generator().manual_seed(seed),
                             dtype)
    probe = probe.to(device)
    default_denoise_on = default_denoise(sde, method, nfe)
    default_afs = bool(given)
    default_steps = steps_for(method, nfe, default_denoise_on, {**options, "analytic_first": default_afs})
    iterations = (max_iter or 30 * (default_steps + 1)) if move_knots else 0
    evaluations = (len(fits) * n_probe + n_check) * (reference_nfe + 1) + (nfe + 1) * (
        n_probe * (68 * len(afs_choices) + len(fits) * (1 + 2 * iterations))
        + n_check * (1 + len(fits) + _RUNNERS * len(afs_choices)))
    bar = tqdm(total=evaluations,
               unit="eval", unit_scale=True,
               desc=f"automatic schedule of {method} at nfe {nfe} (schedule='default' skips it)", leave=False,
               mininterval=2, dynamic_ncols=True, disable=not progress)
    spent = nfe  # the check of the options above

    def run(x_T: Tensor, budget: int, **kw) -> Tensor:
        nonlocal spent
        spent += budget * x_T.shape[0]
        bar.update(budget * x_T.shape[0])
        return torch.cat([sample_on_grid(sde, score_fn, None, method=method, nfe=budget, x_T=x, check_finite=False,
                                         **options, **kw).flatten(1) for x in x_T.split(_BATCH)])

    t_default = spec.default_t_end(sde, default_steps)
    default = (time_grid(sde, default_steps, spec.grid, t_end=t_default, power=spec.power), default_denoise_on,
               default_afs)
    with torch.no_grad(), bar:
        shift = prior_shift(sde, score_fn, probe)
        probe = probe + shift
        reference = run(probe, reference_nfe)
        spent += len(probe)
        bar.update(len(probe))
        if not bool(torch.isfinite(reference).all()):  # nothing to fit to: the default (sample names the NaN)
            return Schedule(default[0], default[1], "default", math.inf, math.inf, spent, time.perf_counter() - started,
                            default[2])
        shift = shift.to(torch.float64).cpu()  # kept with the schedule, as its ts
        scale = math.sqrt(float(torch.var(reference.double(), 0).sum()))
        h = torch.tensor(_BANDWIDTHS, dtype=torch.float64) * scale
        parts = {fit: slice(i * n_probe, (i + 1) * n_probe) for i, fit in enumerate(fits)}
        parts["check"] = slice(len(fits) * n_probe, None)
        ref = {part: reference[rows] for part, rows in parts.items()}
        probes = {part: probe[rows] for part, rows in parts.items()}

        def fine(x: Tensor) -> float:
            nonlocal spent
            spent += x.shape[0]
            bar.update(x.shape[0])
            return log_score_level(score_fn, x.reshape((-1,) + sample_shape), float(sde.t_min))

        ref_fine = {part: fine(x) for part, x in ref.items()}

        def outputs(ts: Tensor, denoise: bool, afs: bool, part: str) -> tuple[Tensor, float] | None:
            x = run(probes[part], nfe, ts=ts, denoise=denoise, analytic_first=afs)
            if not bool(torch.isfinite(x).all()):
                return None
            excess = fine(x) - ref_fine[part]
            return x, excess if excess == excess else 0.0  # nan: a score 0 at every point kept, in both (-inf - -inf)

        default_out = {part: outputs(*default, part) for part in ref}  # sets the allowance, and the default's check
        allowed = {part: max(_FINE_SLACK, out[1] if out else -math.inf) for part, out in default_out.items()}
        default_x = default_out["check"][0] if default_out["check"] else None
        default_check = mmd2_paired(default_x, ref["check"], h) if default_x is not None else math.inf
        checked: dict[tuple, Tensor] = {}  # the check outputs of each choice of stage (3), by grid

        def objective(ts: Tensor, denoise: bool, afs: bool, part: str = "fit0") -> float:
            out = outputs(ts, denoise, afs, part)
            if part == "check" and out:
                checked[(tuple(ts.tolist()), denoise, afs)] = out[0]
            return mmd2_paired(out[0], ref[part], h) if out and out[1] <= allowed[part] else math.inf

        lam_min = float(sde.log_snr(torch.tensor(float(sde.t_min), dtype=torch.float64)))
        lam_max = float(sde.log_snr(torch.tensor(float(sde.T), dtype=torch.float64)))
        candidates = []
        for denoise, afs in ((d, a) for d in _DENOISE for a in afs_choices):
            try:
                n_steps = steps_for(method, nfe, denoise, {**options, "analytic_first": afs})
            except InvalidValueError:
                continue
            for ratio in _END_RATIOS:
                lam_end = -math.log(ratio)
                if not lam_max < lam_end < lam_min:
                    continue
                t_end = float(sde.inverse_log_snr(torch.tensor(lam_end, dtype=torch.float64)))
                for kind, power in dict.fromkeys(_FAMILIES + ((spec.grid, spec.power),)):
                    try:
                        ts = time_grid(sde, n_steps, kind, t_end=t_end, power=power)
                    except InvalidValueError:
                        continue
                    candidates.append((objective(ts, denoise, afs), ts, denoise, afs))
        families: dict[bool, list] = {}  # the _RUNNERS best of (1) with each analytical-first setting, the best first
        for c in sorted(candidates, key=lambda c: c[0]):
            families.setdefault(c[3], []).append(c[1:])
        choices = {("default", default_afs): default,
                   **{("family", afs, rank): c for afs, cs in families.items() for rank, c in enumerate(cs[:_RUNNERS])}}
        best_ts, best_denoise, best_afs = next(iter(families.values()))[0]
        for fit in fits if move_knots else ():
            fitted = _move_knots(sde, best_ts, lambda ts: objective(ts, best_denoise, best_afs, fit), lam_min, max_iter)
            choices[("fitted", best_afs, fit)] = (fitted, best_denoise, best_afs)
        checks = {k: default_check if k[0] == "default" else objective(*c, "check") for k, c in choices.items()}
        key = min(checks, key=lambda k: (checks[k], k[0] != "default"))
        if key[0] != "default" and default_x is not None:  # a gain within the check's noise keeps the default
            ts, denoise, afs = choices[key]
            gain, se = mmd2_paired_difference(checked[(tuple(ts.tolist()), denoise, afs)], default_x, ref["check"], h)
            key = key if gain < -_MARGIN * se else ("default", default_afs)
    ts, denoise, afs = choices[key]
    return Schedule(ts, bool(denoise), key[0], checks[key], default_check, spent, time.perf_counter() - started,
                    bool(afs), shift)


def _move_knots(sde: LinearSDE, start: Tensor, objective, lam_min: float, max_iter: int | None) -> Tensor:
    """Nelder-Mead from `start` over theta = (log step lengths in lambda, lambda at the end), the end kept
    below lambda(t_min), minimising objective(ts); returns the best grid it met."""
    lam = sde.log_snr(start)
    n_steps = len(start) - 1
    T = float(start[0])

    def grid(theta: np.ndarray) -> Tensor | None:
        lam_end = min(float(theta[-1]), lam_min)
        if lam_end <= float(lam[0]) + 1e-3:
            return None
        w = np.exp(theta[:-1] - theta[:-1].max())
        return logsnr_grid(sde, T, float(sde.inverse_log_snr(torch.tensor(lam_end, dtype=torch.float64))),
                           0.01 + (1 - 0.01 * n_steps) * w / w.sum())

    def f(theta: np.ndarray) -> float:
        ts = grid(theta)
        return math.inf if ts is None or not bool((ts[1:] < ts[:-1]).all()) else objective(ts)

    theta0 = np.concatenate([np.log(np.maximum(np.diff(lam.numpy()), 1e-6)), [float(lam[-1])]])
    simplex = np.vstack([theta0] + [theta0 + 0.3 * e for e in np.eye(n_steps + 1)])
    fit = minimize(f, theta0, method="Nelder-Mead",
                   options=dict(initial_simplex=simplex, maxiter=max_iter or 30 * (n_steps + 1), xatol=1e-2,
                                fatol=0.0))
    ts = grid(fit.x)
    return start if ts is None else ts


_CACHE: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()
_SEARCHED: set = set()  # (a score function's code or type, cache key) of every search: to name repeated ones
_LOG = logging.getLogger("scoresde")


def search_options(method: str, options: dict) -> dict:
    """The solver options the schedule of `method` with `options` is searched with: a stochastic method's
    deterministic limit (`Method.quiet`), so every noise level of one method shares one schedule."""
    spec = METHODS[method]
    return {**options, **spec.quiet} if spec.stochastic(options) and spec.quiet is not None else dict(options)


def check_auto(sde: object, *, method: str, nfe: int, **options) -> None:
    """Refuse, naming why, an automatic schedule where it does not apply: methods with `Method.auto` at
    2 <= nfe <= AUTO_MAX_NFE (a stochastic one: AUTO_STOCHASTIC_MAX_NFE) on a linear SDE, deterministic or with a
    deterministic limit, without grid options (it chooses them)."""
    spec = METHODS[method] if method in METHODS else None
    given = sorted(k for k in GRID_OPTIONS if k in options)
    top = AUTO_STOCHASTIC_MAX_NFE if spec is not None and spec.stochastic(options) else AUTO_MAX_NFE
    why = (f"applies to methods {', '.join(m for m in METHODS if METHODS[m].auto)}, got {method!r}"
           if spec is None or not spec.auto else
           f"does not combine with {', '.join(given)}" if given else
           f"needs a linear SDE, got {type(sde).__name__}" if not isinstance(sde, LinearSDE) else
           f"applies at 2 <= nfe <= {AUTO_MAX_NFE} ({AUTO_STOCHASTIC_MAX_NFE} for a stochastic method), got {nfe}"
           if not 2 <= int(nfe) <= top else
           "applies to deterministic solvers and to stochastic ones with a deterministic limit (Method.quiet)"
           if spec.stochastic(options) and spec.quiet is None else "")
    if why:
        raise InvalidValueError(f"schedule='auto' {why}")


def auto_by_default(sde: object, *, method: str, nfe: int, **options) -> bool:
    """Whether `sample` (schedule=None) and `scoresde sample` take the automatic schedule unasked: where it
    applies (`check_auto`) at nfe <= AUTO_MAX_NFE; a stochastic method's schedule above that is opt-in."""
    if nfe > AUTO_MAX_NFE:
        return False
    try:
        check_auto(sde, method=method, nfe=nfe, **options)
    except InvalidValueError:
        return False
    return True


def _cell(c) -> list:
    """A closure cell's content ([] while the variable is unassigned)."""
    try:
        return [c.cell_contents]
    except ValueError:
        return []


def _modules_behind(obj: object, depth: int = 3) -> list[torch.nn.Module]:
    """The nn.Modules a score object reaches: itself, or those a function closes over (its closure cells and
    defaults), a bound method's object, a functools.partial's function and arguments, a plain object's
    attributes, and so on `depth` levels down (not inside lists, dicts or globals)."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if depth == 0:
        return []
    if inspect.ismethod(obj):
        inner = [obj.__self__, obj.__func__]
    elif isinstance(obj, functools.partial):
        inner = [obj.func, *obj.args, *obj.keywords.values()]
    elif inspect.isfunction(obj):
        inner = [v for c in obj.__closure__ or () for v in _cell(c)]
        inner += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        inner = list(vars(obj).values())
    else:
        return []
    return [m for o in inner for m in _modules_behind(o, depth - 1)]


def _weights_version(owner: object) -> tuple[int, ...]:
    """The in-place version counters of the parameters and buffers of the modules behind a score object
    (`_modules_behind`; an optimiser step, an EMA update or load_state_dict moves them): a cached schedule follows
    the weights it was searched for. () where no module is found."""
    return tuple(t._version for m in _modules_behind(owner) for t in m.state_dict(keep_vars=True).values()
                 if isinstance(t, Tensor))


def cached_schedule(sde: LinearSDE, score_fn: ScoreFn, sample_shape: tuple[int, ...], *, method: str, nfe: int,
                    dtype: torch.dtype, device=None, n_probe: int | None = None, **options) -> Schedule:
    """`auto_schedule` at its defaults but `n_probe`, computed once per score function object (a bound method: per
    object and function), sde, method, nfe, sample shape, dtype, device, n_probe and solver options
    (`search_options`: sa3 at any tau shares one), and kept while the score function lives; a search logs its
    cost (logger "scoresde", level WARNING). The entry follows the weights of the nn.Modules behind the score
    function (itself, or those a function, partial or object holds: `_modules_behind`), so an in-place update
    searches again; weights reached another way (a global, a list or dict) keep it: call `clear_schedule_cache`.
    Only where the automatic schedule applies (`check_auto`)."""
    check_auto(sde, method=method, nfe=nfe, **options)
    owner, func = (score_fn.__self__, score_fn.__func__) if inspect.ismethod(score_fn) else (score_fn, None)
    key = (func, sde, method, int(nfe), tuple(sample_shape), dtype, str(device), n_probe or N_PROBE,
           repr(sorted(search_options(method, options).items())))
    try:
        entries = _CACHE.setdefault(owner, {})
    except TypeError:  # not weakly referable: no cache
        entries = {}
    version = _weights_version(owner)
    if key not in entries or entries[key][0] != version:
        s = auto_schedule(sde, score_fn, sample_shape, method=method, nfe=nfe, dtype=dtype, device=device,
                          n_probe=n_probe, progress=True, **options)
        entries[key] = version, s
        kind = (getattr(owner, "__code__", type(owner)), key)  # a function's code, else the object's type
        again = (" This kind of score function was searched before: if it is made anew for each call, each call "
                 "searches again; keep one object, or pass schedule='default'." if kind in _SEARCHED else "")
        _SEARCHED.add(kind)
        _LOG.warning("scoresde: automatic schedule of %s at nfe %d searched (once per model; schedule='default' "
                     "skips it): %d score evaluations, %.1f s; %s.%s", method, nfe, s.evaluations, s.seconds, s.summary,
                     again)
    return entries[key][1]


def clear_schedule_cache() -> None:
    """Forget every cached automatic schedule (`cached_schedule`)."""
    _CACHE.clear()
    _SEARCHED.clear()
