"""M2N2 (Abrantes et al. 2025, "Competition and Attraction Improve Model Fusion") as a search.

Reference code: SakanaAI/natural_niches (``natural_niches_fn.py``, ``helper_fn.py``). The rules
are the pure functions of :mod:`~mergekit_sae.search.niches` (shared with SAE);
:class:`M2n2Search` only wires them to the driver.

- **Archive.** Starts with the dense parents, scored at step 1 (one evaluation each). For every
  archive member the search keeps its per-item scores s_ij on the step's items, all tasks in one
  row (:func:`~mergekit_sae.search.niches.flat_items`: item j of task t weighs w_t / (n_t sum w),
  so the weighted row sum is the performance). The items stay fixed (``resample: false``, the
  driver then uses step 1's draw at every step), so rows of different steps compare.
- **Shared fitness** (resource competition): f_i = sum_j w_j s_ij / z_j^alpha with z_j =
  sum_k s_kj (0 replaced by 1); alpha 0 is a plain GA.
- **Archive update** (:func:`archive_slot`): while the archive holds fewer than
  ``archive_size`` members the child joins; once full, the child joins for the normalisation
  and the member of archive + child with the lowest shared fitness is dropped (the child
  itself when it is the worst). Ties drop the earliest in archive order, the child counting as
  last: a child tied with the worst member replaces it (the reference's ``argmin``).
- **Mate selection** (:func:`select_parents`): the first parent with probability proportional
  to shared fitness; the second by attraction, proportional to sum_j max(0, f_ij - f_p1,j)
  with f_ij = w_j s_ij / z_j^alpha (no temperature). The first parent cannot be drawn twice.
  Guards the reference lacks: all-zero shared fitness gives a uniform first draw, and
  all-zero attraction (nobody beats the first parent on any item) a uniform draw over the
  others.
- **Crossover** (:func:`crossover_t`): a split point uniform over the ordered tensor list,
  moved to the start of its unit (embeddings, layer 0, ..., layer L-1, the rest), and a ratio
  w ~ U(0, 1), both fresh per child; the child is one MergeKit ``slerp`` stage with parent 1
  as ``base_model`` and parent 2 as the other model, ``t`` = w before the split and 1 - w
  from it on, written as a ``filter:`` list. No mutation (pre-trained models).

One step makes ``children_per_step`` children one after another (each sees the archive the
previous one left); the driver checkpoints after the step. All randomness of child c of step t
comes from ``driver.rng(t, "m2n2", c, ...)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from mergekit_sae.records import Member
from mergekit_sae.search.base import Driver, Proposal, Search, SearchSettings
from mergekit_sae.search.niches import (
    archive_slot,
    best_index,
    crossover_record,
    draw_crossover,
    fate,
    flat_items,
    place_child,
    read_units,
    select_parents,
    shared_fitness,
)


class M2n2Settings(SearchSettings):
    """M2N2's own block (``m2n2:``)."""

    archive_size: int = Field(20, ge=2, description="archive capacity (dense parents included)")
    alpha: float = Field(1.0, ge=0.0, description="exponent of the shared fitness (0: plain GA)")
    children_per_step: int = Field(
        4, ge=1, description="children made one after another per step (checkpoint after each step)"
    )
    resample: bool = Field(
        False,
        description=(
            "draw fresh training items every step and re-score the whole archive on them "
            "(archive size evaluations per step); false keeps step 1's items"
        ),
    )
    crossover: Literal["slerp"] = Field(
        "slerp", description="MergeKit slerp with t = w before the split point and 1 - w after"
    )
    use_attraction: bool = Field(
        True,
        description="second parent by attraction (false: by shared fitness, like the first)",
    )


class M2n2State(BaseModel):
    """The archive (member ids in archive order), their per-item scores and the split units.

    ``rows[id]`` is the member's flat per-item score row (:func:`flat_items`) on the run's
    fixed items, ``item_weights`` the weight of each item; ``units`` are the crossover units
    (tensor names), read from the first parent at the start.
    """

    archive: list[str] = Field(default_factory=list)
    rows: dict[str, list[float]] = Field(default_factory=dict)
    item_weights: list[float] = Field(default_factory=list)
    units: list[list[str]] = Field(default_factory=list)


# --- the search -------------------------------------------------------------------------------


