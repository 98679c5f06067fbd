"""Tasks and evaluators: JSONL tasks, the lm-eval adapter, and the model held for scoring.

A task is described by a :class:`TaskSpec`, built with :func:`load_task`, and scores a model
item by item with :meth:`Task.score`. Each task type is one module holding its settings model
and its :class:`TaskType`, registered in :mod:`.registry` (``generate_exact_match``,
``generate_text_match``, ``multiple_choice``, ``lm_eval``; other distributions add theirs
through the ``mergekit_sae.task_types`` entry points). :class:`ResidentModel` keeps one model
in memory and copies candidate weights into it, so many candidates are scored without
re-instantiation.
"""

# Importing the type modules (exact_match, lm_eval_task, multiple_choice, text_match) registers
# the built-in task types.
from mergekit_sae.evaluate.data import TaskDataError, load_jsonl, subsample
from mergekit_sae.evaluate.device import map_batches, resolve_device
from mergekit_sae.evaluate.exact_match import ExactMatchSettings, GenerateExactMatchTask
from mergekit_sae.evaluate.lm_eval_task import LmEvalSettings, LmEvalTask
from mergekit_sae.evaluate.multiple_choice import MultipleChoiceSettings, MultipleChoiceTask
from mergekit_sae.evaluate.registry import (
    TaskSettings,
    TaskType,
    register_task_type,
    task_type,
    task_types,
)
from mergekit_sae.evaluate.repetition import distinct_n, repetition_rate
from mergekit_sae.evaluate.resident import ResidentModel, WeightLoadError
from mergekit_sae.evaluate.spec import TaskSpec
from mergekit_sae.evaluate.tasks import GenerationSettings, GenerationTask, Task, load_task
from mergekit_sae.evaluate.text_match import GenerateTextMatchTask, TextMatchSettings

__all__ = [
    "ExactMatchSettings",
    "GenerateExactMatchTask",
    "GenerateTextMatchTask",
    "GenerationSettings",
    "GenerationTask",
    "LmEvalSettings",
    "LmEvalTask",
    "MultipleChoiceSettings",
    "MultipleChoiceTask",
    "ResidentModel",
    "Task",
    "TaskDataError",
    "TaskSettings",
    "TaskSpec",
    "TaskType",
    "TextMatchSettings",
    "WeightLoadError",
    "distinct_n",
    "load_jsonl",
    "load_task",
    "map_batches",
    "register_task_type",
    "repetition_rate",
    "resolve_device",
    "subsample",
    "task_type",
    "task_types",
]
