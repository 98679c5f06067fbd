"""Run outputs: plots from history.jsonl and the model card's front matter and tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergekit_sae.outputs.card import CARD_FILE, is_hub_id, render_card, results_table, write_card
from mergekit_sae.outputs.plots import (
    plot_fitness,
    plot_sparsity,
    plot_test_accuracy,
    read_history,
    write_plots,
)
from mergekit_sae.records import OffspringRecord, StepRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def step(number: int, rate: float, best: float, mean: float, sparsity: float) -> StepRecord:
    """A step record with the plotted fields set and one rejected offspring."""
    child = OffspringRecord(
        id=f"m{10 + number}",
        parents=["m0000", "m0001"],
        parent_performance=[0.5, 0.4],
        scores={"math": 0.3},
        performance=0.3,
        sparsity=rate,
        zero_fraction=rate,
        fitness=0.3,
    )
    return StepRecord(
        step=number,
        subsample={"math": 8},
        population_before=["m0000", "m0001"],
        offspring=[child],
        population_after=["m0000", "m0001"],
        best="m0000",
        best_fitness=best,
        best_performance=best,
        mean_fitness=mean,
        mean_sparsity=sparsity,
        seconds={"merge": 0.1, "write": 0.2, "score": 0.3},
        info={"rate": rate, "offspring_density": 1 - rate, "fitness_before": {"m0000": 0.5}},
    )


RECORDS = [
    step(1, 0.1, 0.50, 0.40, 0.12),
    step(2, 0.35, 0.55, 0.47, 0.20),
    step(3, 0.6, 0.61, 0.52, 0.33),
]
RESULTS = {
    "math expert": {"math": 0.8, "multilingual": 0.3},
    "linear 50/50": {"math": 0.5, "multilingual": 0.5},
    "SAE": {"math": 0.7, "multilingual": 0.6},
}


def line_data(figure) -> dict[str, tuple[list[float], list[float]]]:
    """The (x, y) data of every labelled line of a figure's single axes."""
    (axes,) = figure.axes
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in axes.get_lines()
    }


def test_fitness_plot_shows_history_values() -> None:
    lines = line_data(plot_fitness(RECORDS))
    assert lines["best fitness"] == ([1, 2, 3], [0.50, 0.55, 0.61])
    assert lines["mean fitness"] == ([1, 2, 3], [0.40, 0.47, 0.52])


def test_sparsity_plot_shows_rate_and_sparsity() -> None:
    lines = line_data(plot_sparsity(RECORDS))
    assert lines["schedule rate"] == ([1, 2, 3], [0.1, 0.35, 0.6])
    assert lines["mean sparsity"] == ([1, 2, 3], [0.12, 0.20, 0.33])


def test_test_accuracy_bars_match_results() -> None:
    (axes,) = plot_test_accuracy(RESULTS).axes
    heights = {
        container.get_label(): [bar.get_height() for bar in container]
        for container in axes.containers
    }
    # tasks are on the x axis in order of appearance
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["math", "multilingual"]
    assert heights == {label: [s["math"], s["multilingual"]] for label, s in RESULTS.items()}


def test_write_plots_reads_history_and_writes_pngs(tmp_path: Path) -> None:
    history = "".join(record.model_dump_json() + "\n" for record in RECORDS)
    (tmp_path / "history.jsonl").write_text(history)
    assert read_history(tmp_path / "history.jsonl") == RECORDS
    written = write_plots(tmp_path, results=RESULTS)
    names = sorted(path.name for path in written)
    assert names == ["fitness.png", "sparsity.png", "test_accuracy.png"]
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names


def test_malformed_history_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text(RECORDS[0].model_dump_json() + "\n" + '{"step": 2}\n')
    with pytest.raises(ValueError, match=r"history\.jsonl:2: not a step record"):
        read_history(path)


def front_matter(text: str) -> dict:
    """Parse the YAML between the leading ``---`` lines of a card."""
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


RECIPE = (
    "# comment\nname: m0003\nmerge_method: sae_prune\nmodels:\n- model: org/a\n"
    "---\nmerge_method: sae_evolve\nmodels:\n- model: m0003\n- model: org/b\n"
)


def test_card_front_matter_and_sections(tmp_path: Path) -> None:
    path = write_card(
        tmp_path,
        name="sae-merge",
        parents=["org/a", "org/b"],
        recipe=RECIPE,
        results=RESULTS,
        evolved="SAE",
        settings={"steps": 12, "archive_size": 6},
    )
    assert path == tmp_path / CARD_FILE
    text = path.read_text()
    meta = front_matter(text)
    assert meta["base_model"] == ["org/a", "org/b"]
    assert {"merge", "mergekit", "sae_evolve"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers"
    assert RECIPE.rstrip() in text
    assert "mergekit-multi mergekit_config.yml" in text
    assert "- steps: `12`" in text

    from huggingface_hub import ModelCard

    card = ModelCard(text)
    assert card.data.base_model == ["org/a", "org/b"]
    assert "sae_evolve" in card.data.tags


def test_card_single_stage_command_and_local_parents(tmp_path: Path) -> None:
    local = tmp_path / "experts" / "math"
    local.mkdir(parents=True)
    text = render_card(
        name="m",
        parents=[str(local), "org/b"],
        recipe="merge_method: sae_evolve\nmodels: []\n",
        results={},
    )
    meta = front_matter(text)
    assert meta["base_model"] == ["org/b"]  # a local directory is no Hub id
    assert f"- `{local}`" in text
    assert "mergekit-yaml mergekit_config.yml ./merged" in text
    assert "## Results" not in text


def test_results_table_values_and_means() -> None:
    table = results_table(RESULTS, ["math", "multilingual"], highlight="SAE").splitlines()
    assert table[0] == "| Model | math | multilingual | Mean |"
    rows = {line.split("|")[1].strip().strip("*"): line for line in table[2:]}
    for label, scores in RESULTS.items():
        mean = (scores["math"] + scores["multilingual"]) / 2
        cells = [c.strip().strip("*") for c in rows[label].split("|")[2:-1]]
        assert cells == [
            f"{100 * scores['math']:.1f}",
            f"{100 * scores['multilingual']:.1f}",
            f"{100 * mean:.1f}",
        ]
    assert rows["SAE"].startswith("| **SAE** |")
    partial = results_table({"x": {"math": 0.5}}, ["math", "multilingual"])
    assert partial.splitlines()[2] == "| x | 50.0 | - | - |"


@pytest.mark.parametrize(
    ("name", "expected"), [("org/model", True), ("model", False), ("a/b/c", False), ("/abs", False)]
)
def test_is_hub_id(name: str, expected: bool) -> None:
    assert is_hub_id(name) is expected
