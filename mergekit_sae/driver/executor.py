"""Where a step's candidates are scored: the :class:`Executor` the driver calls.

:class:`SerialExecutor` (``executor: serial``, the default) is the driver's own process: each
merge streams into the resident evaluator and is scored at once. ``executor: ray``
(:class:`~mergekit_sae.driver.ray_executor.RayExecutor`) merges every candidate of one call to
disk first, then Ray actors score them in parallel. Both return per-item scores in the order
asked, and scoring is deterministic, so a run is the same under either.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from mergekit_sae import faults
from mergekit_sae.evaluate.evaluator import Evaluator
from mergekit_sae.records import Member

ItemScores = dict[str, list[float]]
Merge = Callable[[Member, bool], None]  # make a member's weights; True: also into the evaluator
Seconds = dict[str, float]  # a step's time split: "load" and "score" are the executor's


class Executor(Protocol):
    """Scores candidates for the driver, one fitness evaluation each, in the order given."""

    def make(
        self,
        members: Sequence[Member],
        merge: Merge,
        items: Mapping[str, Sequence[Any]],
        seconds: Seconds,
    ) -> Iterator[ItemScores]:
        """Make each new member with ``merge`` and score it on ``items``."""
        ...

    def rescore(
        self, paths: Sequence[Path], items: Mapping[str, Sequence[Any]], seconds: Seconds
    ) -> Iterator[ItemScores]:
        """Score stored models (their folders) on ``items``."""
        ...

    def close(self) -> None:
        """Free what the executor holds (workers); the run's scoring is over."""
        ...


class SerialExecutor:
    """Scores in the driver's process with its resident evaluator, one candidate at a time."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator

    def make(
        self,
        members: Sequence[Member],
        merge: Merge,
        items: Mapping[str, Sequence[Any]],
        seconds: Seconds,
    ) -> Iterator[ItemScores]:
        """Stream each member's merge into the evaluator, then score it."""
        for member in members:
            merge(member, True)
            yield self._score(items, seconds)

    def rescore(
        self, paths: Sequence[Path], items: Mapping[str, Sequence[Any]], seconds: Seconds
    ) -> Iterator[ItemScores]:
        """Load each stored model into the evaluator, then score it."""
        for path in paths:
            start = time.perf_counter()
            self.evaluator.load(path)
            seconds["load"] += time.perf_counter() - start
            yield self._score(items, seconds)

    def _score(self, items: Mapping[str, Sequence[Any]], seconds: Seconds) -> ItemScores:
        """The evaluator's current candidate scored on the items."""
        faults.point("score")
        start = time.perf_counter()
        scores = self.evaluator.score_items(items)
        seconds["score"] += time.perf_counter() - start
        return {name: list(values) for name, values in scores.items()}

    def close(self) -> None:
        """Nothing to free: the evaluator belongs to the run."""
