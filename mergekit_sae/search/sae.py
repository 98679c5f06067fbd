"""Sparsity-Aware Evolution (arXiv 2602.08218) on M2N2's framework, as its authors run it.

The paper adopts the framework of Abrantes et al. (M2N2, natural niches) and its authors' code
(FeiYe0310/SparseFusion, "Sparsity-Aware Natural Niches") is that loop with sparsity added. This
module takes the framework from the code and the offspring operator from the paper:

- **Archive** of ``archive_size`` members, started as the paper says: each dense parent plus
  ``sae_prune`` variants at rates spread over [s_min, s_max]; all scored in step 1.
- **Per-item scores on fixed items** (as M2N2): every child costs exactly one evaluation.
  ``redraw_every: k`` draws fresh items every k steps and re-scores the archive on them (those
  evaluations count in the budget).
- **Total score** (:func:`total_scores`): shared fitness (resource competition, exponent
  ``alpha``; the per-item weights sum to 1, so it is a member's share of the items, as the
  authors' fitness divided by M^alpha) + ``weight`` * the sparsity term, ``linear`` (the
  member's fraction of zeros) or ``softmax`` (the authors' softmax over the archive with a
  temperature). A member with more zeros than ``max_zeros`` scores -inf: never a parent, first
  to leave. Probabilities are built from the positive part of the totals and fall back to a
  uniform draw, never from normalising negative scores. ``select_by_sparsity: false`` (the
  default, chosen on held-out training items) leaves the term out of parents and eviction
  (:func:`selection_term`; the cap stays), so it decides only the answer; true gives the
  paper's total score to both.
- **Parents** (:func:`choose_parents`): the first with probability proportional to the total
  score; the second by attraction to the first (M2N2's matchmaker), or by total score.
- **Offspring**: ``crossover: slerp`` (the default, chosen on held-out training items:
  ``benchmarks/results/sae_defaults.md``) is M2N2's split-point SLERP; ``sae_evolve`` is the
  paper's eq. 5 per-tensor merge of the pair (parent scores plus sparsity signals, attraction,
  ``renormalize``, ``redense``), one MergeKit stage; ``scf_rkl`` fuses into the fitter member.
- **Mutation**: magnitude pruning at the cyclic schedule's rate (its clock: the children made so
  far), applied to both parents before the merge and to the child (section 2.4). With
  ``sae_evolve`` both are densities of the one stage; with ``slerp`` they are ``sae_prune``
  stages around the ``slerp`` stage. No Gaussian noise (pre-trained models). Under a cap,
  ``rates_under_cap`` skips the rates above it (:func:`child_tick`).
- **Archive update** (:func:`eviction_slot`): the child joins; once full, the member of archive +
  child with the lowest total score leaves (the child itself when it is the worst).
- **The answer** (:func:`result_index`): the member of highest total score without competition
  (alpha 0: the performance plus the sparsity term). The shared fitness rewards holding items
  few others solve, which keeps the archive diverse; the answer is the model best on all items.

``framework: ga`` keeps the paper's section 2.1 read literally (:mod:`.sae_ga`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_sae.records import Member
from mergekit_sae.search.base import Driver, Result, Search, SearchSettings
from mergekit_sae.search.niches import (
    EXCLUDED,
    best_index,
    choose_parents,
    eviction_slot,
    fate,
    flat_items,
    place_child,
    read_units,
    shared_fitness,
)
from mergekit_sae.search.sae_ga import SaeGaSearch
from mergekit_sae.search.sae_operators import (
    initial_size,
    make_initial_archive,
    offspring_proposal,
)
from mergekit_sae.search.sae_settings import SaeBase, SaeSettings, Schedule, SparsityTerm

# --- pure rules -------------------------------------------------------------------------------


def sparsity_terms(zeros: Sequence[float], form: str, temperature: float = 1.0) -> list[float]:
    """The sparsity term of each member: its zeros (linear), or softmax(zeros / tau) over all."""
    if form == "linear":
        return [float(z) for z in zeros]
    top = max(zeros) / temperature
    exps = [math.exp(z / temperature - top) for z in zeros]
    total = sum(exps)
    return [e / total for e in exps]


def total_scores(
    rows: Sequence[Sequence[float]],
    item_weights: Sequence[float],
    zeros: Sequence[float],
    alpha: float,
    term: SparsityTerm,
) -> list[float]:
    """Total = shared fitness (exponent alpha) + weight * sparsity term; -inf above the cap."""
    fitness = shared_fitness(rows, alpha, item_weights)
    terms = sparsity_terms(zeros, term.form, term.temperature)
    cap = term.max_zeros
    return [
        EXCLUDED if cap is not None and z > cap else f + term.weight * t
        for f, t, z in zip(fitness, terms, zeros, strict=True)
    ]


def selection_term(term: SparsityTerm, select_by_sparsity: bool) -> SparsityTerm:
    """The term that parents and eviction see: the recipe's, or its cap alone (weight 0)."""
    return term if select_by_sparsity else term.model_copy(update={"weight": 0.0})


