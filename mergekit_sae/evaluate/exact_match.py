"""Task type ``generate_exact_match``: greedy generation scored by the extracted final number.

Extraction follows lm-eval's gsm8k filters (:mod:`.extract`); answers compare as numbers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mergekit_sae.evaluate.extract import (
    answers_match,
    extract_flexible,
    extract_strict,
    reference_answer,
)
from mergekit_sae.evaluate.registry import TaskType, register_task_type
from mergekit_sae.evaluate.tasks import GenerationSettings, GenerationTask


class ExactMatchSettings(GenerationSettings):
    """Options of ``generate_exact_match``: generation's, and which extraction is scored."""

    extraction: Literal["strict", "flexible", "strict_or_flexible"] = Field(
        "strict_or_flexible",
        description="strict: the number after '#### '; flexible: the last number; "
        "strict_or_flexible: strict when present, else flexible",
    )


class GenerateExactMatchTask(GenerationTask):
    """Greedy generation; the extracted number must equal the item's answer."""

    settings: ExactMatchSettings

    def score_details(self, model, tokenizer, items, *, batch_size=None) -> list[dict[str, Any]]:
        """Records with the generated text, both extractions, the prediction used and the score.

        ``prediction`` follows the ``extraction`` option: ``strict`` takes the ``#### N`` answer,
        ``flexible`` the last number, ``strict_or_flexible`` (default) the first when present.
        """
        outputs = self.generate(model, tokenizer, items, batch_size)
        return [self._record(item, output) for item, output in zip(items, outputs, strict=True)]

    def _record(self, item: dict[str, Any], output: str) -> dict[str, Any]:
        """One item's record: what was generated, extracted and compared."""
        strict, flexible = extract_strict(output), extract_flexible(output)
        prediction = {
            "strict": strict,
            "flexible": flexible,
            "strict_or_flexible": strict if strict is not None else flexible,
        }[self.settings.extraction]
        target = reference_answer(item["answer"])
        return {
            "output": output,
            "strict": strict,
            "flexible": flexible,
            "prediction": prediction,
            "target": target,
            "strict_match": float(answers_match(strict, target)),
            "flexible_match": float(answers_match(flexible, target)),
            "score": float(answers_match(prediction, target)),
        }


TASK_TYPE = register_task_type(
    TaskType(
        name="generate_exact_match",
        task_class=GenerateExactMatchTask,
        settings_model=ExactMatchSettings,
        item_keys={"prompt": str, "answer": (str, int, float)},
    )
)
