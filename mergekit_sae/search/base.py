"""The one interface every search implements, and what the shared driver offers it.

A search proposes candidates as MergeKit stages over stored models (:class:`MergeRecord`),
receives their scores, and keeps its own state, which the driver saves in the checkpoint
after every step. Everything else is the driver's: streaming each merge through MergeKit's
lazy loader into the resident scoring model and to disk, counting fitness evaluations
against the budget, checkpoints, ``--resume``, and the outputs. A search never sees how a
task is scored, only per-task and per-item scores in [0, 1].

A step of a search is one call of :meth:`Search.step`; the driver checkpoints after it. All
randomness of a step must derive from ``driver.rng(step, ...)`` so that a run resumed from
the checkpoint of step k repeats step k+1 exactly.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from mergekit_sae.records import Member, MergeRecord, Origin


class SearchSettings(BaseModel):
    """A search's own settings block in the recipe (``pso:``, ``m2n2:``, ...)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Proposal:
    """A candidate to make: the MergeKit stage and where it comes from.

    ``inputs`` are the member ids it is made from (its lineage parents); ``origin`` labels
    it in the records; ``label`` is a free description kept with the member (e.g. ``particle
    2``).
    """

    merge: MergeRecord
    origin: Origin
    inputs: tuple[str, ...] = ()
    label: str | None = None


@dataclass
class Result:
    """A scored model: its member record (scores, performance, sparsity) and per-item scores.

    ``item_scores[task]`` lists the item scores in the order of the step's items; every
    search may read them (fitness sharing needs them), none has to.
    """

    member: Member
    item_scores: dict[str, list[float]] = field(default_factory=dict)


class Driver(Protocol):
    """What the shared driver offers a search during :meth:`Search.start` and a step."""

    @property
    def members(self) -> Mapping[str, Member]:
        """Every member ever made, by id (the lineage)."""
        ...

    @property
    def parents(self) -> list[str]:
        """Member ids of the recipe's dense models, in recipe order."""
        ...

    @property
    def base(self) -> str | None:
        """Member id of the recipe's base model, when it has one."""
        ...

    @property
    def budget_left(self) -> int | None:
        """Fitness evaluations still allowed (None: no budget)."""
        ...

    @property
    def task_weights(self) -> dict[str, float]:
        """Weight of each task in the performance mean."""
        ...

    @property
    def items(self) -> Mapping[str, list[Any]]:
        """Each task's training items of the current step (empty before step 1)."""
        ...

    @property
    def run_dir(self) -> Path:
        """The run's output folder (a search may keep files of its own under it)."""
        ...

    def model_dir(self, member: str) -> Path:
        """The folder holding a member's weights."""
        ...

    @property
    def dtype(self) -> str:
        """The dtype merged weights are written in."""
        ...

    def rng(self, *labels: object) -> random.Random:
        """A generator seeded by the recipe seed and the labels (step, purpose, ...)."""
        ...

    def make(self, proposals: Sequence[Proposal], *, score: bool = True) -> list[Result]:
        """Merge the proposals (in order) and, with ``score``, score each on the step's items.

        Scoring costs one evaluation per model; when the budget runs out, only the first
        proposals that fit are made and returned. Unscored results carry no item scores.
        """
        ...

    def rescore(self, ids: Sequence[str]) -> list[Result]:
        """Score stored members on the step's items (one evaluation each, budget permitting)."""
        ...

    def note(self, **fields: Any) -> None:
        """Add search-specific fields to the step's history record (rate, replacements...)."""
        ...


class Search(ABC):
    """One search algorithm behind the shared driver.

    Subclasses set ``name``, ``settings_model`` and ``state_model``; ``state`` is the search's
    own pydantic state, saved in the checkpoint after every step and restored on resume.
    """

    name: ClassVar[str]
    title: ClassVar[str]  # how reports and model cards name it, with a link to its paper
    settings_model: ClassVar[type[SearchSettings]]
    state_model: ClassVar[type[BaseModel]]

    def __init__(self, recipe: Any, settings: SearchSettings, state: BaseModel | None = None):
        self.recipe = recipe
        self.settings = settings
        self.state = state if state is not None else self.state_model()

    @classmethod
    def create(
        cls, recipe: Any, settings: SearchSettings, state: BaseModel | None = None
    ) -> Search:
        """The search object a run uses (a search with variants returns the one its settings
        choose)."""
        return cls(recipe, settings, state)

    @classmethod
    def natural_budget(cls, recipe: Any, settings: SearchSettings) -> int | None:
        """Evaluations a run uses when the recipe sets no budget (None: as many as steps take)."""
        return None

    @classmethod
    def check_recipe(cls, recipe: Any, settings: SearchSettings) -> None:
        """Raise ValueError when the recipe cannot run this search (checked at validation)."""
        return None

    @property
    def result_label(self) -> str:
        """The row label of the search's answer in the test report."""
        return f"{self.name} (best)"

    def card_settings(self) -> dict[str, Any]:
        """The settings shown on the model card: the search's own block."""
        return {"search": self.name, **self.settings.model_dump(mode="json")}

    @property
    def resample(self) -> bool:
        """Whether each step draws fresh training items (else every step uses step 1's)."""
        return bool(getattr(self.settings, "resample", True))

    def items_draw(self, step: int) -> int:
        """Which draw of training items a step scores on: steps with the same draw share items.

        Default: a draw per step when the search resamples, else step 1's draw for every step.
        """
        return step if self.resample else 1

    @abstractmethod
    def start(self, driver: Driver) -> None:
        """Make the initial stored models (no scoring needed) and set up the state."""

    @abstractmethod
    def step(self, driver: Driver, step: int) -> None:
        """Run one step: propose, have the driver make and score, update the state."""

    @abstractmethod
    def keep(self) -> list[str]:
        """Member ids whose weights must stay on disk after this step (the living archive)."""

    @abstractmethod
    def best(self, members: Mapping[str, Member]) -> str:
        """The member id of the search's answer so far (written out at the end)."""
