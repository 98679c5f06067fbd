"""Sparsity-Aware Evolution (arXiv 2602.08218, section 2) as a search of the shared driver.

Start: the dense parents plus ``sae_prune`` variants at rates spread over [s_min, s_max].
Step t (1-based), with pruning rate r_t = cyclic_rate(t - 1):

1. score the population on the step's items (every member when ``rescore_population``, else
   only members never scored), so offspring and members are compared on the same items;
2. shuffle the population into floor(N/2) pairs;
3. for each pair, make the ``sae_evolve`` merge of the two members (scores = their
   performance, densities 1.0 since members are already sparse, offspring density 1 - r_t),
   score it, and let it replace the worst member when its fitness (performance + beta_fit *
   global sparsity) is strictly higher.

With ``merge.method: scf_rkl`` step 3's offspring is instead the ``scf_rkl`` merge of the pair:
the fitter member (plain fitness; ties: the first of the pair) is the anchor, the other the
donor, and the fused density is r_t (the share of the anchor's coordinates the schedule lets the
donor replace); that offspring is not pruned (:func:`scf_rkl_offspring_record`).

With ``fitness: shared`` the replacement compares M2N2's shared fitness instead (resource
competition over the step's per-item scores of the population and the child, exponent
``alpha``): a child that solves items few members solve is worth more. The final model is
still the member of highest plain fitness.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from mergekit_sae.evolve.population import (
    Member,
    MergeInput,
    MergeRecord,
    best_index,
    fitness,
    initial_layout,
    lineage,
    random_pairs,
    replacement_slot,
    worst_index,
)
from mergekit_sae.search.base import (
    Driver,
    Proposal,
    Result,
    Search,
    SearchSettings,
    flat_items,
    shared_fitness,
)
from mergekit_sae.sparsity import cyclic_rate

# Smallest score handed to the merge: eq. 5 is undefined when every parent scores zero.
SCORE_FLOOR = 1e-6


class SaeSettings(SearchSettings):
    """SAE's own block (``sae:``); population, schedule and merge settings are top-level."""

    fitness: Literal["plain", "shared"] = Field(
        "plain", description="replacement by plain fitness, or by M2N2-style shared fitness"
    )
    alpha: float = Field(1.0, ge=0.0, description="exponent of the shared fitness")
    resample: bool = Field(True, description="draw fresh training items every step")


class SaeState(BaseModel):
    """The living population, in archive order."""

    population: list[str] = Field(default_factory=list)


def rate_at(recipe: Any, step: int) -> float:
    """The schedule's pruning rate of a 1-based step."""
    schedule = recipe.schedule
    return cyclic_rate(
        step - 1, s_min=schedule.s_min, s_max=schedule.s_max, t0=schedule.t0, t_mult=schedule.t_mult
    )


def prune_record(recipe: Any, parent: Member, rate: float, dtype: str) -> MergeRecord:
    """The ``sae_prune`` stage that makes a sparse variant of a parent at a pruning rate."""
    delta = recipe.merge.prune_target == "delta"
    return MergeRecord(
        method="sae_prune",
        inputs=[MergeInput(member=parent.id, parameters={"density": 1.0 - rate})],
        base_model=recipe.base_model if delta else None,
        parameters={"prune_target": recipe.merge.prune_target},
        dtype=dtype,
    )


def parent_inputs(
    settings: Any, parents: Sequence[Member], density: float | None = None
) -> list[MergeInput]:
    """Per-model ``sae_evolve`` inputs: score = performance (at least SCORE_FLOOR), the
    density when given, and the global sparsity under the global scope."""
    inputs = []
    for parent in parents:
        per_model: dict[str, Any] = {"score": max(float(parent.performance), SCORE_FLOOR)}
        if density is not None:
            per_model["density"] = density
        if settings.sparsity_scope == "global":
            per_model["global_sparsity"] = parent.sparsity
        inputs.append(MergeInput(member=parent.id, parameters=per_model))
    return inputs


def merge_parameters(settings: Any, offspring_density: float) -> dict[str, Any]:
    """The shared ``sae_evolve`` parameters of the recipe's merge settings."""
    return {
        "sparsity_weight": settings.sparsity_weight,
        "sparsity_measure": settings.sparsity_measure,
        "sparsity_scope": settings.sparsity_scope,
        "renormalize": settings.renormalize,
        "prune_target": settings.prune_target,
        "offspring_density": offspring_density,
    }