def child_tick(schedule: Schedule, tick: int, cap: float | None) -> int:
    """The schedule tick of the next child: ``tick``, or under a cap the first tick from it
    whose rate is at most the cap (the next cycle's start at the latest: each cycle starts at
    s_min). A child pruned at a rate above the cap holds more zeros than the cap allows, so
    it could never be a parent nor the answer: its evaluation would be spent for nothing."""
    if cap is None:
        return tick
    if schedule.s_min > cap:
        raise ValueError(f"schedule.s_min ({schedule.s_min}) is above the cap ({cap})")
    while schedule.rate(tick) > cap:
        tick += 1
    return tick


def answer_values(
    performances: Sequence[float], zeros: Sequence[float], term: SparsityTerm
) -> list[float]:
    """Each member's answer score: performance + weight * sparsity term (no competition)."""
    terms = sparsity_terms(zeros, term.form, term.temperature)
    return [p + term.weight * t for p, t in zip(performances, terms, strict=True)]


def result_index(
    performances: Sequence[float | None], zeros: Sequence[float], term: SparsityTerm
) -> int:
    """The answer: the highest :func:`answer_values`; members never scored or over the cap only
    when nothing else is left."""
    cap = term.max_zeros
    scores = answer_values([p or 0.0 for p in performances], zeros, term)
    values = [
        EXCLUDED if p is None or (cap is not None and z > cap) else v
        for p, v, z in zip(performances, scores, zeros, strict=True)
    ]
    if all(v == EXCLUDED for v in values):
        values = [EXCLUDED if p is None else p for p in performances]
    return best_index(values)


# --- the search -------------------------------------------------------------------------------


