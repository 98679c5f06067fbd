"""Every assumption the run_merge guard makes, checked against the installed MergeKit."""

from __future__ import annotations

import inspect
import os
import shutil
import typing
from pathlib import Path

import mergekit.merge
import pydantic
import pytest
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from method_fixtures import build_tiny_llama

from mergekit_sae.errors import OutputMissingError
from mergekit_sae.merging.run_guard import (
    RUN_MERGE_ARGUMENTS,
    WALKED_PARAMETERS,
    guarded_run_merge,
    run_merge_atomic,
)
from mergekit_sae.methods import register_all

OPTIONS = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)


def submodels(annotation: object, container: str = ""):
    """(container path, pydantic model) pairs reachable inside a field annotation."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        yield container, annotation
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set):
        for arg in args:
            yield from submodels(arg, container + "[]")
    elif origin is dict:
        yield from submodels(args[1], container + "{}")
    else:
        for arg in args:
            yield from submodels(arg, container)


def parameter_paths(model: type[pydantic.BaseModel], prefix: str = "", seen=()) -> set[str]:
    """Every path from MergeConfiguration to a field named `parameters`, from its schema."""
    paths = set()
    for name, field in model.model_fields.items():
        if name == "parameters":
            paths.add(prefix + name)
        for container, sub in submodels(field.annotation):
            if sub not in seen:
                paths |= parameter_paths(sub, f"{prefix}{name}{container}.", (*seen, model))
    return paths


def test_the_guard_walks_every_parameters_block_mergekit_defines():
    assert parameter_paths(MergeConfiguration) == set(WALKED_PARAMETERS)


def test_run_merge_takes_the_arguments_the_guard_binds_by_name():
    original = inspect.unwrap(mergekit.merge.run_merge)
    names = list(inspect.signature(original).parameters)
    assert names[: len(RUN_MERGE_ARGUMENTS)] == list(RUN_MERGE_ARGUMENTS)
    assert {"options", "config_source"} <= set(names)


def test_a_changed_signature_fails_loudly():
    def run_merge(config, path, options):  # names the guard does not know
        raise AssertionError("not to be called")

    with pytest.raises(TypeError, match="has no merge_config, out_path"):
        guarded_run_merge(run_merge)


def test_other_methods_reach_run_merge_untouched():
    seen = []

    def run_merge(merge_config, out_path, options, config_source=None):
        seen.append((out_path, options))

    config = MergeConfiguration.model_validate(
        {"merge_method": "linear", "models": [{"model": "/m/a", "parameters": {"weight": 1}}]}
    )
    guarded_run_merge(run_merge)(config, "/somewhere/out", OPTIONS)
    assert seen == [("/somewhere/out", OPTIONS)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("hook_models")
    return [build_tiny_llama(root / "a", 1), build_tiny_llama(root / "b", 2)]


def recipe(models: list[Path], **shared) -> MergeConfiguration:
    register_all()
    return MergeConfiguration.model_validate(
        {
            "merge_method": "sae_evolve",
            "models": [{"model": str(m), "parameters": {"score": 0.5}} for m in models],
            "parameters": shared,
        }
    )


def test_mergekit_writes_only_inside_out_path(models, tmp_path):
    original = inspect.unwrap(mergekit.merge.run_merge)
    original(recipe(models), str(tmp_path / "out"), OPTIONS)
    assert os.listdir(tmp_path) == ["out"]
    assert "config.json" in os.listdir(tmp_path / "out")
    # the one branch that writes elsewhere (a sibling folder, then deletes out_path)
    source = inspect.getsource(original)
    assert "post_fill_parameters" in source and "shutil.rmtree(out_path)" in source


def test_an_output_moved_elsewhere_raises_instead_of_vanishing(tmp_path):
    def post_fill_like(merge_config, out_path, options, config_source=None):
        os.makedirs(out_path)
        shutil.copytree(out_path, Path(out_path).parent / f"base--{Path(out_path).name}")
        shutil.rmtree(out_path)

    config = MergeConfiguration.model_validate(
        {"merge_method": "linear", "models": [{"model": "/m/a", "parameters": {"weight": 1}}]}
    )
    with pytest.raises(OutputMissingError, match="base--out"):
        run_merge_atomic(post_fill_like, config, str(tmp_path / "out"), OPTIONS)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("shared", "per_model"),
    [({"sparsity_scope": "layer"}, {}), ({}, {"density": 1.5}), ({}, {"score": -1.0})],
)
def test_mergekit_itself_enforces_the_kernel_domains(models, tmp_path, shared, per_model):
    config = recipe(models, **shared)
    config.models[0].parameters.update(per_model)
    original = inspect.unwrap(mergekit.merge.run_merge)  # no guard: MergeKit's own validation
    with pytest.raises(pydantic.ValidationError):
        original(config, str(tmp_path / "out"), OPTIONS)
