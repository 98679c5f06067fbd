"""A task type defined outside the package: ``word_count``, found through an entry point.

The tests declare it in a temporary distribution (``word_count = plugin_task_type:TASK_TYPE``
in the entry-point group ``mergekit_sae.task_types``); nothing in ``mergekit_sae`` names it.
Its score ignores the model: an item scores 1.0 when its prompt has ``count`` words (or
letters), within ``tolerance``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mergekit_sae.evaluate import Task, TaskSettings, TaskType


class WordCountSettings(TaskSettings):
    """Options of ``word_count``: what is counted and how far off a count may be."""

    unit: Literal["words", "letters"] = Field("words", description="what the prompt counts")
    tolerance: int = Field(0, ge=0, description="largest accepted distance from the answer")


class WordCountTask(Task):
    """Scores each item by whether its prompt's length matches its ``count`` (no model used)."""

    settings: WordCountSettings

    def score_details(self, model, tokenizer, items, *, batch_size=None) -> list[dict[str, Any]]:
        """Records with the measured length, the item's count and the score."""
        records = []
        for item in items:
            length = count(item["prompt"], self.settings.unit)
            hit = abs(length - item["count"]) <= self.settings.tolerance
            records.append({"length": length, "count": item["count"], "score": float(hit)})
        return records


def count(prompt: str, unit: str) -> int:
    """Whitespace-separated words, or letters, of a prompt."""
    return len(prompt.split()) if unit == "words" else sum(c.isalpha() for c in prompt)


def check_item(item: dict[str, Any]) -> str | None:
    """A count is never negative."""
    return "'count' must be >= 0" if item["count"] < 0 else None


TASK_TYPE = TaskType(
    name="word_count",
    task_class=WordCountTask,
    settings_model=WordCountSettings,
    item_keys={"prompt": str, "count": int},
    check_item=check_item,
)
NOT_A_TASK_TYPE = {"name": "word_count"}
CLASHING = TaskType(name="multiple_choice", task_class=WordCountTask)
