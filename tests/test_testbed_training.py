"""Training helpers of the testbeds: the targets-only loss equals transformers' own causal LM
loss, and a stage's batches depend only on (seed, stage, step)."""

from __future__ import annotations

import torch
from tiny_models import make_llama

from mergekit_sae.testbed.checkpointed import step_batch
from mergekit_sae.testbed.train import target_loss


def test_targets_only_loss_is_the_causal_lm_loss():
    model = make_llama(0, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0  # a right-padded row
    labels = torch.full_like(input_ids, -100)
    labels[0, 4:] = input_ids[0, 4:]
    labels[1, 2:7] = input_ids[1, 2:7]
    labels[2, 3:6] = input_ids[2, 3:6]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    expected = model(**batch).loss
    got = target_loss(model, batch)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_step_batches_depend_only_on_seed_stage_and_step():
    items = [(f"q{i}", f"a{i}") for i in range(100)]
    first = [step_batch(items, 0, "math", step, 8) for step in range(5)]
    assert first == [step_batch(items, 0, "math", step, 8) for step in range(5)]
    assert step_batch(items, 0, "math", 3, 8) != step_batch(items, 0, "multilingual", 3, 8)
    assert step_batch(items, 0, "math", 3, 8) != step_batch(items, 1, "math", 3, 8)
    assert all(len(batch) == 8 and set(batch) <= set(items) for batch in first)
