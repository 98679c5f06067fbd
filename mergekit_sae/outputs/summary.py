"""The plain-text summary printed at the end of a run: test accuracy table and where time went."""

from __future__ import annotations

from collections.abc import Sequence

from mergekit_sae.driver.checkpoint import RunState
from mergekit_sae.records import TestResult


def results_table(results: Sequence[TestResult], tasks: Sequence[str]) -> str:
    """Aligned text table: one row per model, test accuracy (%) per task, mean and sparsity."""
    header = ["model", *tasks, "mean", "zeros"]
    rows = [
        [
            row.label,
            *(f"{100 * row.scores[task]:.1f}" if task in row.scores else "-" for task in tasks),
            f"{100 * row.mean:.1f}",
            f"{100 * row.zero_fraction:.1f}%",
        ]
        for row in results
    ]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(r) for r in rows)])


def timing_line(state: RunState) -> str:
    """Mean seconds per step spent merging, writing and scoring."""
    if not state.history:
        return "no steps run"
    steps = len(state.history)
    totals = {
        key: sum(r.seconds.get(key, 0.0) for r in state.history)
        for key in ("merge", "write", "score")
    }
    parts = ", ".join(f"{key} {value / steps:.2f}s" for key, value in totals.items())
    return f"{steps} steps; per step: {parts}"


def summary(state: RunState, tasks: Sequence[str]) -> str:
    """The end-of-run summary: the best member, the test table and the timing line."""
    best = state.members[state.best] if state.best else None
    lines = []
    if best is not None:
        fitness = "not scored on train" if best.fitness is None else f"{best.fitness:.4f}"
        lines.append(
            f"best member {best.id} ({best.origin}, born at step {best.born}): "
            f"fitness {fitness}, zeros {100 * best.zero_fraction:.1f}%"
        )
    if state.results:
        lines += ["", "test accuracy (%)", results_table(state.results, tasks)]
    lines += ["", timing_line(state)]
    return "\n".join(lines)
