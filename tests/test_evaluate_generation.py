"""Greedy generation against a reference argmax loop (no cache, no padding, no model.generate)."""

from __future__ import annotations

import pytest
import torch
from evaluate_toy import make_tokenizer, random_llama
from transformers import GenerationConfig

from mergekit_sae.evaluate.generation import greedy_generate

PROMPTS = ["Q: what is 3 plus 4 A:", "the", "le ciel is the colour of snow and grass", "what is 12"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def reference_greedy(model, tokenizer, prompt: str, steps: int, stop: list[str]) -> str:
    """Run the whole sequence each step and append the argmax; stop at EOS or a stop string."""
    ids = tokenizer(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            text = tokenizer.decode(new, skip_special_tokens=True)
            if any(s in text for s in stop):
                break
    text = tokenizer.decode(new, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


@pytest.mark.parametrize("stop", [[], ["is"], ["plus", "0"]])
def test_batched_generation_equals_reference_argmax(tokenizer, stop):
    model = random_llama(seed=2)
    expected = [reference_greedy(model, tokenizer, p, 7, stop) for p in PROMPTS]
    assert greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=7, stop=stop) == expected


def test_the_checkpoints_generation_settings_do_not_change_greedy_decoding(tokenizer):
    """A shipped repetition_penalty or n-gram ban must not alter the argmax (nor stay altered)."""
    model = random_llama(seed=2)
    expected = [reference_greedy(model, tokenizer, p, 8, []) for p in PROMPTS]
    own = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=3, repetition_penalty=5.0, no_repeat_ngram_size=1
    )
    model.generation_config = own
    assert greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=8, stop=[]) == expected
    assert model.generation_config is own
