"""M2N2 (Abrantes et al. 2025, "Competition and Attraction Improve Model Fusion") as a search.

Reference code: SakanaAI/natural_niches (``natural_niches_fn.py``, ``helper_fn.py``). The rules
are the pure functions of this module; :class:`M2n2Search` only wires them to the driver.

- **Archive.** Starts with the dense parents, scored at step 1 (one evaluation each). For every
  archive member the search keeps its per-item scores s_ij on the step's items, all tasks in one
  row (:func:`~mergekit_sae.search.base.flat_items`: item j of task t weighs w_t / (n_t sum w),
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

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from mergekit_sae.evolve.merging import open_model, tensor_names
from mergekit_sae.evolve.per_tensor import conditional, layer_of
from mergekit_sae.evolve.population import Member, MergeInput, MergeRecord, best_index
from mergekit_sae.search.base import (
    Driver,
    Proposal,
    Search,
    SearchSettings,
    flat_items,
    shared_fitness,
)

# Substrings of non-layer tensor names that sit on the input side of the decoder stack.
INPUT_SIDE = ("embed", "wte", "wpe")


class M2n2Settings(SearchSettings):
    """M2N2's own block (``m2n2:``); ``population_size`` and the SAE settings are not used."""

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


# --- pure rules -------------------------------------------------------------------------------


def item_shares(
    scores: Sequence[Sequence[float]], alpha: float, item_weights: Sequence[float]
) -> list[float]:
    """w_j / z_j^alpha per item, z_j the column total (0 replaced by 1), as in shared_fitness."""
    width = len(item_weights)
    totals = [sum(row[j] for row in scores) for j in range(width)]
    return [
        w / ((t if t != 0 else 1.0) ** alpha) for w, t in zip(item_weights, totals, strict=True)
    ]


def item_fitness(
    scores: Sequence[Sequence[float]], alpha: float, item_weights: Sequence[float]
) -> list[list[float]]:
    """The matrix f_ij = w_j s_ij / z_j^alpha (row sums: the shared fitness)."""
    shares = item_shares(scores, alpha, item_weights)
    return [[s * share for s, share in zip(row, shares, strict=True)] for row in scores]


def first_parent_probabilities(fitness: Sequence[float]) -> list[float]:
    """Probability of each member to be the first parent: proportional to shared fitness.

    All zero (nobody solves any item): uniform.
    """
    total = sum(fitness)
    if total <= 0:
        return [1.0 / len(fitness)] * len(fitness)
    return [f / total for f in fitness]


def attraction(matrix: Sequence[Sequence[float]], first: int) -> list[float]:
    """Attraction of each member to the first parent: sum_j max(0, f_ij - f_first,j).

    High for members that do well where the first parent does badly; 0 for the first parent.
    """
    anchor = matrix[first]
    return [sum(max(0.0, f - a) for f, a in zip(row, anchor, strict=True)) for row in matrix]


def second_parent_probabilities(scores: Sequence[float], first: int) -> list[float]:
    """Probability of each member to be the second parent, proportional to ``scores``.

    The first parent has probability 0; when no other member scores above 0, uniform over the
    others.
    """
    others = [0.0 if i == first else max(0.0, s) for i, s in enumerate(scores)]
    total = sum(others)
    if total <= 0:
        share = 1.0 / (len(scores) - 1)
        return [0.0 if i == first else share for i in range(len(scores))]
    return [s / total for s in others]


def draw(probabilities: Sequence[float], rng: random.Random) -> int:
    """An index drawn with the given probabilities (one ``rng.random()``); never one of p 0."""
    u = rng.random() * sum(probabilities)
    cumulative = 0.0
    last = None
    for index, p in enumerate(probabilities):
        if p <= 0:
            continue
        cumulative += p
        last = index
        if u < cumulative:
            return index
    if last is None:
        raise ValueError("no index has a positive probability")
    return last  # u rounded up to the total


