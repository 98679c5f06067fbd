"""Batched greedy generation through ``model.generate``, left padded, stopping on stop strings.

Prompts are encoded as lm-eval's HF backend does, grouped by length, left padded with attention
masks, and continued by plain argmax (none of the checkpoint's own generation settings); each
text is cut before its first stop string.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from mergekit_sae.evaluate.device import map_batches
from mergekit_sae.evaluate.forward import (
    encode,
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

    A row stops at a stop string, at an EOS token, or after max_new_tokens tokens; the batch
    stops as soon as every row has.
    """
    encoded, order = prepare_prompts(model, tokenizer, prompts, max_new_tokens)

    def run(batch: list[int]) -> list[str]:
        tokens = _generate_batch(
            model, tokenizer, [encoded[i] for i in batch], max_new_tokens, stop
        )
        return texts_of(model, tokenizer, tokens, stop)

    result = [""] * len(prompts)
    for index, text in zip(order, map_batches(run, order, batch_size), strict=True):
        result[index] = text
    return result


def prepare_prompts(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt (an empty one is BOS), cut to fit the model's context with the
    generation budget, and the prompt indices longest first (to limit padding)."""
    encoded = [encode(tokenizer, p) or [prefix_id(tokenizer)] for p in prompts]
    limit = max_length(model)
    if limit is not None:
        encoded = [e[-max(1, limit - max_new_tokens) :] for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    return encoded, order


def _generate_batch(
    model, tokenizer, sequences: list[list[int]], max_new_tokens: int, stop: Sequence[str]
) -> list[list[int]]:
    """Generated token ids of one batch of encoded prompts (``model.generate``, greedy)."""
    ids, mask, _ = left_pad(sequences, pad_id(tokenizer), model_device(model))
    criteria = StoppingCriteriaList([StopOnText(tokenizer, stop, ids.shape[1])] if stop else [])
    eos = eos_ids(model, tokenizer).tolist() or None
    with plain_generation_config(model):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            stopping_criteria=criteria,
            eos_token_id=eos,
            pad_token_id=pad_id(tokenizer),
        )
    return out[:, ids.shape[1] :].tolist()


@contextmanager
def plain_generation_config(model) -> Iterator[None]:
    """Give the model a default GenerationConfig for the call, restoring its own afterwards.

    ``generate`` fills every unset option from the checkpoint's ``generation_config.json``, so a
    shipped ``repetition_penalty`` or ``no_repeat_ngram_size`` would alter greedy decoding (and
    hide the very repetition the stability metrics measure); scoring wants the plain argmax.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class StopOnText(StoppingCriteria):
    """Stops a row once its decoded generated text holds a stop string (as lm-eval checks).

    transformers' own ``stop_strings`` fails on word-level tokenizers (such as the testbed's):
    its vocabulary cleaning needs the tokenizer to spell out ``"abcdef"``.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, tuple(stop), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        hits = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)


def texts_of(model, tokenizer, tokens: list[list[int]], stop: Sequence[str]) -> list[str]:
    """Decode each row's generated tokens up to its first EOS and cut it at its first stop."""
    eos = set(eos_ids(model, tokenizer).tolist())
    texts = []
    for row in tokens:
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(truncate_at_stop(tokenizer.decode(row[:end], skip_special_tokens=True), stop))
    return texts


def eos_ids(model, tokenizer) -> torch.Tensor:
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
