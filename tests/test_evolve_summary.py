"""The end-of-run summary table shows each model's test accuracy, mean and zero fraction."""

from __future__ import annotations

from mergekit_sae.outputs.summary import results_table
from mergekit_sae.records import TestResult


def row(label: str, scores: dict[str, float], mean: float, zeros: float) -> TestResult:
    return TestResult(
        label=label,
        kind="parent",
        model=label,
        scores=scores,
        mean=mean,
        sparsity=zeros,
        zero_fraction=zeros,
    )


def test_results_table_rows_and_alignment() -> None:
    table = results_table(
        [
            row("math", {"math": 0.8125, "lang": 0.25}, 0.53125, 0.0),
            row("SAE (evolved)", {"math": 0.75, "lang": 0.5}, 0.625, 0.3512),
        ],
        ["math", "lang"],
    )
    lines = table.splitlines()
    assert lines[0].split() == ["model", "math", "lang", "mean", "zeros"]
    assert lines[2].split() == ["math", "81.2", "25.0", "53.1", "0.0%"]
    assert lines[3].split() == ["SAE", "(evolved)", "75.0", "50.0", "62.5", "35.1%"]
    assert len({len(line) for line in lines}) == 1  # every line has the same width


def test_missing_task_score_is_a_dash() -> None:
    table = results_table([row("x", {"math": 1.0}, 1.0, 0.0)], ["math", "lang"])
    assert table.splitlines()[2].split() == ["x", "100.0", "-", "100.0", "0.0%"]
