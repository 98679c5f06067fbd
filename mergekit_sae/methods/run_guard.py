"""Recipe checks and atomic output for MergeKit runs that use this package's methods.

MergeKit ignores unknown recipe parameters and writes into the output directory as it goes, so
a failed run leaves a partial model behind. For recipes whose `merge_method` is one of ours,
`guard_module` makes `mergekit.merge.run_merge` reject unknown or misplaced parameters first
and write into a staging directory beside the output that is renamed into place on success.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mergekit.config import MergeConfiguration
from mergekit.merge_methods import MergeMethodSpec, ParameterScope, get

from mergekit_sae.methods import METHOD_NAMES

_GUARD_FLAG = "_mergekit_sae_guarded"


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


def check_recipe_parameters(config: MergeConfiguration) -> None:
    """Raise ValueError for parameters the recipe's method does not know or would ignore there."""
    spec = get(config.merge_method).spec
    shared = {p.name for p in spec.shared_parameters}
    per_model = {p.name for p in spec.input_parameters}
    problems = []
    for location, is_per_model, parameters in _parameter_blocks(config):
        for name in parameters:
            if is_per_model and name in shared:
                problems.append(
                    f"{location}: `{name}` is shared by all models; set it in a `parameters` "
                    "block outside the model list"
                )
            elif name not in shared | per_model:
                close = difflib.get_close_matches(name, sorted(shared | per_model), n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                problems.append(f"{location}: unknown parameter `{name}`{hint}")
    problems += _ignored_base_parameters(config, spec)
    if problems:
        known = ", ".join(sorted(shared | per_model))
        raise ValueError(
            f"recipe parameters not understood by {config.merge_method} (known: {known}):\n  "
            + "\n  ".join(problems)
        )


def _first_missing_ancestor(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet, if any."""
    missing = None
    while path and not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _publish(staged: str, out_path: str) -> None:
    """Move a finished staging directory to `out_path` (merging into an existing directory)."""
    if not os.path.exists(staged):
        return
    if not os.path.exists(out_path):
        os.rename(staged, out_path)
        return
    for entry in os.listdir(staged):
        destination = os.path.join(out_path, entry)
        if os.path.isdir(destination) and not os.path.islink(destination):
            shutil.rmtree(destination)
        os.replace(os.path.join(staged, entry), destination)


@contextlib.contextmanager
def atomic_output_dir(out_path: str | os.PathLike) -> Iterator[str]:
    """Yield a staging directory with the same basename; publish it on success, else remove it.

    Nothing appears at `out_path` (nor any parent directory created for it) when the body
    raises. An existing `out_path` directory receives the new files only after success.
    """
    out_path = os.path.abspath(os.fspath(out_path))
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise FileExistsError(f"output path {out_path} exists and is not a directory")
    parent = os.path.dirname(out_path)
    created = _first_missing_ancestor(parent)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(
        prefix=f".{os.path.basename(out_path)}.", suffix=".partial", dir=parent
    )
    try:
        yield os.path.join(staging, os.path.basename(out_path))
        _publish(os.path.join(staging, os.path.basename(out_path)), out_path)
    except BaseException:
        shutil.rmtree(created or staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def guarded_run_merge(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap run_merge: recipes using our methods are checked first and written atomically."""
    if getattr(original, _GUARD_FLAG, False):
        return original

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None, *args, **kwargs):
        if merge_config.merge_method not in METHOD_NAMES:
            return original(merge_config, out_path, options, config_source, *args, **kwargs)
        check_recipe_parameters(merge_config)
        with atomic_output_dir(out_path) as staged:
            return original(merge_config, staged, options, config_source, *args, **kwargs)

    setattr(run_merge, _GUARD_FLAG, True)
    return run_merge


def guard_module(merge_module: Any) -> None:
    """Replace `run_merge` in the (just imported) mergekit.merge module by its guarded form."""
    merge_module.run_merge = guarded_run_merge(merge_module.run_merge)
