"""SAE's own recipe block (``sae:``), its state, and the search base both frameworks share.

Everything SAE-shaped lives here; the run-wide settings every search shares (``prune_target``,
``sparsity_measure``, ``dtype``, ``device``, ``budget``, ``steps``) stay at the recipe's top
level. :data:`MOVED_FIELDS` maps each field of the older top-level layout to its new place, so
an old recipe is told where each field went.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergekit_sae.domains import (
    CycleLength,
    Fraction,
    NonNegative,
    Rate,
    Redense,
    SparsityScope,
    check_schedule,
)
from mergekit_sae.search.base import Search, SearchSettings
from mergekit_sae.sparsity import cyclic_rate

Framework = Literal["niches", "ga"]
Crossover = Literal["sae_evolve", "slerp", "scf_rkl"]
SparsityForm = Literal["linear", "softmax"]

# Fields of the earlier top-level recipe layout -> where they live now.
MOVED_FIELDS: dict[str, str] = {
    "population_size": "sae.archive_size",
    "schedule": "sae.schedule",
    "fitness_sparsity_weight": "sae.sparsity_term.weight",
    "rescore_population": "sae.rescore (framework: ga)",
    "merge.method": "sae.crossover",
    "merge.sparsity_weight": "sae.merge.sparsity_weight",
    "merge.sparsity_scope": "sae.merge.sparsity_scope",
    "merge.redense": "sae.merge.redense",
    "merge.renormalize": "sae.merge.renormalize",
    "merge.prune_target": "prune_target (top level)",
    "merge.sparsity_measure": "sparsity_measure (top level)",
}

# Settings only one framework reads; setting them under the other is refused.
NICHES_ONLY = (
    "children_per_step",
    "matchmaker",
    "prune_parents",
    "prune_child",
    "redraw_every",
    "rates_under_cap",
    "initial_variants",
    "select_by_sparsity",
)
GA_ONLY = ("rescore", "fitness")


class Schedule(BaseModel):
    """The cyclic sparsity schedule: the rate rises from s_min to s_max in cycles T0, T0*Tmult...

    Its clock is the child count under ``framework: niches`` (one child after another) and the
    step under ``framework: ga`` (one generation of floor(N/2) offspring per step).
    """

    model_config = ConfigDict(extra="forbid")

    s_min: Rate = 0.1
    s_max: Rate = 0.6
    t0: CycleLength = 3
    t_mult: CycleLength = 2

    @model_validator(mode="after")
    def _ordered(self) -> Schedule:
        """The rule ``cyclic_rate`` applies (s_min must not exceed s_max)."""
        check_schedule(self.s_min, self.s_max, self.t0, self.t_mult)
        return self

    def rate(self, tick: int) -> float:
        """The pruning rate at a 0-based tick of the schedule's clock."""
        return cyclic_rate(tick, s_min=self.s_min, s_max=self.s_max, t0=self.t0, t_mult=self.t_mult)


class SaeMergeSettings(BaseModel):
    """Shared parameters of every ``sae_evolve`` offspring merge (paper eq. 5)."""

    model_config = ConfigDict(extra="forbid")

    sparsity_weight: NonNegative = Field(1.0, description="beta of omega = beta * rho in eq. 5")
    sparsity_scope: SparsityScope = Field(
        "global", description="rho per tensor (local) or one per model (global)"
    )
    redense: Redense = Field(
        "parents", description="pruned slots refilled by the other parent, or the dense originals"
    )
    renormalize: bool = Field(True, description="a value only one parent keeps keeps its size")


class SparsityTerm(BaseModel):
    """The sparsity term of the total score: total = shared fitness + weight * term.

    ``linear``: the member's fraction of zeros (the recipe's ``sparsity_measure``);
    ``softmax``: softmax(zeros / temperature) over the archive (the authors' form: like the
    shared fitness, it sums to 1 over the archive). A member with more zeros than ``max_zeros``
    is never a parent and is the first to leave the archive.
    """

    model_config = ConfigDict(extra="forbid")

    form: SparsityForm = Field("linear", description="linear in zeros, or softmax over the archive")
    weight: NonNegative = Field(0.08, description="beta: the term's weight (the fitness weighs 1)")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature tau")
    max_zeros: Fraction | None = Field(
        0.5, description="cap: members with more zeros are evicted first (null: no cap)"
    )


class SaeSettings(SearchSettings):
    """SAE's block (``sae:``). ``framework: niches`` (default) is SAE on M2N2's framework, as
    the paper's authors run it; ``framework: ga`` is section 2.1 read literally (random pairs,
    replace the worst)."""

    framework: Framework = Field("niches", description="niches (M2N2's framework) or ga")
    archive_size: int = Field(
        8, ge=2, description="archive (ga: population) size, dense parents and variants included"
    )
    schedule: Schedule = Field(default_factory=Schedule)
    alpha: float = Field(
        1.0, ge=0.0, description="resource competition exponent (0: no competition)"
    )
    sparsity_term: SparsityTerm = Field(default_factory=SparsityTerm)
    crossover: Crossover = Field(
        "slerp",
        description="offspring operator: sae_evolve (eq. 5), slerp (M2N2's split point), "
        "scf_rkl (fitter parent anchors)",
    )
    merge: SaeMergeSettings = Field(default_factory=SaeMergeSettings)
    children_per_step: int = Field(
        4, ge=1, description="niches: children made one after another per step"
    )
    matchmaker: bool = Field(
        True, description="niches: second parent by attraction (false: by total score)"
    )
    prune_parents: bool = Field(True, description="niches: prune both parents before the merge")
    prune_child: bool = Field(True, description="niches: prune the merged child")
    rates_under_cap: bool = Field(
        True,
        description="niches: under a cap, skip the schedule's rates above "
        "sparsity_term.max_zeros (a child pruned past the cap is never a parent nor the answer)",
    )
    initial_variants: bool = Field(
        True,
        description="niches: start the archive with pruned variants of each parent, filling "
        "archive_size (the paper); false: with the dense parents only, growing as children "
        "join (M2N2's start)",
    )
    select_by_sparsity: bool = Field(
        False,
        description="niches: false (default): parents and eviction use the shared fitness "
        "alone (the cap still applies) and the sparsity term decides only the answer; true: the "
        "term enters the choice of parents and the eviction too (the paper's total score)",
    )
    redraw_every: int | None = Field(
        None,
        ge=1,
        description="niches: draw fresh training items every k steps and re-score the archive "
        "on them (counted in the budget); None keeps step 1's items",
    )
    rescore: bool = Field(True, description="ga: re-score the population on each step's items")
    fitness: Literal["plain", "shared"] = Field(
        "plain", description="ga: replacement by plain or by shared (M2N2) fitness"
    )

    @model_validator(mode="after")
    def _framework_fields(self) -> SaeSettings:
        """Refuse settings the chosen framework does not read (changed from their defaults)."""
        unread = NICHES_ONLY if self.framework == "ga" else GA_ONLY
        fields = type(self).model_fields
        given = [name for name in unread if getattr(self, name) != fields[name].default]
        if given:
            raise ValueError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not read under "
                f"framework {self.framework!r}"
            )
        if self.fitness == "shared" and not self.rescore:
            raise ValueError("fitness 'shared' needs rescore: true")
        return self

    def skips_rates_above_cap(self, sparsity_measure: str) -> bool:
        """Whether the children skip the schedule's rates above the cap: ``rates_under_cap``
        under ``framework: niches``, with a cap, the child pruned and zeros counted
        (``zero_count``: a child pruned at rate r holds r or more)."""
        return (
            self.framework == "niches"
            and self.rates_under_cap
            and self.prune_child
            and self.sparsity_term.max_zeros is not None
            and sparsity_measure == "zero_count"
        )

    def check_rates_under_cap(self, sparsity_measure: str) -> None:
        """Refuse a schedule with no rate at or below the cap when the children skip the rates
        above it (only ``zero_count`` skips: the refusal is not needed under ``magnitude``)."""
        cap = self.sparsity_term.max_zeros
        if self.skips_rates_above_cap(sparsity_measure) and self.schedule.s_min > cap:
            raise ValueError(
                f"rates_under_cap: sae.schedule.s_min ({self.schedule.s_min}) is above "
                f"sae.sparsity_term.max_zeros ({cap}), so no rate is at or below the cap; "
                "lower s_min, raise or remove the cap, or set rates_under_cap: false"
            )


def moved_fields(data: dict[str, Any]) -> list[str]:
    """``field -> new place`` for each field of the earlier layout found in recipe data."""
    found = [f"{old} -> {MOVED_FIELDS[old]}" for old in MOVED_FIELDS if old in data]
    if "merge" in data:
        merge = data["merge"]
        keys = list(merge) if isinstance(merge, dict) else []
        found += [f"merge.{k} -> {MOVED_FIELDS.get(f'merge.{k}', f'sae.merge.{k}')}" for k in keys]
        found += [] if keys else ["merge -> sae.merge"]
    return found


class SaeState(BaseModel):
    """SAE's state between steps (saved in the checkpoint).

    ``archive``: the living member ids in archive order; under ``framework: niches`` also
    ``rows[id]``, each member's flat per-item score row on the current items
    (:func:`~mergekit_sae.search.niches.flat_items`), ``item_weights``, ``draw`` (the item
    draw the rows were scored on), ``children`` (children made so far: the schedule's clock)
    and ``units`` (SLERP's crossover units, read from the first parent).
    """

    archive: list[str] = Field(default_factory=list)
    rows: dict[str, list[float]] = Field(default_factory=dict)
    item_weights: list[float] = Field(default_factory=list)
    draw: int = 0
    children: int = 0
    units: list[list[str]] = Field(default_factory=list)


class SaeBase(Search):
    """What SAE's two frameworks share: the name, the settings and state models, the labels."""

    name = "sae"
    title = "Sparsity-Aware Evolution ([SAE](https://arxiv.org/abs/2602.08218))"
    settings_model = SaeSettings
    state_model = SaeState
    settings: SaeSettings
    state: SaeState

    @property
    def result_label(self) -> str:
        """The evolved model's row label."""
        return "SAE (evolved)"

    def card_settings(self) -> dict[str, Any]:
        """SAE's block and the run's steps."""
        return {"search": self.name, "steps": self.recipe.steps, **self.settings.model_dump()}

    def keep(self) -> list[str]:
        """The living archive."""
        return list(self.state.archive)