class M2n2Search(Search):
    """Natural niches: an archive under resource competition, attraction-based mating, SLERP."""

    name = "m2n2"
    title = (
        "M2N2 (Abrantes et al. 2025, [natural_niches](https://github.com/SakanaAI/natural_niches))"
    )
    settings_model = M2n2Settings
    state_model = M2n2State
    settings: M2n2Settings
    state: M2n2State

    @classmethod
    def check_recipe(cls, recipe: Any, settings: SearchSettings) -> None:
        """Every dense parent starts in the archive."""
        size = getattr(settings, "archive_size", 20)
        if size < len(recipe.models):
            raise ValueError(
                f"m2n2.archive_size ({size}) must be at least the number of models "
                f"({len(recipe.models)}): every dense parent starts in the archive"
            )

    def start(self, driver: Driver) -> None:
        """No stored models to make: read the crossover units from the first parent."""
        self.state.units = read_units(driver)
        self.state.archive = []

    def score_archive(self, driver: Driver, ids: Sequence[str]) -> bool:
        """Score members on the step's items and store their rows; False when the budget ran out."""
        results = driver.rescore(ids)
        for result in results:
            row, weights = flat_items(result.item_scores, driver.task_weights)
            self.state.rows[result.member.id] = row
            self.state.item_weights = weights
        return len(results) == len(ids)

    def step(self, driver: Driver, step: int) -> None:
        """Score the archive when needed, then make the step's children one after another."""
        state, settings = self.state, self.settings
        if step == 1 or not state.archive:
            complete = self.score_archive(driver, driver.parents)
            state.archive = [i for i in driver.parents if i in state.rows]
        elif settings.resample:
            complete = self.score_archive(driver, state.archive)
        else:
            complete = True
        driver.note(fitness_before=self.fitness_by_member())
        if not complete:
            return  # the budget ran out while scoring the archive
        children = []
        for index in range(settings.children_per_step):
            if len(state.archive) < 2:
                break
            made = self.make_child(driver, step, index)
            if made is None:
                break  # the budget is spent
            children.append(made)
        driver.note(children=children, archive_fitness=self.fitness_by_member())

    def make_child(self, driver: Driver, step: int, index: int) -> dict[str, Any] | None:
        """Select parents, make and score one child, update the archive; None when unaffordable."""
        state, settings = self.state, self.settings
        matrix = [state.rows[i] for i in state.archive]
        first, second = select_parents(
            matrix,
            state.item_weights,
            settings.alpha,
            driver.rng(step, "m2n2", index, "parents"),
            use_attraction=settings.use_attraction,
        )
        split, w = draw_crossover(state.units, driver.rng(step, "m2n2", index, "crossover"))
        p1, p2 = state.archive[first], state.archive[second]
        record = crossover_record(p1, p2, state.units, split, w, driver.dtype)
        proposal = Proposal(
            merge=record, origin="offspring", inputs=(p1, p2), label=f"slerp w={w:.4f}"
        )
        made = driver.make([proposal])
        if not made:
            return None
        child = made[0]
        row, weights = flat_items(child.item_scores, driver.task_weights)
        slot = archive_slot(matrix, row, settings.archive_size, settings.alpha, weights)
        dropped = place_child(state.archive, state.rows, child.member.id, row, slot)
        if dropped is not None:
            driver.note(replacements={child.member.id: dropped})
        return {
            "id": child.member.id,
            "parents": [p1, p2],
            "split_unit": split,
            "w": w,
            "fate": fate(slot, dropped),
        }

    def fitness_by_member(self) -> dict[str, float]:
        """Shared fitness of every archive member against the current archive."""
        matrix = [self.state.rows[i] for i in self.state.archive]
        values = shared_fitness(matrix, self.settings.alpha, self.state.item_weights)
        return dict(zip(self.state.archive, values, strict=True))

    def keep(self) -> list[str]:
        """The archive."""
        return list(self.state.archive)

    def best(self, members: Mapping[str, Member]) -> str:
        """The archive member of highest plain performance (earliest in archive order on ties).

        M2N2 reports the best model by raw score, not by shared fitness. Before the archive is
        scored: the first dense parent.
        """
        if not self.state.archive:
            return next(m.id for m in members.values() if m.origin == "parent")
        living = [members[i] for i in self.state.archive]
        values = [
            float(m.performance) if m.performance is not None else float("-inf") for m in living
        ]
        return living[best_index(values)].id
