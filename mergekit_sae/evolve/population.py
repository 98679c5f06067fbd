"""Population records and the pure rules of the archive: layout, pairing, fitness, replacement.

Every model the search ever makes is a :class:`Member`. A member records how it was made
(:class:`MergeRecord`: the registered MergeKit method, its inputs with their per-model
parameters, and the shared parameters), so the lineage of any member can be replayed as
MergeKit stages. Members that leave the population keep their record (their weights are
deleted), so the lineage of the final model stays complete.

One :class:`StepRecord` is kept per generation: the schedule rate, each offspring's parents,
scores, sparsity, fitness and which member (if any) it replaced.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

Origin = Literal["parent", "base", "pruned", "offspring", "particle", "candidate"]


class MergeInput(BaseModel):
    """One model given to a merge: a population member or an original model, with its parameters.

    ``member`` names a population member (its weights are the member's directory);
    ``model`` names an original model as the recipe gives it (local path or Hub id), used for
    inputs that are not members, such as the dense references of ``redense: original``.
    ``parameters`` are the per-model parameters exactly as passed to the registered method.
    """

    member: str | None = None
    model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> MergeInput:
        """Exactly one of ``member`` and ``model`` names the input."""
        if (self.member is None) == (self.model is None):
            raise ValueError("a merge input names exactly one of 'member' or 'model'")
        return self


class MergeRecord(BaseModel):
    """How a member was made: one MergeKit stage (method, inputs, base, shared parameters).

    ``inputs`` are in the order they were given to ``merge_tensors``; ``base_member`` names a
    member given as the method's base (M2N2's SLERP interpolates from its first parent);
    otherwise ``base_model`` (a local
    path or Hub id of an original model, or None) is the base given to the method, when any;
    ``parameters`` are the shared parameters exactly as passed; ``dtype`` is the dtype the
    merge computed in and wrote (``float32``, ``bfloat16``, ...).
    """

    method: str
    inputs: list[MergeInput]
    base_model: str | None = None
    base_member: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str


class Member(BaseModel):
    """One model of the archive, alive or not, with its lineage, scores and fitness.

    - ``id``: ``m0000``, ``m0001``, ... in order of creation.
    - ``path``: where its weights live: the parent's local directory for ``origin == "parent"``,
      else a directory relative to the run's output folder (``.work/population/<id>``).
      Use :func:`member_dir` to resolve it. Weights of members that left the population are
      deleted; their records stay.
    - ``origin``: ``parent`` (a dense model of the recipe), ``base`` (the recipe's base
      model), ``pruned`` (a sparsified parent made for the initial population: ``sae_prune``,
      or seeded DARE for PSO), ``offspring`` (a merge of members: SAE, M2N2), ``particle``
      (a PSO position), ``candidate`` (a CMA-ES sample).
    - ``label``: a free description the search gives (``particle 2``...).
    - ``source``: for parents, the model as the recipe names it (path or Hub id).
    - ``inputs``: ids of the members it was made from (pruned: its parent; offspring: the pair).
    - ``merge``: the MergeKit stage that made it from ``inputs`` (None for parents).
    - ``born``: 0 for the initial population, else the step (1-based) that made it.
    - ``scores``: per-task score on the training subsample of step ``scored_at``.
    - ``performance``: the weighted mean of ``scores``; ``fitness`` = performance +
      fitness sparsity weight * ``sparsity``.
    - ``sparsity``: global sparsity of all its tensors under the recipe's sparsity measure;
      ``zero_fraction``: the fraction of exactly-zero elements over all tensors.
    - ``test_scores``: per-task test-split score, for the members evaluated on the test split.
    """

    id: str
    path: str
    origin: Origin
    source: str | None = None
    label: str | None = None
    inputs: list[str] = Field(default_factory=list)
    merge: MergeRecord | None = None
    born: int = 0
    scores: dict[str, float] = Field(default_factory=dict)
    scored_at: int | None = None
    performance: float | None = None
    sparsity: float = 0.0
    zero_fraction: float = 0.0
    fitness: float | None = None
    test_scores: dict[str, float] | None = None


class OffspringRecord(BaseModel):
    """One offspring of a step: its parents and their scores, its own scores and fate."""

    id: str
    parents: list[str]
    parent_performance: list[float]
    scores: dict[str, float]
    performance: float
    sparsity: float
    zero_fraction: float
    fitness: float
    replaced: str | None = None  # id of the member it replaced; None when rejected

    @property
    def accepted(self) -> bool:
        """Whether the offspring entered the population."""
        return self.replaced is not None


class StepRecord(BaseModel):
    """One step of a search: the models it scored, the archive before and after, the best.

    ``evaluations`` counts the fitness evaluations used so far (this step included);
    ``offspring`` lists every model made and scored this step; ``population_before`` /
    ``population_after`` list the member ids whose weights the search keeps, in archive
    order; SAE also records its schedule ``rate`` and ``fitness_before`` (each starting
    member's fitness as compared this step); ``info`` holds other search-specific notes;
    ``best``/``best_fitness``/``mean_fitness``/``mean_sparsity`` describe the population
    after replacement; ``seconds`` splits the step's wall time into ``merge``, ``write`` and
    ``score`` (not part of the result; only for reporting).
    """

    step: int
    evaluations: int = 0
    rate: float | None = None
    offspring_density: float | None = None
    subsample: dict[str, int]
    population_before: list[str]
    fitness_before: dict[str, float] = Field(default_factory=dict)
    offspring: list[OffspringRecord]
    population_after: list[str]
    best: str
    best_fitness: float | None
    best_performance: float | None
    mean_fitness: float
    mean_sparsity: float
    info: dict[str, Any] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict)


class TestResult(BaseModel):
    """Test-split scores of one model of the final report (the evolved model or a reference).

    ``kind`` is ``evolved`` (the best member), ``parent`` (a dense parent) or ``baseline``
    (a static merge of the parents, such as ``linear``); ``model`` names it (member id, model
    path or Hub id, or the baseline method); ``mean`` is the task-weighted mean of ``scores``.
    ``generation`` (the evolved row, when the evaluator can measure it) holds the stability
    metrics of the generation tasks' test outputs, pooled: ``repetition_rate``,
    ``distinct_1``, ``distinct_2`` (see :mod:`mergekit_sae.evaluate.repetition`) and the
    number of ``generations``; None when there are none.
    """

    __test__ = False  # not a pytest class

    label: str
    kind: Literal["evolved", "parent", "baseline"]
    model: str
    scores: dict[str, float]
    mean: float
    sparsity: float
    zero_fraction: float
    generation: dict[str, float] | None = None


def member_dir(member: Member, out: str | Path) -> Path:
    """Directory holding a member's weights (relative paths are under the run's folder)."""
    path = Path(member.path)
    return path if path.is_absolute() else Path(out) / path


def member_id(index: int) -> str:
    """The id of the index-th member ever made."""
    return f"m{index:04d}"


def performance(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted mean of per-task scores (the paper's performance)."""
    total = sum(weights[name] for name in scores)
    return sum(weights[name] * score for name, score in scores.items()) / total


