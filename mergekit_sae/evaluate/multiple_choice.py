"""Task type ``multiple_choice``: choices ranked by their log-likelihood after the prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from mergekit_sae.evaluate.loglik import continuation_logliks, encode_pair
from mergekit_sae.evaluate.registry import TaskSettings, TaskType, register_task_type
from mergekit_sae.evaluate.tasks import Task


class MultipleChoiceSettings(TaskSettings):
    """Options of ``multiple_choice``: how choices are joined to the prompt and ranked."""

    normalize: Literal["none", "tokens", "chars"] = Field(
        "none", description="divide each choice's log-likelihood by its token or char count"
    )
    target_delimiter: str = Field(" ", description="text put between the prompt and a choice")


class MultipleChoiceTask(Task):
    """Each choice is scored by its log-likelihood after the prompt; the best must be the label."""

    settings: MultipleChoiceSettings

    def score_details(self, model, tokenizer, items, *, batch_size=None):
        """Records with each choice's log-likelihood, the chosen index and the score."""
        settings = self.settings
        requests, spans = [], []
        for item in items:
            start = len(requests)
            for choice in item["choices"]:
                request = encode_pair(tokenizer, item["prompt"], settings.target_delimiter + choice)
                if not request.continuation:
                    raise ValueError(
                        f"task {self.name!r}: choice {choice!r} of item {len(spans)} "
                        "encodes to no tokens after its prompt"
                    )
                requests.append(request)
            spans.append((start, len(requests)))
        logliks = continuation_logliks(
            model, tokenizer, requests, batch_size=self._batch_size(batch_size)
        )
        records = []
        for item, (start, end) in zip(items, spans, strict=True):
            values = [
                _normalized(logliks[i], requests[i].continuation, choice, settings.normalize)
                for i, choice in zip(range(start, end), item["choices"], strict=True)
            ]
            chosen = max(range(len(values)), key=values.__getitem__)
            records.append(
                {
                    "logliks": logliks[start:end],
                    "values": values,
                    "chosen": chosen,
                    "label": item["label"],
                    "score": float(chosen == item["label"]),
                }
            )
        return records


def _normalized(loglik: float, tokens: Sequence[int], choice: str, normalize: str) -> float:
    """The value choices are ranked by: the sum, or per token, or per character (lm-eval's
    acc_norm divides by the choice's character count)."""
    if normalize == "tokens":
        return loglik / max(1, len(tokens))
    if normalize == "chars":
        return loglik / max(1, len(choice))
    return loglik


def check_item(item: dict[str, Any]) -> str | None:
    """At least two string choices, and a label that indexes one of them."""
    choices, label = item["choices"], item["label"]
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        return "'choices' must be a list of at least two strings"
    if not 0 <= label < len(choices):
        return f"'label' {label} is out of range for {len(choices)} choices"
    return None


TASK_TYPE = register_task_type(
    TaskType(
        name="multiple_choice",
        task_class=MultipleChoiceTask,
        settings_model=MultipleChoiceSettings,
        item_keys={"prompt": str, "choices": list, "label": int},
        check_item=check_item,
    )
)
