"""The answer loss of a recipe's tasks as a differentiable function of a model's parameters.

For each item the reference answer is scored as a continuation of the prompt, tokenised as the
evaluators do (:func:`mergekit_sae.evaluate.loglik.encode_pair`): a multiple-choice item's
correct choice (after the task's ``target_delimiter``), a generation item's ``answer_key``
field (``answer`` by default) after one space. A task's loss is the mean negative
log-likelihood over all its answer tokens; the loss is the mean of the task losses weighted
by the recipe's task weights. Sequences are right-padded and masked, so padding changes
nothing; the parameters enter through ``torch.func.functional_call``, so gradients of any
order flow to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from mergekit_sae.errors import UsageError
from mergekit_sae.evaluate.forward import max_length, pad_id
from mergekit_sae.evaluate.loglik import Request, encode_pair
from mergekit_sae.evaluate.registry import task_type


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded sequences and, per position, the next-token targets and their mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor  # targets[:, t] is the token at t + 1
    target_mask: torch.Tensor  # 1 where targets[:, t] is an answer token


@dataclass(frozen=True)
class TaskBatches:
    """The batches of one task, its answer-token count and its weight in the loss."""

    name: str
    batches: tuple[TokenBatch, ...]
    tokens: int
    weight: float


def reference_text(spec, item: Mapping, answer_key: str) -> tuple[str, str]:
    """The (prompt, continuation) pair whose likelihood is the item's answer loss."""
    keys = task_type(spec.type).item_keys
    if "choices" in keys and "label" in keys:
        return item["prompt"], spec.settings.target_delimiter + item["choices"][item["label"]]
    if "answer" in keys:
        if answer_key not in item:
            raise UsageError(f"task {spec.name!r}: an item has no {answer_key!r} field")
        return item["prompt"], " " + str(item[answer_key])
    raise UsageError(
        f"task {spec.name!r} ({spec.type}): the landscape needs JSONL items with a reference "
        "answer (multiple-choice or generation tasks)"
    )


def encode_items(spec, items: Sequence[Mapping], tokenizer, answer_key: str) -> list[Request]:
    """Token ids of each item's prompt and reference answer."""
    requests = []
    for index, item in enumerate(items):
        request = encode_pair(tokenizer, *reference_text(spec, item, answer_key))
        if not request.continuation:
            raise UsageError(f"task {spec.name!r}: item {index}'s answer encodes to no tokens")
        requests.append(request)
    return requests


def make_batches(
    requests: Sequence[Request], pad: int, limit: int | None, batch_size: int
) -> tuple[TokenBatch, ...]:
    """Right-padded batches; a sequence over ``limit`` tokens loses its oldest prompt tokens."""
    batches = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        rows = []
        for req in chunk:
            tokens = list(req.context) + list(req.continuation)
            answer = len(req.continuation)
            if limit is not None and len(tokens) > limit:
                tokens = tokens[-limit:]
                answer = min(answer, limit - 1)
            rows.append((tokens, answer))
        width = max(len(t) for t, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target_mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for r, (tokens, answer) in enumerate(rows):
            ids[r, : len(tokens)] = torch.as_tensor(tokens)
            mask[r, : len(tokens)] = 1
            target_mask[r, len(tokens) - 1 - answer : len(tokens) - 1] = True
        batches.append(TokenBatch(ids, mask, ids[:, 1:].clone(), target_mask))
    return tuple(batches)


def task_batches(
    spec,
    items,
    tokenizer,
    model,
    *,
    answer_key: str = "answer",
    batch_size: int = 64,
    weight: float = 1.0,
) -> TaskBatches:
    """Encode and batch one task's items for :class:`AnswerLoss`."""
    requests = encode_items(spec, items, tokenizer, answer_key)
    batches = make_batches(requests, pad_id(tokenizer), max_length(model), batch_size)
    tokens = int(sum(int(b.target_mask.sum()) for b in batches))
    return TaskBatches(spec.name, batches, tokens, weight)


class AnswerLoss:
    """``loss(params)``: the weighted mean answer NLL of the tasks under ``params``."""

    def __init__(self, model: torch.nn.Module, tasks: Sequence[TaskBatches]):
        if not tasks or any(t.tokens == 0 for t in tasks):
            raise UsageError("the landscape needs at least one task with answer tokens")
        self.model = model
        self.device = next(model.parameters()).device
        self.tasks = tuple(tasks)

    def task_losses(self, params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each task's mean NLL per answer token."""
        return [self._task_loss(params, task) for task in self.tasks]

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = sum(t.weight for t in self.tasks)
        losses = self.task_losses(params)
        return sum(t.weight * loss for t, loss in zip(self.tasks, losses, strict=True)) / total

    def _task_loss(self, params, task: TaskBatches) -> torch.Tensor:
        """Summed answer NLL over the task's batches, per answer token (fp32 at least)."""
        sums = []
        for batch in task.batches:
            out = functional_call(
                self.model,
                dict(params),
                args=(),
                kwargs={
                    "input_ids": batch.input_ids.to(self.device),
                    "attention_mask": batch.attention_mask.to(self.device),
                    "use_cache": False,
                },
            )
            logits = out.logits[:, :-1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            logprobs = torch.log_softmax(logits, dim=-1)
            picked = logprobs.gather(-1, batch.targets.to(self.device)[..., None]).squeeze(-1)
            sums.append(-picked[batch.target_mask.to(self.device)].sum())
        return torch.stack(sums).sum() / task.tokens
