"""Extension by registration from outside the package: a search, a merge method, a task type and
a command, declared as entry points of a distribution, run through evolve, compare,
mergekit-yaml and the CLI with no edit to mergekit_sae."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from evolve_fixtures import FakeEvaluator, load_weights, tiny_llama

from mergekit_sae import plugins
from mergekit_sae.cli import main
from mergekit_sae.compare.plan import parse_methods
from mergekit_sae.compare.run import Comparison, compare
from mergekit_sae.errors import PluginError
from mergekit_sae.evaluate import registry
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import run
from mergekit_sae.search import search_class, search_names

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO = Path(__file__).parent / "plugin_demo"
TESTS = Path(__file__).parent  # plugin_task_type.py: the task type `word_count`
ENTRY_POINTS = """\
[mergekit_sae.searches]
scale_sweep = sae_plugin_demo:ScaleSweep

[mergekit_sae.merge_methods]
demo_scaled_mean = sae_plugin_demo:demo_scaled_mean

[mergekit_sae.commands]
hello = sae_plugin_demo:hello

[mergekit_sae.task_types]
word_count = plugin_task_type:TASK_TYPE
"""


def distribution(root: Path, entry_points: str) -> Path:
    """A folder holding an installed-looking distribution with these entry points."""
    info = root / "sae_plugin_demo-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sae-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return root


@pytest.fixture
def installed(tmp_path: Path, monkeypatch) -> Path:
    """The demo plug-in importable and its distribution visible, in this process."""
    site = distribution(tmp_path / "site", ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.syspath_prepend(str(DEMO))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_OWNERS", dict(registry._OWNERS))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    plugins.forget()
    yield site
    plugins.forget()


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("plugin_models")
    return [tiny_llama(root / "a", 71), tiny_llama(root / "b", 72)]


def recipe(parents: list[Path], **fields) -> dict:
    return {
        "models": [str(p) for p in parents],
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 8} for name in "ab"],
        "steps": 2,
        "dtype": "float32",
        "device": "cpu",
        "test_baselines": [],
        **fields,
    }


def test_a_plugin_search_is_registered_and_validated(installed, parents) -> None:
    assert search_names()[-1] == "scale_sweep" and search_class("scale_sweep").name == "scale_sweep"
    assert parse_methods("scale_sweep,linear") == ["scale_sweep", "linear"]
    parsed = parse_recipe(recipe(parents, search="scale_sweep", scale_sweep={"scales": [2.0]}))
    assert parsed.settings_for().scales == [2.0]
    with pytest.raises(ValueError, match=r"scale_sweep\.scales"):
        parse_recipe(recipe(parents, search="scale_sweep", scale_sweep={"scales": []}))


def test_evolve_runs_the_plugin_search_and_method(installed, tmp_path: Path, parents) -> None:
    data = recipe(parents, search="scale_sweep", scale_sweep={"scales": [0.5, 1.0]})
    state = run(parse_recipe(data), tmp_path / "run", progress=False,
                make_evaluator=lambda r, i: FakeEvaluator())  # fmt: skip
    assert state.finished and state.evaluations == 2
    best = state.members[state.best]
    assert best.merge.method == "demo_scaled_mean"
    a, b = load_weights(parents[0]), load_weights(parents[1])
    written = load_weights(tmp_path / "run")
    scale = best.merge.parameters["scale"]
    for name, tensor in written.items():
        assert torch.allclose(tensor, (a[name] + b[name]) / 2 * scale, atol=1e-6), name


def test_compare_runs_the_plugin_search_on_a_plugin_task(installed, tmp_path: Path, parents):
    """A plug-in search, merge method and task type through `compare` and the resident
    evaluator: word_count scores an item 1 when its prompt has `count` words."""
    items = [{"prompt": "a b c", "count": 3}, {"prompt": "a b", "count": 3}]
    files = {}
    for split in ("train", "test"):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(item) + "\n" for item in items))
    task = {"name": "counting", "type": "word_count", **{k: str(v) for k, v in files.items()}}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump({**recipe(parents), "tasks": [task]}))
    comparison = Comparison(recipe=path, methods=["scale_sweep", "linear"], seeds=1, budget=2)
    rows = compare(comparison, tmp_path / "cmp", progress=False)
    assert [(r.method, r.evaluations) for r in rows] == [("scale_sweep", 2), ("linear", 0)]
    assert [r.scores["counting"] for r in rows] == [0.5, 0.5]


def test_plain_mergekit_yaml_runs_the_plugin_method(installed, tmp_path: Path, parents) -> None:
    config = {
        "merge_method": "demo_scaled_mean",
        "models": [{"model": str(p)} for p in parents],
        "parameters": {"scale": 0.25},
        "dtype": "float32",
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    python_path = os.pathsep.join([str(installed), str(DEMO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path}
    command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(path), str(tmp_path / "out")]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=240)
    a, b = load_weights(parents[0]), load_weights(parents[1])
    for name, tensor in load_weights(tmp_path / "out").items():
        assert torch.allclose(tensor, (a[name] + b[name]) / 2 * 0.25, atol=1e-6), name


def test_the_cli_lists_and_runs_a_plugin_command(installed) -> None:
    listing = CliRunner().invoke(main, ["--help"])
    assert "hello" in listing.output and "sae_plugin_demo:hello" in listing.output
    result = CliRunner().invoke(main, ["hello", "world"])
    assert result.exit_code == 0 and result.output == "hello world from a plug-in\n"


def test_a_broken_plugin_names_its_entry_point(tmp_path: Path, monkeypatch) -> None:
    site = distribution(tmp_path, "[mergekit_sae.searches]\nbroken = no_such_module:Thing\n")
    monkeypatch.syspath_prepend(str(site))
    plugins.forget()
    try:
        assert "broken" in search_names()
        with pytest.raises(PluginError, match=r"'broken = no_such_module:Thing'.* sae-plugin-demo"):
            search_class("broken")
    finally:
        plugins.forget()
