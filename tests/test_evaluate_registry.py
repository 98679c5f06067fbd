"""The task-type registry: built-in entries, a type registered from outside, import structure."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from pydantic import Field, ValidationError

import mergekit_sae.evaluate as evaluate
from mergekit_sae.errors import PluginError
from mergekit_sae.evaluate import (
    GenerateExactMatchTask,
    GenerateTextMatchTask,
    LmEvalTask,
    MultipleChoiceTask,
    Task,
    TaskDataError,
    TaskSettings,
    TaskSpec,
    TaskType,
    load_task,
    register_task_type,
    registry,
    task_type,
    task_types,
)

EVALUATE_DIR = Path(evaluate.__file__).parent
GENERAL_FIELDS = {"name", "type", "train", "test", "batch_size"}


def test_builtin_types_declare_their_options_keys_and_scorers():
    expected = {
        "generate_exact_match": (
            GenerateExactMatchTask,
            {"max_new_tokens", "stop", "extraction"},
            {"prompt", "answer"},
        ),
        "generate_text_match": (
            GenerateTextMatchTask,
            {"max_new_tokens", "stop", "answer_regex", "ignore_case", "ignore_punctuation"},
            {"prompt", "answer"},
        ),
        "multiple_choice": (
            MultipleChoiceTask,
            {"normalize", "target_delimiter"},
            {"prompt", "choices", "label"},
        ),
        "lm_eval": (
            LmEvalTask,
            {"lm_eval_task", "train_task", "num_fewshot", "limit", "apply_chat_template"}
            | {"include_path", "metric", "filter"},
            set(),
        ),
    }
    kinds = task_types()
    assert set(kinds) == set(expected)
    for name, (cls, options, keys) in expected.items():
        kind = task_type(name)
        assert (kind.task_class, set(kind.options), set(kind.item_keys)) == (cls, options, keys)
        assert kind.reads_jsonl is bool(keys)


def test_the_spec_holds_general_fields_and_each_types_options_are_its_settings_model():
    assert set(TaskSpec.model_fields) == GENERAL_FIELDS | {"settings"}
    for kind in task_types().values():
        assert kind.options == tuple(kind.settings_model.model_fields)
        assert issubclass(kind.settings_model, TaskSettings)
    options = {o for kind in task_types().values() for o in kind.options}
    assert not GENERAL_FIELDS & options


def test_unknown_type_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown task type 'mcq'; known types: generate_exact"):
        task_type("mcq")


class WordCountTask(Task):
    """A task of a type defined outside the package: 1.0 when the prompt has `words` words."""

    def score_details(self, model, tokenizer, items, *, batch_size=None):
        return [{"score": float(len(i["prompt"].split()) == i["words"])} for i in items]


class WordCountSettings(TaskSettings):
    """The one option of the `word_count` type."""

    max_new_tokens: int = Field(32, ge=1, description="unused by the scorer")


def word_count_problem(item):
    return "'words' must be >= 0" if item["words"] < 0 else None


@pytest.fixture
def word_count(monkeypatch):
    """Register a `word_count` type for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return register_task_type(
        TaskType(
            name="word_count",
            task_class=WordCountTask,
            settings_model=WordCountSettings,
            item_keys={"prompt": str, "words": int},
            check_item=word_count_problem,
        )
    )


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_a_registered_type_loads_validates_and_scores(word_count, tmp_path):
    items = [{"prompt": "a b c", "words": 3}, {"prompt": "a b", "words": 3}]
    spec = {"name": "wc", "type": "word_count", "test": write_jsonl(tmp_path / "w.jsonl", items)}
    task = load_task({**spec, "max_new_tokens": 4})
    assert isinstance(task, WordCountTask)
    assert task.score(None, None, task.items("test")) == [1.0, 0.0]
    assert task.generation_metrics([]) == {}
    with pytest.raises(ValidationError, match=r"\['stop'\] do not apply.*\['max_new_tokens'\]"):
        TaskSpec(**spec, stop=["."])
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a"}])
    with pytest.raises(TaskDataError, match=r"m\.jsonl:1: missing key 'words'"):
        load_task({**spec, "test": missing}).items("test")
    negative = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "words": -1}])
    with pytest.raises(TaskDataError, match=r"n\.jsonl:1: 'words' must be >= 0"):
        load_task({**spec, "test": negative}).items("test")


def test_registering_a_name_twice_is_an_error(word_count):
    register_task_type(word_count)  # the same entry again (a module imported twice) is fine
    with pytest.raises(ValueError, match="'word_count' is already registered"):
        register_task_type(TaskType(name="word_count", task_class=WordCountTask))


class OddSettings(TaskSettings):
    """Options of a type that shadows a general field."""

    batch_size: int = 4


def test_an_option_named_like_a_general_field_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_task_type(
        TaskType(name="odd", task_class=WordCountTask, settings_model=OddSettings, item_keys={})
    )
    with pytest.raises(ValidationError, match=r"declares \['batch_size'\], which are general"):
        TaskSpec(name="o", type="odd")


def test_a_settings_model_must_derive_from_task_settings(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(PluginError, match="'odd': settings_model must be a subclass"):
        register_task_type(TaskType(name="odd", task_class=WordCountTask, settings_model=dict))
    assert "odd" not in registry._REGISTRY


def evaluate_imports() -> dict[str, set[str]]:
    """For each module of mergekit_sae.evaluate, the package modules it imports (anywhere in it)."""
    modules = {p.stem for p in EVALUATE_DIR.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for module in modules:
        tree = ast.parse((EVALUATE_DIR / f"{module}.py").read_text())
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "mergekit_sae.evaluate":
                targets |= {a.name if a.name in modules else "__init__" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "mergekit_sae.evaluate."
            ):
                targets.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                targets |= {
                    a.name.split(".")[2]
                    for a in node.names
                    if a.name.startswith("mergekit_sae.evaluate.")
                }
        graph[module] = targets - {module}
    return graph


def test_evaluate_modules_import_each_other_without_cycles():
    graph = evaluate_imports()
    assert "lm_eval_task" not in graph["tasks"] and "tasks" in graph["lm_eval_task"]
    assert graph["registry"] == set()
    assert "padding" not in graph and "forward" in graph["generation"]
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [target])}"
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
