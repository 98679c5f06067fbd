"""Batched log-likelihood of continuations given contexts, tokenised as lm-eval does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import DynamicCache

from mergekit_sae.evaluate.device import map_batches
from mergekit_sae.evaluate.forward import (
    cache_argument,
    encode,
    forward_cached,
    left_pad,
    max_length,
    model_device,
    pad_id,
    prefix_id,
)


class Request(NamedTuple):
    """One (context, continuation) pair as token ids."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Tokenise like lm-eval: trailing context spaces move to the continuation; the whole text
    is encoded and the continuation is what follows the encoded context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        cont = encode(tokenizer, continuation)
        prefix = prefix_id(tokenizer)
        if cont and cont[0] == prefix:
            return Request(tuple(cont[:1]), tuple(cont[1:]))
        return Request((prefix,), tuple(cont))
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return Request(tuple(ctx), tuple(whole[len(ctx) :]))


@torch.inference_mode()
def continuation_logliks(
    model, tokenizer, requests: Sequence[Request], *, batch_size: int = 32
) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens given its context.

    Requests that share a context (the choices of one question) share its forward: the context
    runs once, its KV cache is repeated for each continuation, and only the continuation tokens
    run again. ``batch_size`` bounds the continuations scored per forward.
    """
    if not requests:
        return []
    limit = max_length(model)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, req in enumerate(requests):
        if not req.continuation:
            raise ValueError(f"request {index} has an empty continuation")
        context = req.context
        if limit is not None and len(context) + len(req.continuation) - 1 > limit:
            context = context[-max(1, limit - len(req.continuation) + 1) :]
        groups.setdefault(context, []).append(index)
    contexts = sorted(groups, key=len, reverse=True)
    widest = max(len(members) for members in groups.values())

    def run(batch: list[tuple[int, ...]]) -> list[list[float]]:
        continuations = [[requests[i].continuation for i in groups[c]] for c in batch]
        return _score_shared_context(model, tokenizer, batch, continuations)

    per_context = map_batches(run, contexts, max(1, batch_size // widest))
    results = [0.0] * len(requests)
    for context, scores in zip(contexts, per_context, strict=True):
        for index, score in zip(groups[context], scores, strict=True):
            results[index] = score
    return results


def _score_shared_context(
    model, tokenizer, contexts: list[tuple[int, ...]], continuations: list[list[tuple[int, ...]]]
) -> list[list[float]]:
    """Score each context's continuations: one pass over the contexts, one over the tails."""
    device = model_device(model)
    pad = pad_id(tokenizer)
    ids, mask, positions = left_pad(contexts, pad, device)
    cache = DynamicCache(config=model.config)
    last = forward_cached(model, ids, mask, positions, cache)
    first = torch.log_softmax(last.float(), dim=-1)
    pairs = [(g, c[0]) for g, conts in enumerate(continuations) for c in conts]
    flat = first[[g for g, _ in pairs], [t for _, t in pairs]].tolist()
    scores, start = [], 0
    for conts in continuations:
        scores.append(flat[start : start + len(conts)])
        start += len(conts)
    # Continuations longer than one token: repeat their context's cache and run the rest.
    rows = [
        (g, k) for g, conts in enumerate(continuations) for k, c in enumerate(conts) if len(c) > 1
    ]
    if not rows:
        return scores
    width = max(len(continuations[g][k]) for g, k in rows) - 1
    tail_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    tail_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (g, k) in enumerate(rows):
        cont = torch.as_tensor(continuations[g][k])
        tail_ids[r, : len(cont) - 1] = cont[:-1]
        targets[r, : len(cont) - 1] = cont[1:]
        tail_mask[r, : len(cont) - 1] = 1
    source = torch.as_tensor([g for g, _ in rows], device=device)
    cache.batch_select_indices(source)
    context_lengths = mask.sum(-1)[source]
    out = model(
        input_ids=tail_ids.to(device),
        attention_mask=torch.cat([mask[source], tail_mask.to(device)], dim=1),
        position_ids=context_lengths[:, None] + torch.arange(width, device=device),
        use_cache=True,
        **cache_argument(model, cache),
    )
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.to(device)[..., None]).squeeze(-1)
    rest = torch.where(tail_mask.to(device).bool(), picked, 0.0).sum(-1).tolist()
    for (g, k), value in zip(rows, rest, strict=True):
        scores[g][k] += value
    return scores
