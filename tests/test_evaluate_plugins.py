"""Task types of other distributions: found through the ``mergekit_sae.task_types`` entry points.

Each test declares ``tests/plugin_task_type.py`` in a temporary distribution (a
``wc_tasks-0.1.dist-info`` folder on ``sys.path``, found by ``importlib.metadata``) and starts
from a registry that has not loaded its plug-ins yet.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from evolve_fixtures import tiny_llama
from plugin_task_type import TASK_TYPE, WordCountSettings, WordCountTask
from pydantic import ValidationError

from mergekit_sae import plugins
from mergekit_sae.errors import PluginError, TaskDataError
from mergekit_sae.evaluate import TaskSpec, TaskType, load_task, register_task_type, registry
from mergekit_sae.evaluate.registry import task_type, task_types
from mergekit_sae.plugins import TASK_TYPES as ENTRY_POINT_GROUP

TESTS = Path(__file__).parent
DISTRIBUTION = "wc-tasks 0.1"
OWN = r"its own options are \['unit', 'tolerance'\]"
ITEMS = [
    {"prompt": "one two three", "count": 3},  # 3 words, 11 letters
    {"prompt": "one two", "count": 3},  # 2 words, 6 letters
    {"prompt": "ab c", "count": 3},  # 2 words, 3 letters
]


def write_distribution(site: Path, entry_points: str) -> Path:
    """A distribution `wc-tasks` 0.1 declaring the given entry-point lines, under site."""
    info = site / "wc_tasks-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wc-tasks\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n")
    return site


@pytest.fixture
def install(tmp_path, monkeypatch):
    """Put a distribution with the given entry points on sys.path, plug-ins not loaded yet."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_OWNERS", dict(registry._OWNERS))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    plugins.forget()

    def put(entry_points: str) -> Path:
        site = write_distribution(tmp_path / "site", entry_points)
        monkeypatch.syspath_prepend(str(site))
        return site

    yield put
    plugins.forget()  # the distribution leaves sys.path: read the entry points afresh


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_a_plugin_type_is_loaded_once_when_the_registry_is_first_read(install, monkeypatch):
    install("word_count = plugin_task_type:TASK_TYPE")
    calls, original = [], plugins.entry_points
    monkeypatch.setattr(plugins, "entry_points", lambda **kw: calls.append(kw) or original(**kw))
    assert "word_count" not in registry._REGISTRY  # nothing loaded before the first read
    assert task_type("word_count") is TASK_TYPE
    assert task_types()["word_count"] is TASK_TYPE
    assert calls == [{"group": "mergekit_sae.task_types"}]
    assert TASK_TYPE.options == ("unit", "tolerance")


def test_a_plugin_type_validates_its_own_options(install, tmp_path):
    install("word_count = plugin_task_type:TASK_TYPE")
    path = write_jsonl(tmp_path / "wc.jsonl", ITEMS)
    spec = TaskSpec(name="wc", type="word_count", test=path)
    assert spec.settings == WordCountSettings(unit="words", tolerance=0)
    assert spec.settings.model_fields_set == set()
    spec = TaskSpec(name="wc", type="word_count", test=path, unit="letters", tolerance=2)
    assert (spec.settings.unit, spec.settings.tolerance) == ("letters", 2)
    assert spec.model_dump(exclude_unset=True) == {
        "name": "wc",
        "type": "word_count",
        "test": path,
        "unit": "letters",
        "tolerance": 2,
    }
    with pytest.raises(
        ValidationError,
        match=r"task 'wc' \(word_count\): option\(s\) \['stop'\] do not apply to this type "
        rf"\(they are options of generate_exact_match, generate_text_match\); {OWN}",
    ):
        TaskSpec(name="wc", type="word_count", test=path, stop=["."])
    with pytest.raises(
        ValidationError,
        match=rf"tolerance\n  task 'wc' \(word_count\): Input should be greater than or equal "
        rf"to 0; {OWN}",
    ):
        TaskSpec(name="wc", type="word_count", test=path, tolerance=-1)
    with pytest.raises(ValidationError, match=r"\['unit'\] do not apply.*options of word_count\)"):
        TaskSpec(name="lm", type="lm_eval", unit="words")