def offspring_record(
    recipe: Any, parents: Sequence[Member], originals: Sequence[Member], rate: float, dtype: str
) -> MergeRecord:
    """The ``sae_evolve`` stage that makes one offspring of a pair at the step's rate.

    Per-model: ``score`` = the parent's performance (at least SCORE_FLOOR, so a pair that
    scores zero on every task still merges, with equal weights), ``density`` = 1.0 (members
    are already pruned), ``global_sparsity`` = its global sparsity (global scope). With ``redense:
    original`` the original dense parents the pair descends from follow as ``dense_reference``
    inputs (the method refills pruned slots from their mean), except an original that is itself
    one of the pair: MergeKit cannot take one model twice, and a dense parent in the pair already
    holds every slot. When that leaves no reference the merge is recorded as ``redense:
    parents`` (with ``renormalize``, the dense member's values then fill those slots alike).
    """
    settings = recipe.merge
    inputs = parent_inputs(settings, parents, density=1.0)
    references = [
        original
        for original in dict.fromkeys(m.id for m in originals)
        if original not in {parent.id for parent in parents}
    ]
    redense = settings.redense if references else "parents"
    if redense == "original":
        for original in references:
            inputs.append(MergeInput(member=original, parameters={"dense_reference": True}))
    delta = settings.prune_target == "delta"
    return MergeRecord(
        method="sae_evolve",
        inputs=inputs,
        base_model=recipe.base_model if delta else None,
        parameters={**merge_parameters(settings, 1.0 - rate), "redense": redense},
        dtype=dtype,
    )


def scf_rkl_offspring_record(pair: Sequence[Member], rate: float, dtype: str) -> MergeRecord:
    """The ``scf_rkl`` stage of one offspring: the fitter member anchors, the other donates.

    Fitness is the members' plain fitness (ties: the first of the pair); the fused density
    is the schedule's rate, so the offspring keeps 1 - rate of the anchor's coordinates.
    """
    first, second = pair
    fitter = float(second.fitness or 0.0) > float(first.fitness or 0.0)
    anchor, donor = (second, first) if fitter else (first, second)
    return MergeRecord(
        method="scf_rkl",
        inputs=[MergeInput(member=donor.id)],
        base_member=anchor.id,
        parameters={"density": rate},
        dtype=dtype,
    )


def original_parents(members: dict[str, Member], pair: Sequence[Member]) -> list[Member]:
    """The dense parents the members of a pair descend from, in order of creation."""
    found = {
        ancestor.id: ancestor
        for member in pair
        for ancestor in lineage(members, member.id)
        if ancestor.origin == "parent"
    }
    return [found[identifier] for identifier in sorted(found)]


