"""Tasks: items of a split, per-item scores of a model on them, and their aggregate.

:class:`Task` is the base every registered task type's scorer derives from; it reads its
options from ``self.settings``, the spec's validated settings model.
:class:`GenerationTask` adds greedy generation and the generation-stability metrics, with the
options every generation type shares (:class:`GenerationSettings`).
:func:`load_task` builds the scorer of a spec's type from the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from mergekit_sae.evaluate.data import load_jsonl
from mergekit_sae.evaluate.generation import greedy_generate
from mergekit_sae.evaluate.registry import TaskSettings, task_type
from mergekit_sae.evaluate.repetition import distinct_n, repetition_rate
from mergekit_sae.evaluate.spec import TaskSpec

Split = Literal["train", "test"]
DEFAULT_BATCH_SIZE = 32


class Task:
    """A named task: items per split and a scorer giving each item a score in [0, 1]."""

    generates = False  # whether its scores come from generated text (with generation_metrics)
    settings: TaskSettings  # subclasses narrow it to their type's settings model

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.name = spec.name
        self.settings = spec.settings

    def items(self, split: Split) -> list[dict[str, Any]]:
        """The items of a split (loaded once, returned as a fresh list)."""
        path = _split_path(self.spec, split)
        stat = path.stat()
        items = _cached_items(path, stat.st_mtime_ns, stat.st_size, self.spec.type)
        return [dict(item) for item in items]

    def score(
        self, model, tokenizer, items: Sequence[dict], *, batch_size: int | None = None
    ) -> list[float]:
        """Per-item scores of the model on items, in [0, 1]."""
        details = self.score_details(model, tokenizer, items, batch_size=batch_size)
        return [d["score"] for d in details]

    def score_details(
        self, model, tokenizer, items: Sequence[dict], *, batch_size: int | None = None
    ) -> list[dict[str, Any]]:
        """Per-item records with the score and what it was computed from."""
        raise TypeError(f"{type(self).__name__} does not define score_details")

    def aggregate(self, scores: Sequence[float]) -> float:
        """The task's score: the mean of the per-item scores."""
        if not scores:
            raise ValueError(f"task {self.name!r}: cannot aggregate an empty list of scores")
        return float(sum(scores) / len(scores))

    def generation_metrics(self, details: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Aggregate metrics of the generated texts in ``score_details`` records (none here)."""
        return {}

    def _batch_size(self, batch_size: int | None) -> int:
        return batch_size or self.spec.batch_size or DEFAULT_BATCH_SIZE


class GenerationSettings(TaskSettings):
    """The options every generation task type shares: the token budget and the stop strings."""

    max_new_tokens: int = Field(32, ge=1, description="generation budget per item")
    stop: list[str] = Field(
        default_factory=lambda: ["\n"], description="generation ends before the first of these"
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        """An empty stop string would end every generation before it starts."""
        if "" in value:
            raise ValueError("stop strings must not be empty")
        return value


class GenerationTask(Task):
    """A task scored on greedy continuations of each item's prompt (``output`` in its records)."""

    generates = True
    settings: GenerationSettings

    def generate(
        self, model, tokenizer, items: Sequence[dict], batch_size: int | None
    ) -> list[str]:
        """Greedy continuation of each item's prompt, with the spec's budget and stop strings."""
        return greedy_generate(
            model,
            tokenizer,
            [item["prompt"] for item in items],
            max_new_tokens=self.settings.max_new_tokens,
            stop=self.settings.stop,
            batch_size=self._batch_size(batch_size),
        )

    def generation_metrics(self, details: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Stability of the outputs: share that loop (``repetition_rate``) and distinct-1/2.

        Definitions are in :mod:`mergekit_sae.evaluate.repetition` (whitespace tokens).
        """
        texts = [d["output"] for d in details]
        return {
            "repetition_rate": repetition_rate(texts),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
        }


def _split_path(spec: TaskSpec, split: str) -> Path:
    if split not in ("train", "test"):
        raise ValueError(f"task {spec.name!r}: unknown split {split!r}; use 'train' or 'test'")
    path = getattr(spec, split)
    if path is None:
        raise ValueError(f"task {spec.name!r} has no {split} split: set `{split}:` in its spec")
    return path


@cache
def _cached_items(
    path: Path, mtime_ns: int, size: int, type_name: str
) -> tuple[dict[str, Any], ...]:
    """Items of one JSONL file, read again only when its modification time or size changes."""
    return tuple(load_jsonl(path, type_name))


def load_task(spec: TaskSpec | dict) -> Task:
    """Build the task a spec describes (a dict is validated as a TaskSpec first).

    The scorer class comes from the task-type registry, so every registered type loads here.
    """
    if not isinstance(spec, TaskSpec):
        spec = TaskSpec.model_validate(spec)
    return task_type(spec.type).task_class(spec)
