"""Tasks: items of a split, per-item scores of a model on them, and their aggregate."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

from mergekit_sae.evaluate.data import load_jsonl
from mergekit_sae.evaluate.extract import (
    answers_match,
    extract_flexible,
    extract_strict,
    reference_answer,
)
from mergekit_sae.evaluate.generation import greedy_generate
from mergekit_sae.evaluate.loglik import continuation_logliks, encode_pair
from mergekit_sae.evaluate.spec import TaskSpec

Split = Literal["train", "test"]
DEFAULT_BATCH_SIZE = 32


class Task:
    """A named task: items per split and a scorer giving each item a score in [0, 1]."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.name = spec.name

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

    def _batch_size(self, batch_size: int | None) -> int:
        return batch_size or self.spec.batch_size or DEFAULT_BATCH_SIZE


class GenerateExactMatchTask(Task):
    """Greedy generation; the extracted number must equal the item's answer."""

    def score_details(self, model, tokenizer, items, *, batch_size=None):
        """Records with the generated text, both extractions, the prediction used and the score.

        ``prediction`` follows ``spec.extraction``: ``strict`` takes the ``#### N`` answer,
        ``flexible`` the last number, ``strict_or_flexible`` (default) the first when present.
        """
        spec = self.spec
        outputs = greedy_generate(
            model,
            tokenizer,
            [item["prompt"] for item in items],
            max_new_tokens=spec.max_new_tokens,
            stop=spec.stop,
            batch_size=self._batch_size(batch_size),
        )
        records = []
        for item, output in zip(items, outputs, strict=True):
            strict, flexible = extract_strict(output), extract_flexible(output)
            prediction = {
                "strict": strict,
                "flexible": flexible,
                "strict_or_flexible": strict if strict is not None else flexible,
            }[spec.extraction]
            target = reference_answer(item["answer"])
            records.append(
                {
                    "output": output,
                    "strict": strict,
                    "flexible": flexible,
                    "prediction": prediction,
                    "target": target,
                    "strict_match": float(answers_match(strict, target)),
                    "flexible_match": float(answers_match(flexible, target)),
                    "score": float(answers_match(prediction, target)),
                }
            )
        return records


class MultipleChoiceTask(Task):
    """Each choice is scored by its log-likelihood after the prompt; the best must be the label."""

    def score_details(self, model, tokenizer, items, *, batch_size=None):
        """Records with each choice's log-likelihood, the chosen index and the score."""
        spec = self.spec
        requests, spans = [], []
        for item in items:
            start = len(requests)
            for choice in item["choices"]:
                request = encode_pair(tokenizer, item["prompt"], spec.target_delimiter + choice)
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
                _normalized(logliks[i], requests[i].continuation, choice, spec.normalize)
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


def _split_path(spec: TaskSpec, split: str) -> Path:
    if split not in ("train", "test"):
        raise ValueError(f"task {spec.name!r}: unknown split {split!r}; use 'train' or 'test'")
    path = getattr(spec, split)
    if path is None:
        raise ValueError(f"task {spec.name!r} has no {split} split: set `{split}:` in its spec")
    return path


@cache
def _cached_items(
    path: Path, mtime_ns: int, size: int, task_type: str
) -> tuple[dict[str, Any], ...]:
    """Items of one JSONL file, read again only when its modification time or size changes."""
    return tuple(load_jsonl(path, task_type))


def load_task(spec: TaskSpec | dict) -> Task:
    """Build the task a spec describes (a dict is validated as a TaskSpec first)."""
    if not isinstance(spec, TaskSpec):
        spec = TaskSpec.model_validate(spec)
    if spec.type == "generate_exact_match":
        return GenerateExactMatchTask(spec)
    if spec.type == "multiple_choice":
        return MultipleChoiceTask(spec)
    from mergekit_sae.evaluate.lm_eval_task import LmEvalTask

    return LmEvalTask(spec)
