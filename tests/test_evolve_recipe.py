"""Bad recipes and misused output folders fail before any work, naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from evolve_fixtures import VOCAB, recipe_data, task_files, tiny_llama

from mergekit_sae.cli import main
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.recipe.schema import Recipe, RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[list[Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("recipe")
    parents = [tiny_llama(root / "p0", 0), tiny_llama(root / "p1", 1)]
    return parents, task_files(root / "data")


def run_cli(tmp_path: Path, data: dict, *extra: str, out: Path | None = None):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    out = out or tmp_path / "out"
    result = CliRunner().invoke(main, ["evolve", str(recipe), str(out), "--quiet", *extra])
    return result, out


def test_defaults_are_the_papers(setup) -> None:
    parents, files = setup
    recipe = parse_recipe(
        {"models": [str(p) for p in parents], "tasks": recipe_data(parents, files)["tasks"]}
    )
    sae = recipe.settings_for("sae")
    assert (sae.schedule.s_min, sae.schedule.s_max) == (0.1, 0.6)
    assert (sae.schedule.t0, sae.schedule.t_mult, recipe.steps) == (3, 2, 12)
    assert sae.merge.sparsity_scope == "global"
    assert sae.merge.redense == "parents"
    assert (recipe.prune_target, recipe.sparsity_measure) == ("weights", "zero_count")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tasks": [{"name": "x", "type": "bogus", "train": "t.jsonl"}]}, "tasks[0].type"),
        ({"sae": {"schedule": {"s_min": 0.7, "s_max": 0.2}}}, "schedule: s_min (0.7) is larger"),
        ({"sae": {"archive_size": 1}}, "archive_size: Input should be greater than or equal to 2"),
        ({"steps": 0}, "steps:"),
        ({"stepz": 3}, "stepz: Extra inputs are not permitted"),
        ({"sae": {"merge": {"sparsity_scope": "layer"}}}, "sae.merge.sparsity_scope"),
        ({"prune_target": "delta"}, "prune_target 'delta' prunes model - base"),
        ({"sae": {"framework": "ga", "matchmaker": False}}, "matchmaker is not read under"),
        ({"tasks": []}, "tasks: List should have at least 1 item"),
    ],
)
def test_invalid_fields_are_named(tmp_path: Path, setup, change: dict, expected: str) -> None:
    parents, files = setup
    result, out = run_cli(tmp_path, recipe_data(parents, files, **change))
    assert result.exit_code != 0
    assert expected in result.output
    assert str(tmp_path / "recipe.yml") in result.output
    assert not out.exists()


def test_population_smaller_than_parent_count(setup) -> None:
    parents, files = setup
    data = recipe_data(parents, files, sae={"archive_size": 2})
    data["models"].append(str(parents[0].parent / "third"))
    with pytest.raises(RecipeError, match=r"sae.archive_size \(2\) must be at least"):
        parse_recipe(data)


def test_an_old_layout_names_where_each_field_moved(tmp_path: Path, setup) -> None:
    parents, files = setup
    data = recipe_data(parents, files)
    del data["sae"]
    old = {
        "population_size": 6,
        "schedule": {"t0": 3},
        "fitness_sparsity_weight": 0.1,
        "rescore_population": True,
        "merge": {
            "method": "scf_rkl",
            "prune_target": "delta",
            "sparsity_measure": "magnitude",
            "sparsity_weight": 1.0,
            "redense": "original",
        },
    }
    result, out = run_cli(tmp_path, {**data, **old})
    assert result.exit_code != 0 and not out.exists()
    for moved in [
        "population_size -> sae.archive_size",
        "schedule -> sae.schedule",
        "fitness_sparsity_weight -> sae.sparsity_term.weight",
        "rescore_population -> sae.rescore",
        "merge.method -> sae.crossover",
        "merge.prune_target -> prune_target (top level)",
        "merge.sparsity_measure -> sparsity_measure (top level)",
        "merge.sparsity_weight -> sae.merge.sparsity_weight",
        "merge.redense -> sae.merge.redense",
    ]:
        assert moved in result.output, moved


def test_missing_model_path(tmp_path: Path, setup) -> None:
    parents, files = setup
    data = recipe_data(parents, files)
    data["models"][1] = str(tmp_path / "no-such-model")
    result, out = run_cli(tmp_path, data)
    assert result.exit_code != 0
    assert "models[1]" in result.output and "does not exist" in result.output
    assert not out.exists()


def test_parents_with_different_shapes_fail_before_work(tmp_path: Path, setup) -> None:
    parents, files = setup
    resized = tiny_llama(tmp_path / "resized", 3, vocab_extra=4)
    result, out = run_cli(tmp_path, recipe_data([parents[0], resized], files))
    assert result.exit_code != 0
    assert "lm_head.weight" in result.output  # the first differing tensor in name order
    rows = len(VOCAB)
    assert f"({rows + 4}, 16)" in result.output and f"({rows}, 16)" in result.output
    assert not out.exists()


def test_missing_task_file(tmp_path: Path, setup) -> None:
    parents, files = setup
    data = recipe_data(parents, files)
    data["tasks"][1]["test"] = str(tmp_path / "missing.jsonl")
    result, out = run_cli(tmp_path, data)
    assert result.exit_code != 0
    assert "tasks[1]" in result.output and "missing.jsonl" in result.output
    assert not out.exists()


def test_nonempty_output_needs_resume_or_force(tmp_path: Path, setup) -> None:
    parents, files = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result, _ = run_cli(tmp_path, recipe_data(parents, files), out=out)
    assert result.exit_code != 0 and "is not empty" in result.output
    result, _ = run_cli(tmp_path, recipe_data(parents, files), "--force", out=out)
    assert result.exit_code != 0 and "holds no evolve run" in result.output
    result, _ = run_cli(tmp_path, recipe_data(parents, files), "--resume", out=out)
    assert result.exit_code != 0 and "holds no evolve checkpoint" in result.output
    assert (out / "keep.txt").read_text() == "user data"


def test_resume_refuses_a_changed_recipe(tmp_path: Path, setup) -> None:
    parents, files = setup
    data = recipe_data(parents, files, steps=2)
    result, out = run_cli(tmp_path, data, "--stop-after", "0")
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet
    changed = dict(data, seed=5)
    result, _ = run_cli(tmp_path, changed, "--resume", out=out)
    assert result.exit_code != 0 and "seed" in result.output


def test_recipe_field_reference_is_complete() -> None:
    """Every recipe field has a default except the models and tasks."""
    required = {name for name, field in Recipe.model_fields.items() if field.is_required()}
    assert required == {"models", "tasks"}


def evolve_recipes() -> list[Path]:
    """The evolve recipes shipped in recipes/ (plain MergeKit recipes have a merge_method)."""
    root = Path(__file__).parent.parent / "recipes"
    found = sorted(root.rglob("*.yml"))
    return [p for p in found if "tasks" in (yaml.safe_load(p.read_text(encoding="utf-8")) or {})]


@pytest.mark.parametrize("path", evolve_recipes(), ids=lambda p: p.name)
def test_every_shipped_evolve_recipe_validates(tmp_path: Path, path: Path) -> None:
    """The recipes in recipes/ follow the current layout (their JSONL files stand in here)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for task in data["tasks"]:
        for split in ("train", "test"):
            if split in task:
                stand_in = tmp_path / task["name"] / f"{split}.jsonl"
                stand_in.parent.mkdir(exist_ok=True)
                item = {"prompt": "q", "answer": "1", "choices": ["a"], "label": 0}
                stand_in.write_text(json.dumps(item) + "\n")
                task[split] = str(stand_in)
    recipe = parse_recipe(data, str(path))
    assert recipe.tasks and recipe.search in ("sae", "m2n2", "pso", "cmaes", "oneshot")