def fitness(performance_value: float, sparsity_value: float, sparsity_weight: float) -> float:
    """F = performance + beta_fit * global sparsity: sparsity competes with performance."""
    return performance_value + sparsity_weight * sparsity_value


def pruning_rates(count: int, s_min: float, s_max: float) -> list[float]:
    """``count`` rates spread evenly over [s_min, s_max] (the midpoint when count is 1)."""
    if count == 1:
        return [(s_min + s_max) / 2]
    return [s_min + (s_max - s_min) * j / (count - 1) for j in range(count)]


def initial_layout(
    n_parents: int, size: int, s_min: float, s_max: float
) -> list[tuple[int, float | None]]:
    """The initial archive as (parent index, pruning rate or None for the dense parent).

    Each dense parent comes first; the remaining ``size - n_parents`` slots are sparse
    variants dealt round-robin over the parents, each parent's variants at rates spread
    evenly over [s_min, s_max].
    """
    if size < n_parents:
        raise ValueError(f"population size {size} is smaller than the {n_parents} parents")
    counts = [len(range(k, size - n_parents, n_parents)) for k in range(n_parents)]
    layout: list[tuple[int, float | None]] = [(k, None) for k in range(n_parents)]
    rates = [pruning_rates(c, s_min, s_max) if c else [] for c in counts]
    for j in range(size - n_parents):
        k = j % n_parents
        layout.append((k, rates[k][j // n_parents]))
    return layout


def random_pairs(ids: Sequence[str], rng: random.Random) -> list[tuple[str, str]]:
    """Shuffle the archive and pair it up into floor(N/2) disjoint pairs."""
    order = list(ids)
    rng.shuffle(order)
    return [(order[2 * i], order[2 * i + 1]) for i in range(len(order) // 2)]


def worst_index(fitnesses: Sequence[float]) -> int:
    """Index of the lowest fitness; on ties the earliest in archive order."""
    return min(range(len(fitnesses)), key=lambda i: (fitnesses[i], i))


def best_index(fitnesses: Sequence[float]) -> int:
    """Index of the highest fitness; on ties the earliest in archive order."""
    return max(range(len(fitnesses)), key=lambda i: (fitnesses[i], -i))


def replacement_slot(fitnesses: Sequence[float], candidate: float) -> int | None:
    """Slot the candidate takes: the worst member's, if the candidate is strictly fitter."""
    slot = worst_index(fitnesses)
    return slot if candidate > fitnesses[slot] else None


def lineage(members: Mapping[str, Member], member: str) -> list[Member]:
    """The member and all its ancestors, each listed after the members it was made from."""
    ordered: list[Member] = []
    seen: set[str] = set()

    def visit(current: str) -> None:
        if current in seen:
            return
        seen.add(current)
        record = members[current]
        merged_from = (
            [*(item.member for item in record.merge.inputs), record.merge.base_member]
            if record.merge
            else []
        )
        for parent in [*record.inputs, *merged_from]:
            if parent is not None:
                visit(parent)
        ordered.append(record)

    visit(member)
    return ordered
