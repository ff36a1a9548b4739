"""Model families (imaging tutorial, DESIGN section 12) as records in one registry, `FAMILIES`.

A `Family` declares what training, sampling and evaluation need to know about a family, so that no
caller tells families apart by their attributes: `Config.model` names the record, `Config.loss` must
be one of its `losses`, `Config.sampler` one of its `methods`. Each family module registers its record:

- "score" (`models.score`): `precond.ScoreModel` on any SDE; losses: the score-matching losses of
  `learning.losses`, "ncsn" (SMLD, `models.ncsn`) and "consistency", whose runs form the variant family
  "consistency" (an x0-parametrised score network read as a consistency function, no score);
- "ddpm" (`models.ddpm`): discrete DDPM, its own ancestral sampler;
- "vae" (`models.vae`): a VAE, sampled by decoding prior draws.

To add a family: write its module with a builder (and losses in `learning.losses.LOSSES`), register a
`Family` record there, and import the module in `models/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Mapping

from torch import Tensor, nn

from ..core.errors import InvalidValueError
from ..core.registry import Registry

__all__ = ["Family", "FAMILIES", "EVALUATIONS", "register", "unwrap"]

Builder = Callable[..., nn.Module]  # (cfg, sde, sample_shape, network: () -> nn.Module) -> model
Generate = Callable[..., Tensor]  # (model, shape, *, method, nfe, generator) -> samples of `shape`

# what a model with a score s(x, t) = grad log p_t supports beyond sampling: the probability-flow likelihood,
# a grid fitted to the model (`sampling.tuning.fit_grid`), inpainting, classifier-free label guidance and
# the score-error TV bound of T 5.2 (`running.runs.analytic_report`)
EVALUATIONS = ("likelihood", "fit_grid", "inpaint", "guidance", "tv_bound")


@dataclass(frozen=True)
class Family:
    """One model family.

    name: the `Config.model` value. build(cfg, sde, sample_shape, network) -> the model (network() builds
    `cfg.net`). losses: the `Config.loss` values it trains with, the default first. methods: the sampling
    methods it accepts, the default first. generate: its own sampler generate(model, shape, method=, nfe=,
    generator=; on the model's device), or None: the model is sampled by `sampling.sample` (as a score, or as a consistency
    function for methods that take one). has_score: forward(x, t) returns grad log p_t. evaluations: the
    names in `EVALUATIONS` that apply (all need a score). variants: loss -> the family of a run trained
    with that loss (a run's family is `for_loss(cfg.loss)`).
    """

    name: str
    build: Builder
    losses: tuple[str, ...]
    methods: tuple[str, ...]
    generate: Generate | None = None
    has_score: bool = False
    evaluations: frozenset[str] = frozenset()
    variants: Mapping[str, Family] = field(default_factory=dict)

    def __post_init__(self):
        if not self.losses or not self.methods:
            raise InvalidValueError(f"family {self.name!r} needs at least one loss and one sampling method")
        unknown = sorted(set(self.evaluations) - set(EVALUATIONS))
        if unknown:
            raise InvalidValueError(f"evaluations must be among {', '.join(EVALUATIONS)}, got {', '.join(unknown)}")
        if self.evaluations and not self.has_score:
            raise InvalidValueError(f"family {self.name!r}: evaluations {sorted(self.evaluations)} need has_score=True")
        if not set(self.variants) <= set(self.losses):
            raise InvalidValueError(f"family {self.name!r}: variants must be keyed by its losses, got {sorted(self.variants)}")

    def for_loss(self, loss: str) -> Family:
        """The family of a run of this model trained with `loss` (this one or a declared variant)."""
        if loss not in self.losses:
            raise InvalidValueError(f"model {self.name!r} trains with loss {', '.join(self.losses)}; got loss {loss!r}")
        return self.variants.get(loss, self)

    def check_method(self, method: str) -> None:
        """ValueError unless `method` samples this family."""
        if method not in self.methods:
            raise InvalidValueError(f"sampling method {method!r} does not apply to a {self.name!r} model; "
                             f"valid: {', '.join(self.methods)}")

    def require(self, evaluation: str) -> None:
        """ValueError unless `evaluation` (a name in EVALUATIONS) applies to this family."""
        if evaluation not in EVALUATIONS:
            raise InvalidValueError(f"evaluation must be one of {', '.join(EVALUATIONS)}, got {evaluation!r}")
        if evaluation not in self.evaluations:
            raise InvalidValueError(f"{evaluation} needs a score model (model: score, a score-matching loss); "
                             f"this run's family is {self.name!r}")


FAMILIES: "Registry[Family]" = Registry("model")


def register(family: Family) -> Family:
    """Add `family` to FAMILIES under its name."""
    return FAMILIES.register(family.name)(family)


def unwrap(model: Callable) -> nn.Module:
    """The module under label binding (functools.partial) and DistributedDataParallel."""
    if isinstance(model, partial):
        model = model.func
    return getattr(model, "module", model)