class SaeSearch(SaeBase):
    """SAE on natural niches: competition, attraction, pruning as mutation, SLERP or eq. 5."""

    @classmethod
    def create(cls, recipe: Any, settings: SearchSettings, state: Any = None) -> Search:
        """The framework's search: natural niches, or the generational GA."""
        assert isinstance(settings, SaeSettings)
        variant = SaeGaSearch if settings.framework == "ga" else cls
        return variant(recipe, settings, state)

    @classmethod
    def natural_budget(cls, recipe: Any, settings: SearchSettings) -> int | None:
        """The archive's first scores, one evaluation per child, and each re-draw's re-scores
        (``archive_size`` each: an archive grown from the dense parents that is not full yet at
        a re-draw re-scores fewer, and the run ends with that budget unspent)."""
        assert isinstance(settings, SaeSettings)
        if settings.framework == "ga":
            return SaeGaSearch.natural_budget(recipe, settings)
        redraws = (recipe.steps - 1) // settings.redraw_every if settings.redraw_every else 0
        first = initial_size(settings, len(recipe.models))
        return first + settings.archive_size * redraws + recipe.steps * settings.children_per_step

    @classmethod
    def check_recipe(cls, recipe: Any, settings: SearchSettings) -> None:
        """Every dense parent starts in the archive."""
        assert isinstance(settings, SaeSettings)
        if settings.archive_size < len(recipe.models):
            raise ValueError(
                f"sae.archive_size ({settings.archive_size}) must be at least the number of "
                f"models ({len(recipe.models)}): every dense parent starts in the archive"
            )
        settings.check_rates_under_cap(recipe.sparsity_measure)

    def items_draw(self, step: int) -> int:
        """Step 1's items, or a fresh draw every ``redraw_every`` steps."""
        every = self.settings.redraw_every
        return 1 if every is None else 1 + ((step - 1) // every) * every

    def start(self, driver: Driver) -> None:
        """The initial archive (scored in step 1) and, for SLERP, the crossover units."""
        self.state.archive = make_initial_archive(self.recipe, self.settings, driver)
        if self.settings.crossover == "slerp":
            self.state.units = read_units(driver)

    def step(self, driver: Driver, step: int) -> None:
        """Score the archive on a new draw of items, then make the step's children in turn."""
        state = self.state
        draw_now = self.items_draw(step)
        if state.draw != draw_now:
            if not self.score_archive(driver):
                return  # the budget ran out while scoring the archive
            state.draw = draw_now
        driver.note(total_before=self.totals_by_member(driver))
        children = []
        for index in range(self.settings.children_per_step):
            made = self.make_child(driver, step, index)
            if made is None:
                break  # the budget is spent
            children.append(made)
        if children:
            driver.note(rate=sum(c["rate"] for c in children) / len(children))
        driver.note(children=children, archive_total=self.totals_by_member(driver))

    def score_archive(self, driver: Driver) -> bool:
        """Score every archive member on the step's items, keeping their flat per-item rows;
        False when the budget ran out."""
        state = self.state
        results = driver.rescore(state.archive)
        for result in results:
            row, state.item_weights = flat_items(result.item_scores, driver.task_weights)
            state.rows[result.member.id] = row
        self.set_fitness(driver)
        return len(results) == len(state.archive)

    def totals(
        self, driver: Driver, ids: Sequence[str], rows: Sequence[Sequence[float]] | None = None
    ) -> list[float]:
        """The total scores of members against each other, on their rows of the current items
        (``rows``: those of ``ids``, when not all are stored yet)."""
        settings = self.settings
        rows = [self.state.rows[i] for i in ids] if rows is None else rows
        zeros = [driver.members[i].sparsity for i in ids]
        term = selection_term(settings.sparsity_term, settings.select_by_sparsity)
        return total_scores(rows, self.state.item_weights, zeros, settings.alpha, term)

    def totals_by_member(self, driver: Driver) -> dict[str, float]:
        """Each scored archive member's total score (for the history)."""
        ids = [i for i in self.state.archive if i in self.state.rows]
        return dict(zip(ids, self.totals(driver, ids), strict=True)) if ids else {}

    def make_child(self, driver: Driver, step: int, index: int) -> dict[str, Any] | None:
        """Select parents, make and score one child, update the archive; None when unaffordable."""
        state, settings = self.state, self.settings
        if driver.budget_left == 0 or len(state.archive) < 2:
            return None
        rng = driver.rng(step, "sae", index, "parents")
        totals = self.totals(driver, state.archive)
        rows = [state.rows[i] for i in state.archive]
        first, second = choose_parents(
            rows, state.item_weights, totals, settings.alpha, rng, matchmaker=settings.matchmaker
        )
        pair = (state.archive[first], state.archive[second])
        tick = state.children
        if settings.skips_rates_above_cap(self.recipe.sparsity_measure):
            tick = child_tick(settings.schedule, tick, settings.sparsity_term.max_zeros)
        rate = settings.schedule.rate(tick)
        child = self.offspring(driver, step, index, pair, rate, (totals[first], totals[second]))
        if child is None:
            return None
        state.children = tick + 1
        return self.admit(driver, child, pair, rate)

    def offspring(
        self,
        driver: Driver,
        step: int,
        index: int,
        pair: tuple[str, str],
        rate: float,
        totals: tuple[float, float],
    ) -> Result | None:
        """Make and score the pair's child with the recipe's operator (None: no budget)."""
        settings = self.settings
        proposal = offspring_proposal(
            driver,
            self.recipe,
            settings,
            pair,
            self.state.units,
            driver.rng(step, "sae", index, "crossover"),
            parent_density=1.0 - rate if settings.prune_parents else 1.0,
            child_density=1.0 - rate if settings.prune_child else 1.0,
            rate=rate,
            fitness=totals,
            label=f"rate {rate:.4f}",
        )
        made = driver.make([proposal])
        return made[0] if made else None

    def admit(
        self, driver: Driver, child: Result, pair: tuple[str, str], rate: float
    ) -> dict[str, Any]:
        """Let the child join the archive (evicting the lowest total) or be rejected."""
        state = self.state
        row, state.item_weights = flat_items(child.item_scores, driver.task_weights)
        ids = [*state.archive, child.member.id]
        child.member.fitness = self.answer_scores(driver, ids)[-1]
        rows = [*(state.rows[i] for i in state.archive), row]
        slot = eviction_slot(self.totals(driver, ids, rows), self.settings.archive_size)
        dropped = place_child(state.archive, state.rows, child.member.id, row, slot)
        if dropped is not None:
            driver.note(replacements={child.member.id: dropped})
        self.set_fitness(driver)
        return {"id": child.member.id, "parents": list(pair), "rate": rate,
                "fate": fate(slot, dropped)}  # fmt: skip

    def answer_scores(self, driver: Driver, ids: Sequence[str]) -> list[float]:
        """Performance + weight * sparsity term of scored members (no competition)."""
        members = [driver.members[i] for i in ids]
        return answer_values(
            [float(m.performance or 0.0) for m in members],
            [m.sparsity for m in members],
            self.settings.sparsity_term,
        )

    def set_fitness(self, driver: Driver) -> None:
        """Record each scored archive member's answer score as its fitness (reports, plots)."""
        ids = list(self.state.archive)
        for identifier, value in zip(ids, self.answer_scores(driver, ids), strict=True):
            member = driver.members[identifier]
            if member.performance is not None:
                member.fitness = value

    def best(self, members: Mapping[str, Member]) -> str:
        """The archive member of highest answer score (:func:`result_index`)."""
        living = [members[i] for i in self.state.archive]
        index = result_index(
            [m.performance for m in living],
            [m.sparsity for m in living],
            self.settings.sparsity_term,
        )
        return living[index].id
