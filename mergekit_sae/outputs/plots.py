"""PNG plots of a run from its ``history.jsonl``: fitness, sparsity and schedule, test accuracy.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, no display),
so plotting works headless and in worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from mergekit_sae.atomic import write_file
from mergekit_sae.records import StepRecord

HISTORY_FILE = "history.jsonl"
PLOTS_DIR = "plots"


def read_history(path: str | Path) -> list[StepRecord]:
    """The step records of a ``history.jsonl`` file, naming the line of a malformed record."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(StepRecord.model_validate_json(line))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not a step record: {error}") from error
    return records


def plot_per_step(
    records: Sequence[StepRecord], series: Mapping[str, Sequence[float]], **axes_settings
) -> Figure:
    """Lines of `series` (label -> one value per record) against the step number."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    steps = [r.step for r in records]
    for (label, values), marker in zip(series.items(), ("o", "."), strict=False):
        axes.plot(steps, values, marker=marker, label=label)
    axes.set(xlabel="step", **axes_settings)
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


def plot_fitness(records: Sequence[StepRecord]) -> Figure:
    """Best and mean population fitness after each step."""
    series = {
        "best fitness": [r.best_fitness for r in records],
        "mean fitness": [r.mean_fitness for r in records],
    }
    return plot_per_step(records, series, ylabel="fitness", title="Population fitness")


def plot_sparsity(records: Sequence[StepRecord]) -> Figure:
    """Mean population sparsity and the schedule's pruning rate per step."""
    series = {
        "schedule rate": [r.info.get("rate") for r in records],
        "mean sparsity": [r.mean_sparsity for r in records],
    }
    return plot_per_step(records, series, ylabel="fraction", title="Sparsity schedule", ylim=(0, 1))


def plot_test_accuracy(results: Mapping[str, Mapping[str, float]]) -> Figure:
    """Grouped bars: test accuracy per task (x, in order of appearance) for each model."""
    tasks = list(dict.fromkeys(task for scores in results.values() for task in scores))
    figure = Figure(figsize=(max(6, 1.5 * len(tasks) * max(len(results), 1) / 2), 4))
    figure.set_layout_engine("constrained")
    axes = figure.add_subplot()
    width = 0.8 / max(len(results), 1)
    for index, (model, scores) in enumerate(results.items()):
        positions = [t + (index - (len(results) - 1) / 2) * width for t in range(len(tasks))]
        values = [scores.get(task, float("nan")) for task in tasks]
        axes.bar(positions, values, width=width, label=model)
    axes.set_xticks(range(len(tasks)), tasks)
    axes.set(ylabel="test accuracy", title="Test accuracy per task", ylim=(0, 1))
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Save a figure as PNG through a temporary file and a rename (no half-written image)."""
    return write_file(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def write_plots(
    out: str | Path,
    records: Sequence[StepRecord] | None = None,
    results: Mapping[str, Mapping[str, float]] | None = None,
) -> list[Path]:
    """Write ``OUT/plots/*.png`` from the step records (default: ``OUT/history.jsonl``).

    ``results`` maps a model label to its test accuracy per task (parents, baselines, the
    evolved model); the test-accuracy plot is written when it is given.
    """
    out = Path(out)
    if records is None:
        records = read_history(out / HISTORY_FILE)
    target = out / PLOTS_DIR
    written = []
    if records:
        written.append(save_figure(plot_fitness(records), target / "fitness.png"))
        written.append(save_figure(plot_sparsity(records), target / "sparsity.png"))
    if results:
        written.append(save_figure(plot_test_accuracy(results), target / "test_accuracy.png"))
    return written
