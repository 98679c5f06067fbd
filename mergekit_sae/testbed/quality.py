"""The quality table: test accuracy of the base, the experts and static merges on both tasks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergekit_sae.evaluate import load_task

EXPERT_MIN = 0.80  # each expert on its own task
SPECIALISATION_GAP = 0.30  # the other expert is at least this much worse on a task
BASE_MARGIN = 0.30  # real-model testbed: each expert at least this far above the base

# task -> the expert trained on it
EXPERT_OF = {"math": "math", "multilingual": "multilingual"}


def score_models(models: Mapping[str, torch.nn.Module], tokenizer, specs: Mapping[str, dict]):
    """Test accuracy of each model on each task, with `mergekit_sae.evaluate`'s scorers."""
    tasks = {name: load_task(spec) for name, spec in specs.items()}
    items = {name: task.items("test") for name, task in tasks.items()}
    table: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for row, model in models.items():
            table[row] = {
                name: task.aggregate(task.score(model, tokenizer, items[name]))
                for name, task in tasks.items()
            }
    return table


def quality_checks(table: Mapping[str, Mapping[str, float]]) -> dict[str, bool]:
    """The testbed's quality bar, one named check per condition."""
    checks = {}
    for task, expert in EXPERT_OF.items():
        own = table[expert][task]
        checks[f"{expert} expert >= {EXPERT_MIN:.2f} on {task}"] = own >= EXPERT_MIN
        checks |= gap_checks(table, task)
        for other in EXPERT_OF.values():
            checks[f"base < {other} expert on {task}"] = table["base"][task] < table[other][task]
    return checks


def real_model_checks(table: Mapping[str, Mapping[str, float]]) -> dict[str, bool]:
    """The real-model testbed's bar: each expert at least `BASE_MARGIN` above the base on its
    own task, and the other expert at least `SPECIALISATION_GAP` below it there."""
    checks = {}
    for task, expert in EXPERT_OF.items():
        checks[f"{expert} expert >= base + {BASE_MARGIN:.2f} on {task}"] = (
            table[expert][task] >= table["base"][task] + BASE_MARGIN
        )
        checks |= gap_checks(table, task)
    return checks


def gap_checks(table: Mapping[str, Mapping[str, float]], task: str) -> dict[str, bool]:
    """On `task`, every other expert at least `SPECIALISATION_GAP` below the task's expert."""
    expert = EXPERT_OF[task]
    own = table[expert][task]
    return {
        f"{other} expert <= {expert} expert - {SPECIALISATION_GAP:.2f} on {task}": (
            table[other][task] <= own - SPECIALISATION_GAP
        )
        for other in EXPERT_OF.values()
        if other != expert
    }


def format_table(table: Mapping[str, Mapping[str, float]], checks: Mapping[str, bool]) -> str:
    """The table and the checks as aligned text."""
    tasks = list(next(iter(table.values())))
    width = max(len(row) for row in table) + 2
    lines = ["model".ljust(width) + "".join(t.rjust(14) for t in tasks)]
    for row, scores in table.items():
        lines.append(row.ljust(width) + "".join(f"{scores[t]:14.3f}" for t in tasks))
    lines.append("")
    for name, ok in checks.items():
        lines.append(f"[{'ok' if ok else 'FAIL'}] {name}")
    return "\n".join(lines)
