"""Tasks and evaluators: JSONL tasks, the lm-eval adapter, and the model held for scoring.

A task is described by a :class:`TaskSpec`, built with :func:`load_task`, and scores a model
item by item with :meth:`Task.score`. :class:`ResidentModel` keeps one model in memory and
copies candidate weights into it, so many candidates are scored without re-instantiation.
"""

from mergekit_sae.evaluate.data import TaskDataError, load_jsonl, subsample
from mergekit_sae.evaluate.device import map_batches, resolve_device
from mergekit_sae.evaluate.resident import ResidentModel, WeightLoadError
from mergekit_sae.evaluate.spec import TaskSpec
from mergekit_sae.evaluate.tasks import (
    GenerateExactMatchTask,
    MultipleChoiceTask,
    Task,
    load_task,
)

__all__ = [
    "GenerateExactMatchTask",
    "MultipleChoiceTask",
    "ResidentModel",
    "Task",
    "TaskDataError",
    "TaskSpec",
    "WeightLoadError",
    "load_jsonl",
    "load_task",
    "map_batches",
    "resolve_device",
    "subsample",
]
