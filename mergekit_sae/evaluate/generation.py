"""Batched greedy generation with a KV cache, left padding and early stop on stop strings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from mergekit_sae.evaluate.device import map_batches
from mergekit_sae.evaluate.padding import (
    encode,
    forward_cached,
    left_pad,
    max_length,
    model_device,
    pad_id,
    prefix_id,
)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut text at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        index = text.find(s)
        if s and index != -1:
            cut = min(cut, index)
    return text[:cut]


@torch.inference_mode()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 32,
) -> list[str]:
    """Greedily continue each prompt; each text ends before its first stop string.

    A row stops at a stop string, at the EOS token, or after max_new_tokens tokens; the
    batch stops as soon as every row has. Prompts are grouped by length to limit padding.
    """
    encoded = [encode(tokenizer, p) or [prefix_id(tokenizer)] for p in prompts]
    limit = max_length(model)
    if limit is not None:
        encoded = [e[-max(1, limit - max_new_tokens) :] for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))

    def run(batch: list[int]) -> list[str]:
        return _generate_batch(
            model, tokenizer, [encoded[i] for i in batch], max_new_tokens, tuple(stop)
        )

    texts = map_batches(run, order, batch_size)
    result = [""] * len(prompts)
    for index, text in zip(order, texts, strict=True):
        result[index] = text
    return result


def _generate_batch(
    model, tokenizer, sequences: list[list[int]], max_new_tokens: int, stop: tuple[str, ...]
) -> list[str]:
    """Generate for one batch of encoded prompts; finished rows leave the batch (and cache)."""
    device = model_device(model)
    ids, mask, positions = left_pad(sequences, pad_id(tokenizer), device)
    eos = _eos_ids(model, tokenizer)
    cache = DynamicCache(config=model.config)
    generated: list[list[int]] = [[] for _ in sequences]
    active = list(range(len(sequences)))  # rows still generating, in cache order
    step_ids = ids
    for step in range(max_new_tokens):
        next_ids = forward_cached(model, step_ids, mask, positions, cache).argmax(-1)
        finished = torch.isin(next_ids, eos) if eos.numel() else torch.zeros_like(next_ids).bool()
        for row, token in zip(active, next_ids.tolist(), strict=True):
            generated[row].append(token)
        if stop:
            texts = tokenizer.batch_decode(
                [generated[row] for row in active], skip_special_tokens=True
            )
            hits = [any(s in text for s in stop) for text in texts]
            finished |= torch.as_tensor(hits, device=device)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        keep = (~finished).nonzero().flatten()
        if len(keep) < len(active):
            cache.batch_select_indices(keep)
            active = [active[i] for i in keep.tolist()]
            next_ids, mask, positions = next_ids[keep], mask[keep], positions[keep]
        step_ids = next_ids[:, None]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions[:, -1:] + 1
    texts = []
    for tokens in generated:
        text = tokenizer.decode(_until_eos(tokens, eos), skip_special_tokens=True)
        texts.append(truncate_at_stop(text, stop))
    return texts


def _eos_ids(model, tokenizer) -> torch.Tensor:
    """All token ids that end a generation (the generation config's and the tokenizer's EOS)."""
    ids: set[int] = set()
    candidates = [tokenizer.eos_token_id]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return torch.tensor(sorted(ids), dtype=torch.long, device=model_device(model))


def _until_eos(tokens: list[int], eos: torch.Tensor) -> list[int]:
    """Tokens before the first EOS."""
    eos_set = set(eos.tolist())
    for i, t in enumerate(tokens):
        if t in eos_set:
            return tokens[:i]
    return tokens