def select_parents(
    scores: Sequence[Sequence[float]],
    item_weights: Sequence[float],
    alpha: float,
    rng: random.Random,
    *,
    use_attraction: bool = True,
) -> tuple[int, int]:
    """Indices (first, second) of the parents among the archive rows ``scores`` (two draws).

    First by shared fitness; second by attraction to the first (``use_attraction``) or by
    shared fitness; never the same member twice.
    """
    if len(scores) < 2:
        raise ValueError("mate selection needs at least two archive members")
    fitness = shared_fitness(scores, alpha, item_weights)
    first = draw(first_parent_probabilities(fitness), rng)
    if use_attraction:
        pull = attraction(item_fitness(scores, alpha, item_weights), first)
    else:
        pull = fitness
    second = draw(second_parent_probabilities(pull, first), rng)
    return first, second


def archive_slot(
    scores: Sequence[Sequence[float]],
    child: Sequence[float],
    capacity: int,
    alpha: float,
    item_weights: Sequence[float],
) -> int | None:
    """Where a child goes in the archive whose rows are ``scores``.

    ``len(scores)`` (append) while the archive is not full; once full, the slot of the member
    of archive + child with the lowest shared fitness (earliest on ties, the child last), or
    None when that member is the child itself.
    """
    if len(scores) < capacity:
        return len(scores)
    fitness = shared_fitness([*scores, child], alpha, item_weights)
    worst = min(range(len(fitness)), key=lambda i: (fitness[i], i))
    return None if worst == len(scores) else worst


def crossover_units(names: Sequence[str]) -> list[list[str]]:
    """The crossover units in model order: input embeddings, layer 0 .. L-1, everything else.

    Tensors outside the decoder layers whose names contain ``embed``/``wte``/``wpe`` come
    first; the others (final norm, ``lm_head``) last. Empty units are left out.
    """
    before, after = [], []
    layers: dict[int, list[str]] = {}
    for name in names:
        layer = layer_of(name)
        if layer is not None:
            layers.setdefault(layer, []).append(name)
        elif any(mark in name for mark in INPUT_SIDE):
            before.append(name)
        else:
            after.append(name)
    units = [before, *(layers[k] for k in sorted(layers)), after]
    return [unit for unit in units if unit]


def draw_crossover(units: Sequence[Sequence[str]], rng: random.Random) -> tuple[int, float]:
    """(split unit, w): the unit holding a tensor drawn uniformly, and w ~ U(0, 1).

    Tensors of the units before the split unit take t = w, the others 1 - w.
    """
    count = sum(len(unit) for unit in units)
    position = rng.randrange(count)
    split = 0
    while position >= len(units[split]):
        position -= len(units[split])
        split += 1
    return split, rng.random()


def crossover_t(units: Sequence[Sequence[str]], split: int, w: float) -> dict[str, float]:
    """SLERP's t per tensor: w for the units before ``split``, 1 - w from it on."""
    return {
        name: (w if index < split else 1.0 - w) for index, unit in enumerate(units) for name in unit
    }


def crossover_record(
    first: str, second: str, units: Sequence[Sequence[str]], split: int, w: float, dtype: str
) -> MergeRecord:
    """The MergeKit ``slerp`` stage of a child: from parent ``first`` (the base) to ``second``."""
    return MergeRecord(
        method="slerp",
        inputs=[MergeInput(member=second)],
        base_member=first,
        parameters={"t": conditional(crossover_t(units, split, w))},
        dtype=dtype,
    )


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
        first = driver.members[driver.parents[0]]
        path = Path(first.path)
        self.state.units = crossover_units(tensor_names([open_model(path)], [path]))
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
        outcome: dict[str, Any] = {
            "id": child.member.id,
            "parents": [p1, p2],
            "split_unit": split,
            "w": w,
            "fate": "rejected",
        }
        if slot is not None:
            if slot == len(state.archive):
                state.archive.append(child.member.id)
                outcome["fate"] = "joined"
            else:
                dropped = state.archive[slot]
                state.archive[slot] = child.member.id
                del state.rows[dropped]
                driver.note(replacements={child.member.id: dropped})
                outcome["fate"] = f"replaced {dropped}"
            state.rows[child.member.id] = row
        return outcome

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
