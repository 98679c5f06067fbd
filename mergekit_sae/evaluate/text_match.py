"""Task type ``generate_text_match``: greedy generation scored by exact match of the text.

The output (or the first group of ``answer_regex`` found in it) must equal the item's answer
after both are normalised the same way: punctuation dropped (``ignore_punctuation``, every
Unicode punctuation character), case folded (``ignore_case``, ``str.casefold``), and trimmed.
Answers of any JSON scalar type are compared as text (``7`` as ``"7"``); unlike
``generate_exact_match``, ``"7"`` and ``"7.0"`` differ and ``####`` has no special meaning.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from pydantic import Field, field_validator

from mergekit_sae.evaluate.registry import TaskType, register_task_type
from mergekit_sae.evaluate.tasks import GenerationSettings, GenerationTask


class TextMatchSettings(GenerationSettings):
    """Options of ``generate_text_match``: generation's, what is extracted and how it compares."""

    answer_regex: str | None = Field(
        None, description="regex applied to the output; its first group (else the match) is scored"
    )
    ignore_case: bool = Field(False, description="compare answers case-folded")
    ignore_punctuation: bool = Field(False, description="drop punctuation before comparing")

    @field_validator("answer_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        """An answer_regex must compile (checked when the spec is validated, not when scoring)."""
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(
                    f"answer_regex {value!r} is not a valid regular expression ({e})"
                ) from e
        return value


class GenerateTextMatchTask(GenerationTask):
    """Greedy generation; the (extracted, normalised) text must equal the item's answer."""

    settings: TextMatchSettings

    def score_details(self, model, tokenizer, items, *, batch_size=None) -> list[dict[str, Any]]:
        """Records with the generated text, the extracted text, both normalised sides, the score.

        ``extracted`` is None when ``answer_regex`` is set and does not match (score 0).
        """
        outputs = self.generate(model, tokenizer, items, batch_size)
        return [self._record(item, output) for item, output in zip(items, outputs, strict=True)]

    def _record(self, item: dict[str, Any], output: str) -> dict[str, Any]:
        settings = self.settings
        extracted = extract_text(output, settings.answer_regex)
        target = normalize_text(
            str(item["answer"]), settings.ignore_case, settings.ignore_punctuation
        )
        prediction = (
            None
            if extracted is None
            else normalize_text(extracted, settings.ignore_case, settings.ignore_punctuation)
        )
        return {
            "output": output,
            "extracted": extracted,
            "prediction": prediction,
            "target": target,
            "score": float(prediction == target),
        }


def extract_text(output: str, pattern: str | None) -> str | None:
    """The whole output without a pattern; else the first group of the first match (the whole
    match when the pattern has no group); None when nothing matches or the group took no part."""
    if pattern is None:
        return output
    match = re.search(pattern, output)
    if match is None:
        return None
    return match.group(1) if match.re.groups else match.group(0)


def normalize_text(text: str, ignore_case: bool = False, ignore_punctuation: bool = False) -> str:
    """Drop punctuation and fold case when asked, then trim surrounding whitespace."""
    if ignore_punctuation:
        text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    if ignore_case:
        text = text.casefold()
    return text.strip()


TASK_TYPE = register_task_type(
    TaskType(
        name="generate_text_match",
        task_class=GenerateTextMatchTask,
        settings_model=TextMatchSettings,
        item_keys={"prompt": str, "answer": (str, int, float)},
    )
)
