"""`mergekit-sae compare` end to end on tiny models with the fake evaluator."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml
from evolve_fixtures import FakeEvaluator, tiny_llama

from mergekit_sae.compare.plan import parse_methods, parse_sweep, plan_runs, run_recipe_data
from mergekit_sae.compare.results import read_csv
from mergekit_sae.compare.run import Comparison, compare
from mergekit_sae.errors import OutputFolderError, UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["sae", "cmaes", "linear", "sae_oneshot"]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    data = {
        "models": [str(tiny_llama(root / "a", 41)), str(tiny_llama(root / "b", 42))],
        "base_model": str(tiny_llama(root / "base", 40)),
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 8} for name in "ab"],
        "steps": 2,
        "sae": {"archive_size": 4},
        "dtype": "float32",
        "device": "cpu",
        "prune_target": "delta",
        "cmaes": {"popsize": 4},
    }
    path = root / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    return path


class Counting:
    """Hands out fake evaluators and counts the fitness evaluations they make."""

    def __init__(self) -> None:
        self.evaluators: list[FakeEvaluator] = []

    def __call__(self, recipe, inputs) -> FakeEvaluator:
        self.evaluators.append(FakeEvaluator())
        return self.evaluators[-1]

    @property
    def calls(self) -> int:
        return sum(e.scored for e in self.evaluators)


def run_compare(recipe_file: Path, out: Path, methods=METHODS, sweeps=(), **options):
    counting = Counting()
    comparison = Comparison(
        recipe=recipe_file, methods=list(methods), seeds=2, sweeps=list(sweeps), command="cmd"
    )
    rows = compare(comparison, out, progress=False, make_evaluator=counting, **options)
    return rows, counting


def without_wall(path: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in read_csv(path)]


def test_compare_end_to_end_is_deterministic_and_consistent(tmp_path: Path, recipe_file) -> None:
    rows, counting = run_compare(recipe_file, tmp_path / "one")
    budget = 2 * (4 + 2)  # the SAE run's evaluations: 2 steps of 4 re-scored + 2 offspring
    assert [(r.method, r.seed) for r in rows] == [(m, s) for m in METHODS for s in (0, 1)]
    used = {r.method: r.evaluations for r in rows}
    assert used == {"sae": budget, "cmaes": budget, "linear": 0, "sae_oneshot": 2}
    assert counting.calls == 2 * (budget + budget + 0 + 2)
    out = tmp_path / "one"
    for method in METHODS:
        for seed in (0, 1):
            run_dir = out / method / f"seed{seed}"
            assert (run_dir / "mergekit_config.yml").is_file()
            assert (run_dir / "history.jsonl").is_file()
    assert (out / "progress.png").stat().st_size > 0
    run_compare(recipe_file, tmp_path / "two")
    assert without_wall(out / "results.csv") == without_wall(tmp_path / "two" / "results.csv")

    # the markdown table agrees with the CSV: mean over seeds of each method's test mean
    table = (out / "results.md").read_text()
    assert table.splitlines()[3] == "cmd"
    by_method: dict[str, list[float]] = {}
    with open(out / "results.csv") as handle:
        for row in csv.DictReader(handle):
            by_method.setdefault(row["method"], []).append(float(row["mean"]))
    for method, means in by_method.items():
        line = next(x for x in table.splitlines() if x.startswith(f"| {method} |"))
        shown = float(re.search(r"\*\*([0-9.]+)", line).group(1))
        assert shown == pytest.approx(100 * sum(means) / len(means), abs=0.051)
    paired = table.split("## Paired comparison")[1]
    sae = by_method["sae"]
    for method in ("cmaes", "linear"):
        line = next(x for x in paired.splitlines() if x.startswith(f"| {method} |"))
        difference = float(line.split("|")[2])
        expected = 100 * sum(a - b for a, b in zip(sae, by_method[method], strict=True)) / 2
        assert difference == pytest.approx(expected, abs=0.051)


def test_resume_keeps_finished_runs_and_adds_methods(tmp_path: Path, recipe_file) -> None:
    out = tmp_path / "c"
    run_compare(recipe_file, out, methods=["linear", "sae"])
    with pytest.raises(OutputFolderError, match="--resume"):
        run_compare(recipe_file, out, methods=["linear", "sae"])
    stamp = (out / "sae" / "seed0" / "history.jsonl").stat().st_mtime_ns
    rows, counting = run_compare(
        recipe_file, out, methods=["linear", "sae", "sae_oneshot"], resume=True
    )
    assert counting.calls == 2 * 2  # only the new sae_oneshot runs scored anything
    assert (out / "sae" / "seed0" / "history.jsonl").stat().st_mtime_ns == stamp
    assert [r.method for r in rows] == ["linear"] * 2 + ["sae"] * 2 + ["sae_oneshot"] * 2
    with pytest.raises(OutputFolderError, match="not drop"):
        run_compare(recipe_file, out, methods=["linear"], resume=True)


def test_a_stopped_run_continues_on_resume(tmp_path: Path, recipe_file) -> None:
    from mergekit_sae.compare.plan import RunSpec
    from mergekit_sae.recipe.loading import parse_recipe
    from mergekit_sae.run import run

    out = tmp_path / "s"
    whole, _ = run_compare(recipe_file, tmp_path / "whole", methods=["sae"])
    # an interrupted run: the SAE run of seed 0 stopped after its first step
    run_compare(recipe_file, out, methods=["linear"])
    base = yaml.safe_load(recipe_file.read_text())
    data = run_recipe_data(base, RunSpec("sae", 0), budget=12)
    run(
        parse_recipe(data),
        out / "sae" / "seed0",
        progress=False,
        stop_after=1,
        make_evaluator=lambda r, i: FakeEvaluator(),
    )
    rows, _ = run_compare(recipe_file, out, methods=["linear", "sae"], resume=True)
    assert [r.mean for r in rows if r.method == "sae"] == [r.mean for r in whole]


def test_sweep_rows_and_plan() -> None:
    assert parse_sweep("sae.schedule.t0=2,6") == ("sae.schedule.t0", [2, 6])
    assert parse_sweep("sae.merge.sparsity_scope=local") == ("sae.merge.sparsity_scope", ["local"])
    with pytest.raises(UsageError):
        parse_sweep("sae.schedule.t0")
    with pytest.raises(UsageError, match="unknown nope"):
        parse_methods("sae,nope")
    runs = plan_runs(["sae"], 2, [("sae.schedule.t0", [2])])
    assert [(r.method, r.seed, r.overrides) for r in runs] == [
        ("sae", 0, {}),
        ("sae", 1, {}),
        ("sae[sae.schedule.t0=2]", 0, {"sae.schedule.t0": 2}),
        ("sae[sae.schedule.t0=2]", 1, {"sae.schedule.t0": 2}),
    ]
    data = run_recipe_data({"sae": {"schedule": {"t0": 3}}, "seed": 9}, runs[2], budget=30)
    assert data["sae"]["schedule"]["t0"] == 2 and data["seed"] == 0
    assert data["search"] == "sae" and data["budget"] == 30


def test_sweep_runs_the_changed_recipe(tmp_path: Path, recipe_file) -> None:
    rows, _ = run_compare(
        recipe_file, tmp_path / "w", methods=["sae"], sweeps=[("sae.alpha", [0.0])]
    )
    assert [r.method for r in rows] == ["sae", "sae", "sae[sae.alpha=0.0]"] * 1 + [
        "sae[sae.alpha=0.0]"
    ]
    from mergekit_sae.driver.checkpoint import load_state

    state = load_state(tmp_path / "w" / "sae_sae.alpha=0.0_" / "seed0")
    assert state.recipe["search_settings"]["sae"]["alpha"] == 0.0


def test_compare_with_the_real_evaluators(tmp_path: Path) -> None:
    """Tiny models and JSONL tasks scored by the resident model: the CLI writes every output."""
    from click.testing import CliRunner
    from evolve_fixtures import recipe_data, task_files

    from mergekit_sae.cli import main

    models = [tiny_llama(tmp_path / "a", 51), tiny_llama(tmp_path / "b", 52)]
    sae = {"archive_size": 2, "children_per_step": 1}
    data = recipe_data(models, task_files(tmp_path / "data"), steps=1, sae=sae)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    arguments = ["compare", str(recipe), str(out), "--methods", "sae,linear", "--seeds", "1"]
    result = CliRunner().invoke(main, [*arguments, "--quiet"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "results.csv")
    assert [(r["method"], r["evaluations"]) for r in rows] == [("sae", "3"), ("linear", "0")]
    for row in rows:  # accuracies of the tiny random models, as fractions of the test items
        assert 0.0 <= float(row["colours"]) <= 1.0 and 0.0 <= float(row["sums"]) <= 1.0
        weighted = (float(row["colours"]) + float(row["sums"])) / 2
        assert float(row["mean"]) == pytest.approx(weighted, abs=1e-6)
    again = CliRunner().invoke(main, [*arguments, "--quiet"])
    assert again.exit_code != 0 and "--resume" in again.output


def test_tensorboard_option_gives_every_run_its_own_log(tmp_path: Path, recipe_file) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mergekit_sae.driver.checkpoint import load_state

    logs = tmp_path / "tb"
    comparison = Comparison(
        recipe=recipe_file, methods=["sae"], seeds=2, command="cmd", tensorboard=str(logs)
    )
    compare(comparison, tmp_path / "c", progress=False, make_evaluator=Counting())
    for seed in (0, 1):
        accumulator = EventAccumulator(str(logs / "sae" / f"seed{seed}"))
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        best = next(t for t in tags if "best" in t and "fitness" in t)
        logged = [event.value for event in accumulator.Scalars(best)]
        history = load_state(tmp_path / "c" / "sae" / f"seed{seed}").history
        assert logged == pytest.approx([r.best_fitness for r in history])
