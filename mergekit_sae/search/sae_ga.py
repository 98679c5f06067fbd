"""SAE as section 2.1 of the paper reads literally (``sae: {framework: ga}``): a generational GA.

Start: the dense parents plus ``sae_prune`` variants at rates spread over [s_min, s_max].
Step t (1-based), with pruning rate r_t = the schedule at t - 1:

1. score the population on the step's items (every member when ``rescore``, else only
   members never scored), so offspring and members are compared on the same items;
2. shuffle the population into floor(N/2) pairs (:func:`random_pairs`);
3. for each pair, make the ``sae_evolve`` merge of the two members (scores = their
   performance, densities 1.0 since members are already sparse, offspring density 1 - r_t),
   score it, and let it replace the worst member when its fitness (performance + weight *
   global sparsity, :func:`plain_fitness`) is strictly higher (:func:`replacement_slot`).

Items are drawn afresh every step. With ``crossover: slerp`` the offspring is M2N2's split-point
SLERP of the pair, pruned at r_t (a ``sae_prune`` stage of the blend); with ``crossover:
scf_rkl`` it is the ``scf_rkl`` merge of the pair (the fitter member anchors, fused density r_t,
not pruned). With
``fitness: shared`` the replacement compares M2N2's shared fitness (exponent ``alpha``) over
the step's per-item scores of the population and the child. The answer is the living member of
highest plain fitness.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_sae.records import Member
from mergekit_sae.search.base import Driver, Proposal, Result, SearchSettings
from mergekit_sae.search.niches import (
    best_index,
    flat_items,
    read_units,
    shared_fitness,
    worst_index,
)
from mergekit_sae.search.sae_operators import (
    make_initial_archive,
    offspring_proposal,
)
from mergekit_sae.search.sae_settings import SaeBase, SaeSettings


def plain_fitness(performance: float, sparsity: float, weight: float) -> float:
    """F = performance + weight * global sparsity: sparsity competes with performance."""
    return performance + weight * sparsity


def random_pairs(ids: Sequence[str], rng: random.Random) -> list[tuple[str, str]]:
    """Shuffle the population and pair it up into floor(N/2) disjoint pairs."""
    order = list(ids)
    rng.shuffle(order)
    return [(order[2 * i], order[2 * i + 1]) for i in range(len(order) // 2)]


def replacement_slot(fitnesses: Sequence[float], candidate: float) -> int | None:
    """Slot the candidate takes: the worst member's, if the candidate is strictly fitter."""
    slot = worst_index(fitnesses)
    return slot if candidate > fitnesses[slot] else None


class SaeGaSearch(SaeBase):
    """The paper's section 2.1 loop: pair at random, merge, prune, replace the worst."""

    title = "Sparsity-Aware Evolution ([SAE](https://arxiv.org/abs/2602.08218)), generational GA"

    @classmethod
    def natural_budget(cls, recipe: Any, settings: SearchSettings) -> int | None:
        """Population scores (every step when re-scoring, else once) plus floor(N/2) offspring."""
        assert isinstance(settings, SaeSettings)
        size, pairs = settings.archive_size, settings.archive_size // 2
        if settings.rescore:
            return recipe.steps * (size + pairs)
        return size + recipe.steps * pairs

    def items_draw(self, step: int) -> int:
        """Fresh training items every step."""
        return step

    def start(self, driver: Driver) -> None:
        """The initial population (and, for SLERP, the crossover units)."""
        self.state.archive = make_initial_archive(self.recipe, self.settings, driver)
        if self.settings.crossover == "slerp":
            self.state.units = read_units(driver)

    def fitness_of(self, member: Member) -> float:
        """Plain fitness: performance + weight * global sparsity."""
        weight = self.settings.sparsity_term.weight
        return plain_fitness(float(member.performance), member.sparsity, weight)

    def step(self, driver: Driver, step: int) -> None:
        """Score the population, make one offspring per pair, replace the worst when fitter."""
        settings = self.settings
        rate = settings.schedule.rate(step - 1)
        scf_rkl = settings.crossover == "scf_rkl"
        if scf_rkl:
            driver.note(rate=rate, scf_rkl_density=rate)
        else:
            driver.note(rate=rate, offspring_density=1.0 - rate)
        population = self.state.archive
        wanted = [i for i in population if settings.rescore or driver.members[i].scored_at is None]
        scored = driver.rescore(wanted)
        for result in scored:
            result.member.fitness = self.fitness_of(result.member)
        if len(scored) < len(wanted):
            return  # the budget ran out while scoring the population
        rows = {r.member.id: r.item_scores for r in scored}
        driver.note(fitness_before={i: float(driver.members[i].fitness) for i in population})
        pairs = random_pairs(population, driver.rng(step, "pairs"))
        left = driver.budget_left
        affordable = pairs if left is None else pairs[:left]
        proposals = [
            self.offspring(driver, pair, rate, driver.rng(step, "pairs", index, "crossover"))
            for index, pair in enumerate(affordable)
        ]
        for child in driver.make(proposals):
            child.member.fitness = self.fitness_of(child.member)
            slot = self.replacement(driver, population, rows, child)
            if slot is not None:
                driver.note(replacements={child.member.id: population[slot]})
                population[slot] = child.member.id
                rows[child.member.id] = child.item_scores

    def offspring(
        self, driver: Driver, ids: tuple[str, str], rate: float, rng: random.Random
    ) -> Proposal:
        """The proposal of one pair's offspring at the step's rate (a SLERP blend is made now)."""
        return offspring_proposal(
            driver,
            self.recipe,
            self.settings,
            ids,
            self.state.units,
            rng,
            parent_density=1.0,
            child_density=1.0 - rate,
            rate=rate,
            fitness=[float(driver.members[i].fitness or 0.0) for i in ids],
        )

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
        beta = self.settings.sparsity_term.weight
        candidates = [*(members[i] for i in population), child.member]
        values = [f + beta * m.sparsity for f, m in zip(shared, candidates, strict=True)]
        slot = worst_index(values[:-1])
        return slot if values[-1] > values[slot] else None

    def best(self, members: Mapping[str, Member]) -> str:
        """The living member of highest plain fitness (earliest in archive order on ties)."""
        living = [members[i] for i in self.state.archive]
        values = [float(m.fitness) if m.fitness is not None else float("-inf") for m in living]
        return living[best_index(values)].id
