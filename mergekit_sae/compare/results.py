"""The comparison's outputs: one row per run, ``results.csv``, ``results.md`` and the plot.

``results.md`` is shaped like the paper's Table 1 (per-task test accuracy and the mean,
mean +- std over seeds, plus the repetition rate and distinct-2 of the final model's test
generations when a task generates) and adds a paired comparison of SAE against every other method:
the per-seed difference of the test mean, wins, and a paired t-test where it is defined.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from mergekit_sae.atomic import write_file, write_text
from mergekit_sae.driver.checkpoint import RunState
from mergekit_sae.evaluate.repetition import DEFAULT_N, DEFAULT_THRESHOLD

REFERENCE = "sae"


@dataclass(frozen=True)
class Row:
    """One finished run: test accuracy per task, mean, zeros, evaluations, wall time.

    ``repetition_rate`` and ``distinct_2`` come from the final report's generation metrics
    (None when no task generates, or the evaluator does not measure them);
    ``calibration_passes`` counts the forward plus backward passes of calibration runs
    (``scf_rkl_functional``'s importance pass), which are not fitness evaluations.
    """

    method: str
    seed: int
    scores: dict[str, float]
    mean: float
    zeros: float
    evaluations: int
    wall_s: float
    repetition_rate: float | None = None
    distinct_2: float | None = None
    calibration_passes: int = 0


def run_row(method: str, seed: int, state: RunState, wall_s: float) -> Row:
    """The row of a finished run, from its final report (the search's answer)."""
    final = next(r for r in state.results if r.kind == "evolved")
    generation = final.generation or {}
    return Row(
        method=method,
        seed=seed,
        scores=dict(final.scores),
        mean=final.mean,
        zeros=final.zero_fraction,
        evaluations=state.evaluations,
        wall_s=wall_s,
        repetition_rate=generation.get("repetition_rate"),
        distinct_2=generation.get("distinct_2"),
        calibration_passes=calibration_passes(state),
    )


def calibration_passes(state: RunState) -> int:
    """Forward plus backward calibration passes noted in the run's history."""
    total = 0
    for record in state.history:
        passes = (record.info.get("calibration") or {}).get("calibration_passes") or {}
        total += int(passes.get("forward", 0)) + int(passes.get("backward", 0))
    return total


def optional(value: float | None, digits: int = 6) -> str:
    """A metric with fixed digits, or an empty cell when it was not measured."""
    return "" if value is None else f"{value:.{digits}f}"


def csv_text(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """``results.csv``: method, seed, each task, mean, zeros, repetition_rate, distinct_2,
    evaluations, calibration_passes, wall_s (an unmeasured metric is an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["method", "seed", *tasks, "mean", "zeros", "repetition_rate", "distinct_2"]
    writer.writerow([*header, "evaluations", "calibration_passes", "wall_s"])
    for row in rows:
        writer.writerow(
            [
                row.method,
                row.seed,
                *(f"{row.scores[t]:.6f}" for t in tasks),
                f"{row.mean:.6f}",
                f"{row.zeros:.6f}",
                optional(row.repetition_rate),
                optional(row.distinct_2),
                row.evaluations,
                row.calibration_passes,
                f"{row.wall_s:.1f}",
            ]
        )
    return buffer.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a ``results.csv`` as dictionaries."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def mean_std(values: Sequence[float]) -> str:
    """``mean +- std`` in percent (std over seeds; a single seed has none)."""
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def by_method(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows grouped by method, in first-seen order, each group sorted by seed."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.method, []).append(row)
    return {m: sorted(g, key=lambda r: r.seed) for m, g in groups.items()}


def method_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """Per method: each task and the mean (mean +- std over seeds), zeros, evaluations, wall."""
    header = ["method", *tasks, "mean", "zeros %", "repetition %", "distinct-2"]
    header += ["evaluations", "calibration passes", "wall s", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, group in by_method(rows).items():
        cells = [
            method,
            *(mean_std([r.scores[t] for r in group]) for t in tasks),
            f"**{mean_std([r.mean for r in group])}**",
            f"{100 * statistics.fmean(r.zeros for r in group):.1f}",
            measured_mean([r.repetition_rate for r in group], percent=True),
            measured_mean([r.distinct_2 for r in group], percent=False),
            f"{statistics.fmean(r.evaluations for r in group):.0f}",
            f"{statistics.fmean(r.calibration_passes for r in group):.0f}",
            f"{statistics.fmean(r.wall_s for r in group):.0f}",
            str(len(group)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measured_mean(values: Sequence[float | None], *, percent: bool) -> str:
    """Mean over the seeds that measured it (percent: x 100, 1 decimal; else 3 decimals)."""
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    mean = statistics.fmean(known)
    return f"{100 * mean:.1f}" if percent else f"{mean:.3f}"


def paired_p_value(differences: Sequence[float]) -> float | None:
    """Two-sided paired t-test p-value of the differences (None when undefined)."""
    if len(differences) < 2 or statistics.pstdev(differences) == 0:
        return None
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(differences, 0.0).pvalue)


def paired_table(rows: Sequence[Row], reference: str = REFERENCE) -> str:
    """SAE minus each other method, seed by seed: mean difference, wins, p-value."""
    groups = by_method(rows)
    if reference not in groups:
        return f"(no {reference} rows to compare against)"
    base = {r.seed: r.mean for r in groups[reference]}
    header = ["method", f"{reference} − method (points)", "per seed", f"{reference} wins", "p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, group in groups.items():
        if method == reference:
            continue
        pairs = [(base[r.seed], r.mean) for r in group if r.seed in base]
        if not pairs:
            continue
        differences = [100 * (a - b) for a, b in pairs]
        wins = sum(d > 0 for d in differences)
        p = paired_p_value(differences)
        cells = [
            method,
            f"{statistics.fmean(differences):+.1f}",
            " / ".join(f"{d:+.1f}" for d in differences),
            f"{wins}/{len(differences)}",
            "n/a" if p is None else f"{p:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: Sequence[Row], tasks: Sequence[str], command: str, budget: int) -> str:
    """``results.md``: the command, the method table and the paired comparison."""
    return "\n".join(
        [
            "# Searches and one-shot merges at equal evaluations",
            "",
            "```bash",
            command,
            "```",
            "",
            f"Budget: {budget} fitness evaluations per search (one evaluation = one model "
            "scored on one step's training items, re-scoring included); one-shot merges use "
            "what they need. Test accuracy in %, mean ± std over seeds; zeros = fraction of "
            "exactly-zero elements of the final model (of its task vector when the recipe "
            "prunes deltas); repetition = share of the final model's test generations that "
            f"loop (a whitespace {DEFAULT_N}-gram occurring {DEFAULT_THRESHOLD} or more "
            "times), distinct-2 = distinct bigrams / all bigrams of those generations (n/a: not "
            "measured: no task generates, or the run was scored without the metric); "
            "calibration passes = forward + backward passes of a calibration run (not "
            "evaluations).",
            "",
            method_table(rows, tasks),
            "",
            "## Paired comparison (same seed)",
            "",
            paired_table(rows),
            "",
        ]
    )


def curve_figure(curves: dict[str, list[tuple[int, float]]]) -> Figure:
    """Best training performance against evaluations used: the searches as bold lines, the
    sweep variants (``sae[...]``) as thin dashed ones, each in its own colour."""
    from matplotlib import colormaps

    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.add_subplot()
    palettes = {False: colormaps["tab10"].colors, True: colormaps["tab20b"].colors}
    counts = {False: 0, True: 0}
    for method, points in curves.items():
        xs, ys = zip(*points, strict=True)
        variant = "[" in method
        colour = palettes[variant][counts[variant] % len(palettes[variant])]
        counts[variant] += 1
        axes.plot(
            xs,
            [100 * y for y in ys],
            color=colour,
            linewidth=1.0 if variant else 2.2,
            linestyle="--" if variant else "-",
            marker=None if variant else ".",
            label=method,
        )
    axes.set(
        xlabel="fitness evaluations used",
        ylabel="best member's training performance (%)",
        title="Search progress (mean over seeds)",
    )
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def mean_curve(states: Sequence[RunState]) -> list[tuple[int, float]]:
    """The step-by-step (evaluations, best performance) averaged over seeds."""
    length = min((len(s.history) for s in states), default=0)
    points = []
    for index in range(length):
        records = [s.history[index] for s in states]
        values = [r.best_performance for r in records if r.best_performance is not None]
        if values:
            evaluations = statistics.fmean(r.evaluations for r in records)
            points.append((round(evaluations), statistics.fmean(values)))
    return points


def write_results(
    out: Path,
    rows: Sequence[Row],
    tasks: Sequence[str],
    command: str,
    budget: int,
    curves: dict[str, list[tuple[int, float]]],
) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and ``progress.png`` into OUT/, atomically."""
    written = [
        write_text(out / "results.csv", csv_text(rows, tasks)),
        write_text(out / "results.md", markdown(rows, tasks, command, budget)),
    ]
    figure = curve_figure(curves)
    written.append(write_file(out / "progress.png", lambda p: figure.savefig(p, format="png")))
    return written
