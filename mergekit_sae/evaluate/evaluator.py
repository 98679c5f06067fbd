"""What the driver needs from an evaluator, and the evaluator that scores with one resident model.

The driver only sees :class:`Evaluator`: task names and items, a way to make a model the
current candidate (from disk, or tensor by tensor while it is being merged), and per-task
scores of the current candidate. :func:`load_tasks` and :func:`build_evaluator` are the one
place a run's tasks and its resident evaluator are built (in the driver's process and in each
Ray worker alike).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from mergekit_sae import faults
from mergekit_sae.errors import RecipeError
from mergekit_sae.evaluate.resident import ResidentModel, check_fits
from mergekit_sae.evaluate.spec import TaskSpec
from mergekit_sae.evaluate.tasks import Task, load_task


class Evaluator(Protocol):
    """Scores one candidate model at a time on named tasks."""

    task_names: Sequence[str]

    def items(self, task: str, split: str) -> list[Any]:
        """All items of a task's split (``train`` or ``test``)."""
        ...

    def receive(self, name: str, tensor: torch.Tensor) -> None:
        """Take one tensor of the candidate being merged (the candidate becomes current)."""
        ...

    def load(self, path: Path) -> None:
        """Make the model stored at ``path`` the current candidate."""
        ...

    def score(self, items: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """Per-task score in [0, 1] of the current candidate on the given items."""
        ...

    def score_items(self, items: Mapping[str, Sequence[Any]]) -> dict[str, list[float]]:
        """Per-item scores in [0, 1] of the current candidate, task by task, in item order."""
        ...


class ResidentEvaluator:
    """Scores candidates with one model held in memory whose weights are replaced in place."""

    def __init__(self, resident: Any, tasks: Sequence[Any], batch_size: int | None = None):
        self.resident = resident
        self.tasks = {task.name: task for task in tasks}
        self.task_names = list(self.tasks)
        self.batch_size = batch_size
        self._targets = resident.model.state_dict()

    def items(self, task: str, split: str) -> list[Any]:
        """All items of a task's split."""
        return self.tasks[task].items(split)

    def receive(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one merged tensor into the resident model's parameter of that name."""
        check_fits({name: tuple(tensor.shape)}, self._targets, "merged tensor")
        with torch.no_grad():
            self._targets[name].copy_(tensor)

    def load(self, path: Path) -> None:
        """Copy a model's weights from disk into the resident model."""
        self.resident.load_weights(path)

    def score_items(self, items: Mapping[str, Sequence[Any]]) -> dict[str, list[float]]:
        """Each task's per-item scores of the resident model on its items."""
        scores = {}
        for name, task_items in items.items():
            faults.point("evaluator.task")
            scores[name] = list(
                self.tasks[name].score(
                    self.resident.model,
                    self.resident.tokenizer,
                    list(task_items),
                    batch_size=self.batch_size,
                )
            )
        return scores

    def score_with_generation(
        self, items: Mapping[str, Sequence[Any]]
    ) -> tuple[dict[str, float], dict[str, float] | None]:
        """Each task's score and the generation metrics of its generation tasks' outputs.

        One pass: the texts measured are the ones scored. The outputs of every task that
        ``generates`` are pooled and measured together (by the first such task's
        ``generation_metrics``), plus their count ``generations``; None when no task
        generates. Optional for evaluators; the final report uses it when present.
        """
        scores: dict[str, float] = {}
        pooled: list[dict[str, Any]] = []
        measure = None
        for name, task_items in items.items():
            task = self.tasks[name]
            details = task.score_details(
                self.resident.model,
                self.resident.tokenizer,
                list(task_items),
                batch_size=self.batch_size,
            )
            scores[name] = task.aggregate([d["score"] for d in details])
            if task.generates:
                pooled += details
                measure = measure or task
        if measure is None:
            return scores, None
        return scores, {**measure.generation_metrics(pooled), "generations": float(len(pooled))}

    def score(self, items: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """Each task's aggregate score of the resident model on its items."""
        return {
            name: self.tasks[name].aggregate(values)
            for name, values in self.score_items(items).items()
        }


def load_tasks(specs: Sequence[TaskSpec], source: str) -> list[Task]:
    """Build every task and read its splits now, so a bad task fails before any work
    (RecipeError naming ``source: tasks[i] (name)``)."""
    tasks = []
    for index, spec in enumerate(specs):
        try:
            task = load_task(spec)
            for split in ("train", "test"):
                if not task.items(split):
                    raise ValueError(f"its {split} split holds no items")
        except Exception as error:
            raise RecipeError(f"{source}: tasks[{index}] ({spec.name!r}): {error}") from None
        tasks.append(task)
    return tasks


def build_evaluator(
    model: str | Path,
    tasks: Sequence[Task],
    *,
    device: str = "auto",
    dtype: str | None = None,
    batch_size: int | None = None,
    trust_remote_code: bool = False,
) -> ResidentEvaluator:
    """The resident-model evaluator over ``model``'s architecture; without ``batch_size`` the
    batch is sized to the device's memory."""
    resident = ResidentModel(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return ResidentEvaluator(resident, tasks, batch_size=batch_size or resident.batch_size)
