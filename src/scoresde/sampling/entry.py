"""`sample`, the entry point of the sampling layer: the automatic few-step schedule where it applies
(`schedule`), then the method on its grid (`methods.sample_on_grid`)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.sde import SDE, ScoreFn
from ..core.validate import integer
from .common import Callback
from .methods import METHODS, prepare, sample_on_grid
from .schedule import auto_by_default, cached_schedule

__all__ = ["sample", "check_schedule", "resolve_schedule"]


def check_schedule(schedule: object) -> None:
    """Refuse a `schedule` other than None, "default" or "auto", naming the ones allowed."""
    if schedule not in (None, "default", "auto"):
        raise InvalidValueError(f"schedule must be 'default', 'auto' or None (auto where it applies), got {schedule!r}")


def resolve_schedule(schedule: str | None, search_draws: int | None, *,
                     names: tuple[str, str] = ("schedule='default'", "search_draws")) -> str | None:
    """`schedule` as asked: "auto" where `search_draws` (the search's size, an integer >= 4) is given, which is
    refused beside schedule="default"; `names`: how the caller spells that and search_draws in its messages."""
    if search_draws is None:
        return schedule
    integer(names[1], search_draws, 4)
    if schedule == "default":
        raise InvalidValueError(f"{names[1]} sizes the automatic schedule's search; it does not combine with "
                                f"{names[0]}")
    return "auto"


def sample(sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...] | None, *, method: str, nfe: int,
           generator: torch.Generator | None = None, x_T: Tensor | None = None, callback: Callback | None = None,
           check_finite: bool = True, schedule: str | None = None, search_draws: int | None = None,
           **options) -> Tensor:
    """Draw samples with `method` (a name in METHODS) spending exactly `nfe` score evaluations: the arguments,
    budget rules and errors of `methods.sample_on_grid`, on the grid `schedule` names.

    schedule: "default", the method's fixed grid (or the options' grid); "auto", the automatic schedule
    (`schedule.cached_schedule`: searched from score_fn once per score object, method, nfe, sample shape, dtype
    and device, its cost logged; refused, naming why, where it does not apply); None: "auto" where it applies
    unasked (`schedule.auto_by_default`: ipndm / unipc2 / unipc3 / sa3 at nfe <= 10 on a linear SDE, no grid option
    given), else "default". The automatic schedule also moves x_T (drawn or given) by the mean alpha_T E[X_0] of p_T
    that the prior lacks, as the model estimates it (its `prior_mean` option). The search draws its own probe points:
    it leaves `generator` untouched. search_draws: the search's probe draws per stage (`auto_schedule`'s n_probe,
    default N_PROBE = 2048; its cost is about linear in them, benchmarks/RESULTS.md "search size"); it asks for the
    automatic schedule, and is refused beside schedule="default".
    """
    check_schedule(schedule)
    schedule = resolve_schedule(schedule, search_draws)
    if schedule == "auto" or schedule is None and method in METHODS and METHODS[method].auto:
        _, nfe, x_T = prepare(sde, method, nfe, shape, x_T, generator, options.pop("dtype", None))
        if schedule or auto_by_default(sde, method=method, nfe=nfe, **options):
            s = cached_schedule(sde, score_fn, tuple(x_T.shape[1:]), method=method, nfe=nfe, dtype=x_T.dtype,
                                device=x_T.device, n_probe=search_draws, **options)
            options = {**options, **s.options}
    return sample_on_grid(sde, score_fn, shape, method=method, nfe=nfe, generator=generator, x_T=x_T,
                          callback=callback, check_finite=check_finite, **options)
