"""Hugging Face causal LMs as landscape entries: a recipe's items, the model, its answer loss.

Each model folder is loaded with eager attention (the fused kernels have no double backward)
in the chosen dtype on the chosen device, with its own tokenizer; the items are those of the
recipe's tasks, ``items`` per task drawn with ``seed`` from the chosen split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mergekit_sae.errors import UsageError
from mergekit_sae.evaluate.data import subsample
from mergekit_sae.evaluate.tasks import load_task
from mergekit_sae.landscape.grid import Entry
from mergekit_sae.landscape.loss import AnswerLoss, task_batches


def select_tasks(tasks: Sequence, names: Sequence[str]) -> list:
    """The recipe's tasks, or those named (in the recipe's order)."""
    if not names:
        return list(tasks)
    known = [t.name for t in tasks]
    for name in names:
        if name not in known:
            raise UsageError(f"--task {name!r} is not a task of the recipe (tasks: {known})")
    return [t for t in tasks if t.name in names]


def task_items(tasks: Sequence, split: str, n_items: int | None, seed: int) -> list[list[dict]]:
    """Each task's items of the split, ``n_items`` drawn with ``seed`` (all when None)."""
    return [subsample(load_task(t).items(split), n_items, seed) for t in tasks]


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """Each folder's name, with as many parent names as it takes to tell clashing ones apart
    (``math``, ``pso/seed0``, ``sae/seed0``)."""
    parts = [Path(p).absolute().parts for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        clashes = [k for k, label in enumerate(labels) if labels.count(label) > 1]
        if not clashes:
            return labels
        if all(depth[k] >= len(parts[k]) for k in clashes):
            raise UsageError(f"the same model folder is given twice: {labels[clashes[0]]}")
        for k in clashes:
            depth[k] = min(depth[k] + 1, len(parts[k]))


def model_entry(
    path: Path,
    label: str,
    tasks: Sequence,
    items: Sequence[Sequence[dict]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    answer_key: str,
    batch_size: int,
) -> Entry:
    """An entry whose loader reads the model and builds its answer loss."""

    def load():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="eager"
        ).to(device)
        model.eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(path)
        batches = [
            task_batches(
                spec,
                task_items,
                tokenizer,
                model,
                answer_key=answer_key,
                batch_size=batch_size,
                weight=getattr(spec, "weight", 1.0),
            )
            for spec, task_items in zip(tasks, items, strict=True)
        ]
        params = {name: p.detach() for name, p in model.named_parameters()}
        return params, AnswerLoss(model, batches)

    return Entry(label, load)
