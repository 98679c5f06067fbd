"""Each built-in task type's own settings: defaults, constraints, the flat recipe form, errors.

Expectations are written out here (defaults, option lists, messages), not read from the models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evolve_fixtures import recipe_data, task_files
from pydantic import ValidationError

from mergekit_sae.driver.ray_executor import worker_recipe
from mergekit_sae.errors import RecipeError
from mergekit_sae.evaluate import (
    ExactMatchSettings,
    GenerationSettings,
    LmEvalSettings,
    MultipleChoiceSettings,
    TaskSpec,
    TextMatchSettings,
)
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.recipe.schema import EvolveTask

GENERAL = ["name", "type", "train", "test", "batch_size"]
OWN = {
    "generate_exact_match": ["max_new_tokens", "stop", "extraction"],
    "generate_text_match": [
        "max_new_tokens",
        "stop",
        "answer_regex",
        "ignore_case",
        "ignore_punctuation",
    ],
    "multiple_choice": ["normalize", "target_delimiter"],
    "lm_eval": [
        "lm_eval_task",
        "train_task",
        "num_fewshot",
        "limit",
        "apply_chat_template",
        "include_path",
        "metric",
        "filter",
    ],
}
DEFAULTS = {
    "generate_exact_match": {
        "max_new_tokens": 32,
        "stop": ["\n"],
        "extraction": "strict_or_flexible",
    },
    "generate_text_match": {
        "max_new_tokens": 32,
        "stop": ["\n"],
        "answer_regex": None,
        "ignore_case": False,
        "ignore_punctuation": False,
    },
    "multiple_choice": {"normalize": "none", "target_delimiter": " "},
    "lm_eval": {
        "lm_eval_task": None,
        "train_task": None,
        "num_fewshot": None,
        "limit": None,
        "apply_chat_template": False,
        "include_path": [],
        "metric": None,
        "filter": None,
    },
}
SETTINGS = {
    "generate_exact_match": ExactMatchSettings,
    "generate_text_match": TextMatchSettings,
    "multiple_choice": MultipleChoiceSettings,
    "lm_eval": LmEvalSettings,
}


@pytest.fixture
def items(tmp_path) -> Path:
    """A JSONL file (its items are not read by validation)."""
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"prompt": "Q:", "answer": "1"}) + "\n")
    return path


def spec_data(kind: str, items: Path, **options) -> dict:
    """A minimal task of a type: JSONL types get a test file, lm_eval none."""
    files = {} if kind == "lm_eval" else {"test": items}
    return {"name": "t", "type": kind, **files, **options}


def only_error(error: ValidationError) -> dict:
    """The single problem of a ValidationError."""
    (problem,) = error.errors()
    return problem


@pytest.mark.parametrize("kind", sorted(DEFAULTS))
def test_each_type_has_its_settings_model_with_its_defaults(kind, items):
    spec = TaskSpec(**spec_data(kind, items))
    assert type(spec.settings) is SETTINGS[kind]
    assert spec.settings.model_dump() == DEFAULTS[kind]
    assert list(type(spec.settings).model_fields) == OWN[kind]
    assert all(field.description for field in type(spec.settings).model_fields.values())


def test_generation_options_are_declared_once_for_both_generation_types():
    assert issubclass(ExactMatchSettings, GenerationSettings)
    assert issubclass(TextMatchSettings, GenerationSettings)
    assert list(GenerationSettings.model_fields) == ["max_new_tokens", "stop"]


@pytest.mark.parametrize(
    ("kind", "option", "value", "message"),
    [
        ("generate_exact_match", "max_new_tokens", 0, "Input should be greater than or equal to 1"),
        ("generate_exact_match", "stop", ["\n", ""], "stop strings must not be empty"),
        (
            "generate_exact_match",
            "extraction",
            "loose",
            "Input should be 'strict', 'flexible' or 'strict_or_flexible'",
        ),
        ("generate_text_match", "answer_regex", "(", "answer_regex '(' is not a valid regular"),
        ("generate_text_match", "ignore_case", "maybe", "Input should be a valid boolean"),
        ("multiple_choice", "normalize", "words", "Input should be 'none', 'tokens' or 'chars'"),
        ("lm_eval", "num_fewshot", -1, "Input should be greater than or equal to 0"),
        ("lm_eval", "limit", 0, "Input should be greater than 0"),
    ],
)
def test_a_bad_value_names_task_type_option_and_own_options(kind, option, value, message, items):
    with pytest.raises(ValidationError) as caught:
        TaskSpec(**spec_data(kind, items, **{option: value}))
    problem = only_error(caught.value)
    assert problem["loc"] == (option,)
    assert problem["msg"].startswith(f"task 't' ({kind}): {message}")
    assert problem["msg"].endswith(f"; its own options are {OWN[kind]}")


def test_include_path_resolves_against_the_recipe_folder_and_must_be_a_folder(tmp_path):
    (tmp_path / "yaml").mkdir()
    data = {"name": "t", "type": "lm_eval", "include_path": ["yaml"]}
    spec = TaskSpec.model_validate(data, context={"base_dir": tmp_path})
    assert spec.settings.include_path == [tmp_path / "yaml"]
    with pytest.raises(ValidationError) as caught:
        TaskSpec.model_validate({**data, "include_path": ["nope"]}, context={"base_dir": tmp_path})
    problem = only_error(caught.value)
    assert problem["loc"] == ("include_path",)
    assert problem["msg"].startswith(f"task 't' (lm_eval): include_path {tmp_path / 'nope'} is not")


def test_an_option_of_another_type_names_the_types_that_own_it(items):
    with pytest.raises(ValidationError) as caught:
        TaskSpec(**spec_data("multiple_choice", items, max_new_tokens=5))
    problem = only_error(caught.value)
    assert problem["loc"] == ()
    assert problem["msg"] == (
        "task 't' (multiple_choice): option(s) ['max_new_tokens'] do not apply to this type "
        "(they are options of generate_exact_match, generate_text_match); "
        "its own options are ['normalize', 'target_delimiter']"
    )


def test_an_unknown_option_lists_the_types_options_and_the_general_fields(items):
    with pytest.raises(ValidationError) as caught:
        TaskSpec(**spec_data("multiple_choice", items, tset="x.jsonl"))
    assert only_error(caught.value)["msg"] == (
        "task 't' (multiple_choice): unknown option(s) ['tset']; its own options are "
        f"['normalize', 'target_delimiter'], and every task takes {GENERAL}"
    )
    with pytest.raises(ValidationError) as caught:
        EvolveTask(**spec_data("multiple_choice", items, settings={"normalize": "chars"}))
    evolve_general = GENERAL + ["subsample", "test_subsample", "weight"]
    assert only_error(caught.value)["msg"].endswith(f"every task takes {evolve_general}")


def test_every_problem_of_a_task_is_reported_at_once(items):
    with pytest.raises(ValidationError) as caught:
        TaskSpec(**spec_data("generate_text_match", items, normalize="chars", x=1, ignore_case=2))
    assert [(p["loc"], p["msg"].split(";")[0]) for p in caught.value.errors()] == [
        (
            (),
            "task 't' (generate_text_match): option(s) ['normalize'] do not apply to this type "
            "(they are options of multiple_choice)",
        ),
        ((), "task 't' (generate_text_match): unknown option(s) ['x']"),
        (
            ("ignore_case",),
            "task 't' (generate_text_match): Input should be a valid boolean, unable to "
            "interpret input",
        ),
    ]


def test_an_unknown_type_is_the_only_error_and_lists_the_known_types(items):
    with pytest.raises(ValidationError) as caught:
        TaskSpec(name="t", type="mcq", test=items, max_new_tokens=3)
    problem = only_error(caught.value)
    assert problem["loc"] == ("type",)
    assert "unknown task type 'mcq'; known types: generate_exact_match" in problem["msg"]


def test_specs_and_their_settings_are_frozen(items):
    spec = TaskSpec(**spec_data("multiple_choice", items))
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "u"
    with pytest.raises(ValidationError, match="frozen"):
        spec.settings.normalize = "chars"


def test_a_task_serialises_flat_as_the_recipe_writes_it(items):
    spec = EvolveTask(**spec_data("generate_exact_match", items, max_new_tokens=24, weight=2))
    assert spec.model_dump(mode="json", exclude_unset=True) == {
        "name": "t",
        "type": "generate_exact_match",
        "test": str(items),
        "weight": 2.0,
        "max_new_tokens": 24,
    }
    whole = spec.model_dump(mode="json")
    assert list(whole) == GENERAL + ["subsample", "test_subsample", "weight"] + OWN[spec.type]
    assert EvolveTask.model_validate(whole) == spec


def test_the_ray_workers_recipe_validates_again_to_the_same_recipe(tmp_path):
    data = recipe_data(["p1", "p2"], task_files(tmp_path / "data"))
    data["tasks"][1] |= {"stop": ["\n", "."], "extraction": "strict"}
    recipe = parse_recipe(data)
    shipped = worker_recipe(recipe)
    assert shipped["tasks"] == data["tasks"]  # as written: flat, only the options given
    assert set(shipped["tasks"][1]) == {"name", "type", "train", "test", "subsample"} | {
        "max_new_tokens",
        "stop",
        "extraction",
    }
    assert parse_recipe(shipped) == recipe


def test_a_recipe_error_names_the_task_field_type_and_options(tmp_path):
    data = recipe_data(["p1", "p2"], task_files(tmp_path / "data"))
    data["tasks"][1]["max_new_tokens"] = 0
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data, "r.yml")
    assert str(caught.value) == (
        "r.yml: tasks[1].max_new_tokens: task 'sums' (generate_exact_match): Input should be "
        "greater than or equal to 1; its own options are ['max_new_tokens', 'stop', 'extraction']"
    )
