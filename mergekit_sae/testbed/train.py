"""Training of the testbed models: causal LM loss on the target part of (context, target) pairs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mergekit_sae.testbed.config import StageConfig

Example = tuple[str, str]  # (context that gets no loss, target the model learns to continue with)


def encode_batch(tokenizer, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Tokenize `context + target + EOS` right-padded, with labels only on target and EOS."""
    contexts = tokenizer([c for c, _ in examples])["input_ids"]
    targets = tokenizer([t for _, t in examples], add_special_tokens=False)["input_ids"]
    rows = [c + t + [tokenizer.eos_token_id] for c, t in zip(contexts, targets, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, context) in enumerate(zip(rows, contexts, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(context) : len(row)] = torch.tensor(row[len(context) :])
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_at(step: int, stage: StageConfig) -> float:
    """Linear warmup to `stage.lr`, then cosine decay to a tenth of it."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, stage: StageConfig) -> torch.optim.AdamW:
    """The AdamW optimizer every testbed stage trains with."""
    return torch.optim.AdamW(
        model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=stage.weight_decay
    )


def target_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal LM loss of `model(**batch).loss`, with the output head applied only where
    a label is set (a large vocabulary's head is a fifth of a small model's compute)."""
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def train_step(
    model, optimizer, batch: dict[str, torch.Tensor], lr: float, *, targets_only: bool = False
) -> float:
    """One optimizer step at learning rate `lr` (gradients clipped to norm 1); the loss.
    `targets_only` computes the loss with `target_loss`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = target_loss(model, batch) if targets_only else model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(
    model,
    tokenizer,
    draw_batch: Callable[[int], Sequence[Example]],
    stage: StageConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Run `stage.steps` AdamW steps on batches from `draw_batch(batch_size)`; return the losses."""
    model.train()
    optimizer = make_optimizer(model, stage)
    losses = []
    for step in range(stage.steps):
        batch = encode_batch(tokenizer, draw_batch(stage.batch_size))
        losses.append(train_step(model, optimizer, batch, lr_at(step, stage)))
        if log and (step + 1) % max(1, stage.steps // 5) == 0:
            log(f"step {step + 1}/{stage.steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses
