"""Recipe checks and atomic output for MergeKit runs that use this package's methods.

MergeKit ignores unknown recipe parameters and writes into the output directory as it goes, so
a failed run leaves a partial model behind. For recipes whose `merge_method` is one of ours,
`guard_module` makes `mergekit.merge.run_merge` reject unknown, misplaced or out-of-domain
parameters first (naming where in the recipe) and write through `mergekit_sae.atomic.atomic_dir`
(a staging folder swapped into place on success). What the guard assumes of MergeKit (the
`run_merge` argument names, the recipe fields that hold `parameters`, that the output is the
folder at `out_path`) is checked against the installed MergeKit by tests/test_method_hook.py;
a folder missing after `run_merge` raises instead of passing silently.

The guard also verifies the weight files of every local model the recipe names
(`mergekit_sae.weight_files`: truncated or corrupt safetensors fail naming the file) and
refuses pickle weights unless `MERGEKIT_SAE_ALLOW_PICKLE=1`; in a MergeKit command these
errors print as one `error: ...` line (`install_error_hook`), not a traceback.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.merge_methods import MergeMethodSpec, ParameterScope, get

from mergekit_sae.atomic import atomic_dir
from mergekit_sae.domains import domain_problem
from mergekit_sae.errors import MergekitSaeError, RecipeError
from mergekit_sae.methods import METHOD_NAMES
from mergekit_sae.weight_files import check_model_files, pickle_allowed_by_env

_GUARD_FLAG = "_mergekit_sae_guarded"
# run_merge's arguments the guard reads (by name) and replaces (out_path)
RUN_MERGE_ARGUMENTS = ("merge_config", "out_path")
# where a MergeConfiguration holds `parameters` blocks; [] a list, {} a mapping (kept in step
# with the installed MergeKit by a test)
WALKED_PARAMETERS = (
    "parameters",
    "models[].parameters",
    "slices[].parameters",
    "slices[].sources[].parameters",
    "modules{}.parameters",
    "modules{}.models[].parameters",
    "modules{}.slices[].parameters",
    "modules{}.slices[].sources[].parameters",
)


Block = tuple[str, bool, Mapping]  # (where in the recipe, is per-model, parameters)


def _model_blocks(models: list | None, prefix: str) -> Iterator[Block]:
    """Per-model parameter blocks of a `models:` list."""
    for index, model in enumerate(models or []):
        yield f"{prefix}models[{index}] ({model.model})", True, model.parameters or {}


def _slice_blocks(slices: list | None, prefix: str) -> Iterator[Block]:
    """Slice-level and per-source parameter blocks of a `slices:` list."""
    for index, out_slice in enumerate(slices or []):
        where = f"{prefix}slices[{index}]"
        yield f"{where}.parameters", False, out_slice.parameters or {}
        for s_index, source in enumerate(out_slice.sources):
            yield f"{where}.sources[{s_index}] ({source.model})", True, source.parameters or {}


def _parameter_blocks(config: MergeConfiguration) -> Iterator[Block]:
    """Every parameters block of a recipe, top level first."""
    yield "parameters", False, config.parameters or {}
    yield from _model_blocks(config.models, "")
    yield from _slice_blocks(config.slices, "")
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}.parameters", False, module.parameters or {}
        yield from _model_blocks(module.models, f"modules.{name}.")
        yield from _slice_blocks(module.slices, f"modules.{name}.")


def _ignored_base_parameters(config: MergeConfiguration, spec: MergeMethodSpec) -> list[str]:
    """Per-model values given to the base model, which these methods never mix."""
    non_base = {p.name for p in spec.input_parameters if p.scope == ParameterScope.NON_BASE}
    problems = []
    for index, model in enumerate(config.models or []):
        ignored = sorted(set(model.parameters or {}) & non_base)
        if ignored and config.base_model is not None and model.model == config.base_model:
            problems.append(
                f"models[{index}] ({model.model}): this is the base_model, which "
                f"{spec.name} does not mix; its {', '.join(ignored)} would be ignored"
            )
    return problems


def _setting_values(setting: Any) -> Iterator[Any]:
    """The plain values a setting can resolve to: itself, a gradient's points, each filter's."""
    if isinstance(setting, ConditionalParameter):
        yield from _setting_values(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _setting_values(item)
    elif setting is not None:
        yield setting


def _block_problems(
    location: str, is_per_model: bool, parameters: Mapping, spec: MergeMethodSpec
) -> list[str]:
    """What is wrong in one parameters block: unknown, misplaced or out-of-domain values."""
    shared = {p.name: p for p in spec.shared_parameters}
    per_model = {p.name: p for p in spec.input_parameters}
    problems = []
    for name, setting in parameters.items():
        if is_per_model and name in shared:
            problems.append(
                f"{location}: `{name}` is shared by all models; set it in a `parameters` "
                "block outside the model list"
            )
        elif name not in shared | per_model:
            close = difflib.get_close_matches(name, sorted(shared | per_model), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append(f"{location}: unknown parameter `{name}`{hint}")
        else:
            domain = (shared | per_model)[name].value_type
            found = (domain_problem(domain, value, name) for value in _setting_values(setting))
            problems += [f"{location}: {problem}" for problem in found if problem]
    return problems


def check_recipe_parameters(config: MergeConfiguration) -> None:
    """Raise RecipeError for parameters the recipe's method does not know, would ignore there,
    or that lie outside the domain its kernel declares."""
    spec = get(config.merge_method).spec
    shared = {p.name for p in spec.shared_parameters}
    per_model = {p.name for p in spec.input_parameters}
    problems = []
    for location, is_per_model, parameters in _parameter_blocks(config):
        problems += _block_problems(location, is_per_model, parameters, spec)
    problems += _ignored_base_parameters(config, spec)
    if problems:
        known = ", ".join(sorted(shared | per_model))
        raise RecipeError(
            f"recipe parameters rejected by {config.merge_method} (known: {known}):\n  "
            + "\n  ".join(problems)
        )


def check_local_models(config: MergeConfiguration) -> None:
    """Verify the weight files of every local model folder the recipe names.

    Hub ids (and models that are not folders yet) are left to MergeKit. Pickle weights are
    refused unless the environment allows them (``MERGEKIT_SAE_ALLOW_PICKLE=1``).
    """
    allow = pickle_allowed_by_env()
    for reference in sorted(config.referenced_models(), key=str):
        path = reference.model.path
        if reference.model.revision is None and os.path.isdir(path):
            check_model_files(path, allow_pickle=allow)


def run_merge_atomic(
    run_merge: Callable[..., Any], merge_config: MergeConfiguration, out_path: str, *args, **kwargs
) -> None:
    """Run MergeKit's ``run_merge`` into a staging folder swapped into ``out_path`` on success.

    Raises OutputMissingError when MergeKit leaves no folder at the path it was given (its
    ``post_fill_parameters`` branch writes a sibling folder and deletes that path).
    """
    run_merge = inspect.unwrap(run_merge)  # never stage twice through a guarded run_merge
    if merge_config.merge_method in METHOD_NAMES:
        check_recipe_parameters(merge_config)
        check_local_models(merge_config)
    with atomic_dir(out_path, flush_while_writing=True) as staged:
        run_merge(merge_config, str(staged), *args, **kwargs)


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """Bind a run_merge call to MergeKit's signature (the names the guard relies on)."""
    bound = signature.bind(*args, **kwargs)
    missing = [name for name in RUN_MERGE_ARGUMENTS if name not in bound.arguments]
    if missing:
        raise TypeError(f"run_merge called without {', '.join(missing)}")
    return bound


