"""Population records: every member, how it was made, and the history of each step.

Every model the search ever makes is a :class:`Member`. A member records how it was made
(:class:`MergeRecord`: the registered MergeKit method, its inputs with their per-model
parameters, and the shared parameters), so the lineage of any member can be replayed as
MergeKit stages. Members that leave the population keep their record (their weights are
deleted), so the lineage of the final model stays complete.

One :class:`StepRecord` is kept per generation: the schedule rate, each offspring's parents,
scores, sparsity, fitness and which member (if any) it replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

# How a member came to be: ``parent`` and ``base`` are the recipe's models (the driver records
# them); every other word is the search's own (``offspring``, ``particle``, ...).
Origin = str


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
      model), or the word the search that made it uses (``pruned``, ``offspring``, ...).
    - ``label``: a free description the search gives (``particle 2``...).
    - ``source``: for parents, the model as the recipe names it (path or Hub id).
    - ``inputs``: ids of the members it was made from (pruned: its parent; offspring: the pair).
    - ``merge``: the MergeKit stage that made it from ``inputs`` (None for parents).
    - ``born``: 0 for the initial population, else the step (1-based) that made it.
    - ``scores``: per-task score on the training subsample of step ``scored_at``.
    - ``performance``: the weighted mean of ``scores``; ``fitness``: the value the search
      ranks it by (the performance until the search sets its own).
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
    order; ``info`` holds the search's own notes (SAE's schedule ``rate``, each starting
    member's score as compared this step, each child's fate, ...);
    ``best``/``best_fitness``/``mean_fitness``/``mean_sparsity`` describe the population
    after replacement; ``seconds`` splits the step's wall time into ``merge``, ``write`` and
    ``score`` (not part of the result; only for reporting).
    """

    step: int
    evaluations: int = 0
    subsample: dict[str, int]
    population_before: list[str]
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
