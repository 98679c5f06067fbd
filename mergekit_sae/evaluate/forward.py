"""The forward pass the evaluators share: encoding, left padding with positions, cached steps."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text with the tokenizer's default special tokens (lm-eval's HF convention)."""
    return list(tokenizer(text)["input_ids"])


def pad_id(tokenizer) -> int:
    """The id used for padding: the pad token, else EOS, else 0 (padding is always masked)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def prefix_id(tokenizer) -> int:
    """The token that conditions an empty prompt: BOS, else EOS (as lm-eval)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("an empty prompt needs a tokenizer with a BOS or EOS token")


def max_length(model) -> int | None:
    """The longest sequence the model accepts, when its config states one."""
    return getattr(model.config, "max_position_embeddings", None)


def left_pad(
    sequences: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids).

    Positions count real tokens only, so a padded row sees the same positions as the same
    row run alone; padding therefore never changes a result.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def model_device(model) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def cache_argument(model, cache) -> dict[str, object]:
    """The key-value cache as the model's forward takes it: ``cache`` since transformers
    renamed it (the old ``past_key_values`` then warns), ``past_key_values`` before."""
    parameters = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}


def forward_cached(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
    """One forward pass that extends `cache` and returns logits of the last position only."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **cache_argument(model, cache),
    )
    return out.logits[:, -1]
