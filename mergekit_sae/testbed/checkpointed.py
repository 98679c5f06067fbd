"""Training that survives a stop: a checkpoint every few steps, and batches that depend only on
(seed, stage, step), so a resumed stage sees the batches an unbroken one would have seen.

A checkpoint folder holds the weights (`model.safetensors`), AdamW's moments
(`optimizer.safetensors`, one tensor per parameter and moment) and `state.json` (the next step
and the losses so far). It is written with `atomic_dir`, so a stop while writing leaves the
previous checkpoint; nothing in it is pickled.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from mergekit_sae.atomic import atomic_dir
from mergekit_sae.errors import TestbedError
from mergekit_sae.testbed.config import StageConfig
from mergekit_sae.testbed.train import Example, encode_batch, lr_at, make_optimizer, train_step

WEIGHTS, MOMENTS, STATE = "model.safetensors", "optimizer.safetensors", "state.json"
OnStep = Callable[[int, float], None]  # (steps done, loss of the last one)


def step_batch(items: Sequence[Example], seed: int, name: str, step: int, size: int):
    """The training examples of one step: drawn from (seed, stage name, step) alone."""
    rng = random.Random(f"{seed}:{name}:{step}")
    return [rng.choice(items) for _ in range(size)]


def save_checkpoint(folder: Path, model, optimizer, step: int, losses: list[float]) -> None:
    """Write the weights, the optimizer's moments and the step count, atomically."""
    tensors = {
        f"{index}.{key}": value.detach().reshape(value.shape).contiguous()
        for index, state in optimizer.state_dict()["state"].items()
        for key, value in state.items()
    }
    with atomic_dir(folder) as staged:
        staged.mkdir()
        save_model(model, str(staged / WEIGHTS))
        save_file(tensors, str(staged / MOMENTS))
        (staged / STATE).write_text(json.dumps({"step": step, "losses": losses}), "utf-8")


def load_checkpoint(folder: Path, model, optimizer) -> tuple[int, list[float]]:
    """Restore the weights and moments from `folder`; the step to continue at and the losses."""
    try:
        state = json.loads((folder / STATE).read_text("utf-8"))
        load_model(model, str(folder / WEIGHTS))
        moments = load_file(str(folder / MOMENTS))
    except (OSError, ValueError, RuntimeError) as e:
        raise TestbedError(
            f"training checkpoint {folder} is unreadable ({e}); delete it to restart this stage",
            file=folder,
        ) from e
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        restored.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": restored, "param_groups": current["param_groups"]})
    return int(state["step"]), [float(x) for x in state["losses"]]


def checkpoint_step(folder: Path) -> int:
    """The step a stage's checkpoint continues at (0 when there is none)."""
    try:
        return int(json.loads((folder / STATE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def train_checkpointed(
    model,
    tokenizer,
    items: Sequence[Example],
    stage: StageConfig,
    *,
    seed: int,
    name: str,
    folder: Path,
    every: int,
    on_step: OnStep | None = None,
) -> list[float]:
    """Train `model` in place for `stage.steps` steps, continuing from the checkpoint in
    `folder` when there is one and writing one every `every` steps; return the losses."""
    model.train()
    optimizer = make_optimizer(model, stage)
    start, losses = 0, []
    if (folder / STATE).is_file():
        start, losses = load_checkpoint(folder, model, optimizer)
    for step in range(start, stage.steps):
        batch = encode_batch(tokenizer, step_batch(items, seed, name, step, stage.batch_size))
        lr = lr_at(step, stage)
        losses.append(train_step(model, optimizer, batch, lr, targets_only=True))
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if (step + 1) % every == 0 and step + 1 < stage.steps:
            save_checkpoint(folder, model, optimizer, step + 1, losses)
    model.eval()
    return losses