class SaeSearch(Search):
    """The paper's search: pair, merge with sparsity-aware weights, prune, replace the worst."""

    name = "sae"
    title = "Sparsity-Aware Evolution ([SAE](https://arxiv.org/abs/2602.08218))"
    settings_model = SaeSettings
    state_model = SaeState
    settings: SaeSettings
    state: SaeState

    @classmethod
    def natural_budget(cls, recipe: Any, settings: SearchSettings) -> int | None:
        """Population scores (every step when re-scoring, else once) plus floor(N/2) offspring."""
        size, pairs = recipe.population_size, recipe.population_size // 2
        if recipe.rescore_population:
            return recipe.steps * (size + pairs)
        return size + recipe.steps * pairs

    @classmethod
    def check_recipe(cls, recipe: Any, settings: SearchSettings) -> None:
        """The population holds every parent; shared fitness compares per-item scores of one
        step, so it needs re-scoring."""
        if recipe.population_size < len(recipe.models):
            raise ValueError(
                f"population_size ({recipe.population_size}) must be at least the number of "
                f"models ({len(recipe.models)}): every dense parent starts in the population"
            )
        if getattr(settings, "fitness", "plain") == "shared" and not recipe.rescore_population:
            raise ValueError("sae.fitness 'shared' needs rescore_population: true")

    def start(self, driver: Driver) -> None:
        """Each dense parent, then pruned variants dealt round-robin at spread rates."""
        recipe = self.recipe
        parents = [driver.members[i] for i in driver.parents]
        layout = initial_layout(
            len(parents), recipe.population_size, recipe.schedule.s_min, recipe.schedule.s_max
        )
        population = []
        for index, rate in layout:
            if rate is None:
                population.append(parents[index].id)
                continue
            proposal = Proposal(
                merge=prune_record(recipe, parents[index], rate, driver.dtype),
                origin="pruned",
                inputs=(parents[index].id,),
            )
            (made,) = driver.make([proposal], score=False)
            population.append(made.member.id)
        self.state.population = population

    def fitness_of(self, member: Member) -> float:
        """Plain fitness: performance + beta_fit * global sparsity."""
        return fitness(
            float(member.performance), member.sparsity, self.recipe.fitness_sparsity_weight
        )

    def step(self, driver: Driver, step: int) -> None:
        """Score the population, make one offspring per pair, replace the worst when fitter."""
        recipe = self.recipe
        rate = rate_at(recipe, step)
        scf_rkl = recipe.merge.method == "scf_rkl"
        if scf_rkl:
            driver.note(rate=rate, scf_rkl_density=rate)
        else:
            driver.note(rate=rate, offspring_density=1.0 - rate)
        population = self.state.population
        wanted = [
            i
            for i in population
            if recipe.rescore_population or driver.members[i].scored_at is None
        ]
        scored = driver.rescore(wanted)
        for result in scored:
            result.member.fitness = self.fitness_of(result.member)
        if len(scored) < len(wanted):
            return  # the budget ran out while scoring the population
        rows = {r.member.id: r.item_scores for r in scored}
        driver.note(fitness_before={i: float(driver.members[i].fitness) for i in population})
        pairs = random_pairs(population, driver.rng(step, "pairs"))
        proposals = []
        for first, second in pairs:
            pair = [driver.members[first], driver.members[second]]
            if scf_rkl:
                record = scf_rkl_offspring_record(pair, rate, driver.dtype)
            else:
                originals = original_parents(dict(driver.members), pair)
                record = offspring_record(recipe, pair, originals, rate, driver.dtype)
            proposals.append(Proposal(merge=record, origin="offspring", inputs=(first, second)))
        for child in driver.make(proposals):
            child.member.fitness = self.fitness_of(child.member)
            slot = self.replacement(driver, population, rows, child)
            if slot is not None:
                driver.note(replacements={child.member.id: population[slot]})
                population[slot] = child.member.id
                rows[child.member.id] = child.item_scores

    def replacement(
        self,
        driver: Driver,
        population: list[str],
        rows: dict[str, dict[str, list[float]]],
        child: Result,
    ) -> int | None:
        """The slot the child takes (plain or shared fitness), or None when it is not fitter."""
        members = driver.members
        if self.settings.fitness == "plain":
            current = [float(members[i].fitness) for i in population]
            return replacement_slot(current, float(child.member.fitness))
        matrix, weights = [], []
        for scores in [*(rows[i] for i in population), child.item_scores]:
            row, weights = flat_items(scores, driver.task_weights)
            matrix.append(row)
        shared = shared_fitness(matrix, self.settings.alpha, weights)
        beta = self.recipe.fitness_sparsity_weight
        candidates = [*(members[i] for i in population), child.member]
        values = [f + beta * m.sparsity for f, m in zip(shared, candidates, strict=True)]
        slot = worst_index(values[:-1])
        return slot if values[-1] > values[slot] else None

    @property
    def result_label(self) -> str:
        """The evolved model's row label."""
        return "SAE (evolved)"

    def card_settings(self) -> dict[str, Any]:
        """Population, schedule, fitness and merge settings, and SAE's own block."""
        recipe = self.recipe
        return {
            "search": self.name,
            "population_size": recipe.population_size,
            "steps": recipe.steps,
            "schedule": recipe.schedule.model_dump(),
            "fitness_sparsity_weight": recipe.fitness_sparsity_weight,
            **recipe.merge.model_dump(),
            **self.settings.model_dump(mode="json"),
        }

    def keep(self) -> list[str]:
        """The living population."""
        return list(self.state.population)

    def best(self, members: Mapping[str, Member]) -> str:
        """The living member of highest plain fitness (earliest in archive order on ties)."""
        living = [members[i] for i in self.state.population]
        values = [float(m.fitness) if m.fitness is not None else float("-inf") for m in living]
        return living[best_index(values)].id