def test_a_plugin_type_loads_and_scores_items(install, tmp_path):
    install("word_count = plugin_task_type:TASK_TYPE")
    path = write_jsonl(tmp_path / "wc.jsonl", ITEMS)
    words = load_task({"name": "wc", "type": "word_count", "test": path})
    assert isinstance(words, WordCountTask)
    assert words.score(None, None, words.items("test")) == [1.0, 0.0, 0.0]
    letters = load_task(
        {"name": "wc", "type": "word_count", "test": path, "unit": "letters", "tolerance": 3}
    )
    assert letters.score(None, None, letters.items("test")) == [0.0, 1.0, 1.0]
    negative = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "count": -1}])
    with pytest.raises(TaskDataError, match=r"n\.jsonl:1: 'count' must be >= 0"):
        load_task({"name": "wc", "type": "word_count", "test": negative}).items("test")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("word_count = no_such_module:TASK_TYPE", "failed to load: ModuleNotFoundError: No module"),
        ("word_count = plugin_task_type:MISSING", "failed to load: AttributeError"),
        ("word_count = plugin_task_type:NOT_A_TASK_TYPE", "names a dict, not a mergekit_sae"),
        ("counting = plugin_task_type:TASK_TYPE", "names task type 'word_count'; name the entry"),
    ],
)
def test_a_broken_plugin_names_its_entry_point_and_distribution(install, line, problem):
    install(line)
    where = f"entry point '{line}' (mergekit_sae.task_types) of {DISTRIBUTION}"
    with pytest.raises(PluginError, match=f"^{re.escape(where)} {problem}"):
        task_types()
    with pytest.raises(PluginError, match=problem):  # the next read fails the same way
        task_type("multiple_choice")


def test_a_broken_plugin_fails_spec_validation_with_its_message(install):
    install("word_count = no_such_module:TASK_TYPE")
    with pytest.raises(ValidationError, match="'word_count = no_such_module:TASK_TYPE'.*wc-tasks"):
        TaskSpec(name="mc", type="multiple_choice")


def test_a_name_registered_twice_names_both_owners(install):
    install("multiple_choice = plugin_task_type:CLASHING")
    with pytest.raises(
        PluginError,
        match=r"^task type 'multiple_choice' is already registered by "
        r"mergekit_sae\.evaluate\.multiple_choice; entry point 'multiple_choice = "
        rf"plugin_task_type:CLASHING' \(mergekit_sae\.task_types\) of {DISTRIBUTION} registers",
    ):
        task_types()


def test_a_plugin_name_registered_again_names_the_plugin_as_first_owner(install):
    install("word_count = plugin_task_type:TASK_TYPE")
    task_types()
    again = TaskType(name="word_count", task_class=WordCountTask)
    with pytest.raises(
        PluginError,
        match=r"'word_count' is already registered by entry point 'word_count = "
        rf"plugin_task_type:TASK_TYPE' \(mergekit_sae\.task_types\) of {DISTRIBUTION}; "
        r"plugin_task_type registers it again",
    ):
        register_task_type(again)
    assert register_task_type(TASK_TYPE) is TASK_TYPE  # the same object again is accepted


def test_evolve_runs_a_plugin_task_type_in_a_subprocess(tmp_path):
    site = write_distribution(tmp_path / "site", "word_count = plugin_task_type:TASK_TYPE")
    parents = [tiny_llama(tmp_path / f"p{seed}", seed) for seed in (1, 2)]
    recipe = {
        "models": [str(p) for p in parents],
        "tasks": [
            {
                "name": "counting",
                "type": "word_count",
                "train": str(write_jsonl(tmp_path / "train.jsonl", ITEMS)),
                "test": str(write_jsonl(tmp_path / "test.jsonl", ITEMS)),
                "unit": "letters",
                "tolerance": 3,
            }
        ],
        "steps": 1,
        "sae": {"archive_size": 2, "children_per_step": 1},
        "dtype": "float32",
        "device": "cpu",
    }
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    path = os.pathsep.join([str(site), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mergekit_sae.cli", "evolve", "recipe.yml", "OUT", "-q"]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    with (tmp_path / "OUT" / "pareto.csv").open() as f:
        rows = list(csv.DictReader(f))
    # letters within 3 of the count: items 2 and 3 (6 and 3 letters for 3), not item 1 (11)
    assert [float(row["counting"]) for row in rows] == [2 / 3] * len(rows)
    state = json.loads((tmp_path / "OUT" / ".work" / "state.json").read_text())
    (task,) = state["recipe"]["tasks"]
    assert (task["type"], task["unit"], task["tolerance"]) == ("word_count", "letters", 3)