def guarded_run_merge(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap run_merge: recipes using our methods are checked first and written atomically.

    Other recipes go to the original untouched. Raises TypeError now when the original's
    signature lacks the arguments the guard needs, so a MergeKit change fails loudly.
    """
    if getattr(original, _GUARD_FLAG, False):
        return original
    signature = inspect.signature(original)
    absent = [name for name in RUN_MERGE_ARGUMENTS if name not in signature.parameters]
    if absent:
        raise TypeError(f"mergekit.merge.run_merge{signature} has no {', '.join(absent)}")

    @functools.wraps(original)
    def run_merge(*args, **kwargs):
        bound = _bind(signature, args, kwargs)
        if bound.arguments["merge_config"].merge_method not in METHOD_NAMES:
            return original(*args, **kwargs)
        rest = {k: v for k, v in bound.arguments.items() if k not in RUN_MERGE_ARGUMENTS}
        config, out_path = (bound.arguments[name] for name in RUN_MERGE_ARGUMENTS)
        return run_merge_atomic(original, config, out_path, **rest)

    setattr(run_merge, _GUARD_FLAG, True)
    return run_merge


def error_hook(previous: Callable[..., Any]) -> Callable[..., Any]:
    """A ``sys.excepthook`` printing this package's errors as one line, others as before."""

    def hook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        if isinstance(error, MergekitSaeError):
            print(f"error: {error}", file=sys.stderr)
            return
        previous(kind, error, traceback)

    setattr(hook, _GUARD_FLAG, True)
    return hook


def install_error_hook() -> None:
    """Make an uncaught package error end a MergeKit command with one ``error:`` line."""
    if not getattr(sys.excepthook, _GUARD_FLAG, False):
        sys.excepthook = error_hook(sys.excepthook)


def guard_module(merge_module: Any) -> None:
    """Replace `run_merge` in the (just imported) mergekit.merge module by its guarded form."""
    merge_module.run_merge = guarded_run_merge(merge_module.run_merge)
    install_error_hook()
