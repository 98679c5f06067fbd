"""A run's fixed inputs and the rules that derive from them: the search, seeds, items, weights.

:class:`RunContext` holds what every part of a run reads (recipe, output folder, resolved
models, evaluator, search, executor); the functions here derive the search object, a step's
seeded training items, the test items and the task weights from it, so the loop and the final
report draw items the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_sae.evaluate import subsample
from mergekit_sae.evaluate.evaluator import Evaluator
from mergekit_sae.merging.stream import DEFAULT_SHARD_SIZE
from mergekit_sae.recipe.schema import Recipe
from mergekit_sae.search import search_class
from mergekit_sae.search.base import Search


def build_search(recipe: Recipe, state: dict[str, Any] | None = None) -> Search:
    """The recipe's search with its settings, restored from a checkpointed state when given."""
    cls = search_class(recipe.search)
    restored = cls.state_model.model_validate(state) if state else None
    return cls.create(recipe, recipe.settings_for(), restored)


@dataclass
class RunContext:
    """A run's fixed inputs: recipe, output folder, resolved models, evaluator, the search.

    ``models``/``base`` are the local directories of ``recipe.models``/``recipe.base_model``;
    ``device`` is where tensors are merged; ``dtype`` the dtype merged weights are written in.
    """

    recipe: Recipe
    out: Path
    models: list[Path]
    base: Path | None
    evaluator: Evaluator
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True
    shard_size: int = DEFAULT_SHARD_SIZE
    search: Search = field(default=None)  # type: ignore[assignment]
    tracker: Any = None  # a tracking.Tracker: logs every checkpointed step (None: no tracking)
    executor: Any = None  # the Executor that scores candidates, made on first use

    def __post_init__(self) -> None:
        if self.search is None:
            self.search = build_search(self.recipe)


def derive_seed(seed: int, *labels: object) -> int:
    """A 64-bit seed determined by the recipe seed and labels (step, task, purpose)."""
    text = ":".join(str(part) for part in (seed, *labels))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def training_subsample(ctx: RunContext, step: int) -> dict[str, list[Any]]:
    """Each task's training items for a step: the search's draw for the step, seeded by
    (seed, draw, task); steps of one draw score on the same items."""
    draw = ctx.search.items_draw(step)
    draws = {}
    for task in ctx.recipe.tasks:
        items = ctx.evaluator.items(task.name, "train")
        draws[task.name] = subsample(
            items, task.subsample, derive_seed(ctx.recipe.seed, draw, task.name)
        )
    return draws


def test_items(ctx: RunContext) -> dict[str, list[Any]]:
    """Each task's test items for the final report (a seeded subsample when one is asked)."""
    return {
        task.name: subsample(
            ctx.evaluator.items(task.name, "test"),
            task.test_subsample,
            derive_seed(ctx.recipe.seed, "test", task.name),
        )
        for task in ctx.recipe.tasks
    }


def task_weights(recipe: Recipe) -> dict[str, float]:
    """Weight of each task in the performance mean."""
    return {task.name: task.weight for task in recipe.tasks}
