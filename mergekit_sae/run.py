"""A whole run: check the output folder, resolve the recipe's models and tasks, evolve, finish.

Everything that can fail on bad input (recipe fields, model paths, weight files, task files,
an output folder in use) is checked here before any merge or evaluation starts. A run holds
the lock of its output folder (:mod:`.driver.lock`) from before its inputs are resolved to its end.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergekit_sae.driver.checkpoint import (
    RunState,
    load_state,
    remove_temporaries,
    state_path,
    verified_state,
    work_dir,
)
from mergekit_sae.driver.context import RunContext
from mergekit_sae.driver.lock import claim_for_fresh_run, content, lock_folder
from mergekit_sae.driver.loop import evolve, is_complete
from mergekit_sae.errors import OutputFolderError
from mergekit_sae.evaluate import resolve_device
from mergekit_sae.evaluate.evaluator import Evaluator, build_evaluator, load_tasks
from mergekit_sae.evaluate.tasks import Task
from mergekit_sae.merging.stream import MergeInputError, check_compatible, model_dtype
from mergekit_sae.outputs.finish import finish
from mergekit_sae.outputs.tracking import open_tracker
from mergekit_sae.recipe.loading import resolve_model
from mergekit_sae.recipe.schema import Recipe, RecipeError
from mergekit_sae.weight_files import check_model_files

# Recipe fields a resumed run may change: they do not alter the steps already taken.
RESUMABLE_CHANGES = (
    "steps",
    "budget",
    "device",
    "eval_batch_size",
    "keep_population",
    "test_baselines",
    "tracking",
    "pareto_max",
    "select",
    "tolerance",
    "allow_pickle",
    "trust_remote_code",
)


@dataclass
class ResolvedInputs:
    """Local directories of the recipe's models, and the merge device and dtype."""

    models: list[Path]
    base: Path | None
    device: str
    dtype: str


def recipe_changes(old: dict, new: dict) -> list[str]:
    """Top-level recipe fields that differ between a checkpoint and the given recipe."""
    keys = sorted(set(old) | set(new))
    return [k for k in keys if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]


def prepare_output(out: Path, recipe: Recipe, *, resume: bool, force: bool) -> RunState | None:
    """Check OUT/ for the requested mode; return the checkpoint to continue from, if any.

    A fresh run needs an empty (or absent) folder; ``force`` first deletes a previous run's
    folder (one holding a checkpoint). ``resume`` continues the checkpoint, refusing a recipe
    that changed; with no checkpoint yet it starts afresh. A resumed checkpoint whose members'
    files do not verify gives way to the previous one (``checkpoint.verified_state``). The
    caller holds the folder's lock, whose file is not content.
    """
    used = bool(content(out))
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out} exists and is not a folder")
    if resume:
        state = load_state(out) if out.exists() else None
        if state is None:
            if used and not work_dir(out).is_dir():
                raise OutputFolderError(
                    f"{out} holds no evolve checkpoint ({state_path(out)} is missing); "
                    "choose an empty folder for a new run"
                )
            shutil.rmtree(work_dir(out), ignore_errors=True)
            return None
        changed = recipe_changes(state.recipe, recipe.digest_fields())
        if changed:
            raise OutputFolderError(
                f"the recipe differs from the one {out} was started with in: {', '.join(changed)}; "
                "resume with the original recipe, or start over with --force"
            )
        remove_temporaries(out)
        state = verified_state(out, state)
        state.recipe = recipe.digest_fields()
        return state
    claim_for_fresh_run(out, force=force, holds_run=work_dir(out).is_dir(), what="evolve run")
    return None


def resolve_inputs(recipe: Recipe, source: str) -> ResolvedInputs:
    """Local model directories (Hub ids fetched now), the merge device and the merge dtype."""
    models = [resolve_model(name, f"models[{i}]", source) for i, name in enumerate(recipe.models)]
    base = resolve_model(recipe.base_model, "base_model", source) if recipe.base_model else None
    fields = [f"models[{i}]" for i in range(len(models))] + (["base_model"] if base else [])
    for field, path in zip(fields, [*models, *([base] if base else [])], strict=True):
        try:
            check_model_files(path, allow_pickle=recipe.allow_pickle)
        except MergeInputError as error:
            raise MergeInputError(f"{source}: {field}: {error}", file=error.file) from None
    try:
        device, _ = resolve_device(recipe.device)
    except ValueError as error:
        raise RecipeError(f"{source}: device: {error}") from None
    try:
        check_compatible([*models, *([base] if base is not None else [])])
    except MergeInputError as error:
        raise RecipeError(f"{source}: models: {error}") from None
    dtype = recipe.dtype or model_dtype(models[0])
    return ResolvedInputs(models=models, base=base, device=str(device), dtype=dtype)


def recipe_evaluator(recipe: Recipe, inputs: ResolvedInputs, tasks: Sequence[Task]) -> Evaluator:
    """The resident evaluator a recipe asks for, over its first model's architecture."""
    return build_evaluator(
        inputs.models[0],
        tasks,
        device=inputs.device,
        dtype=recipe.eval_dtype,
        batch_size=recipe.eval_batch_size,
        trust_remote_code=recipe.trust_remote_code,
    )


def configure_torch(recipe: Recipe, device: str) -> None:
    """Thread count, and deterministic GPU kernels so that a resumed run repeats exactly."""
    import os

    import torch

    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def run(
    recipe: Recipe,
    out: Path,
    *,
    source: str = "recipe",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    make_evaluator: Callable[[Recipe, ResolvedInputs], Evaluator] | None = None,
    on_checkpoint: Callable[[RunState], None] | None = None,
) -> RunState:
    """Run or resume a search into ``out``; finish it when the last step is done.

    ``make_evaluator`` replaces the resident-model evaluator (tests inject a fake one).
    Raises OutputFolderError at once when another process holds ``out``'s lock.
    """
    with lock_folder(out):
        return _run_locked(
            recipe, out, source, resume, force, progress, stop_after, make_evaluator, on_checkpoint
        )


def _run_locked(
    recipe: Recipe,
    out: Path,
    source: str,
    resume: bool,
    force: bool,
    progress: bool,
    stop_after: int | None,
    make_evaluator: Callable[[Recipe, ResolvedInputs], Evaluator] | None,
    on_checkpoint: Callable[[RunState], None] | None,
) -> RunState:
    """:func:`run`, with ``out``'s lock held."""
    inputs = resolve_inputs(recipe, source)
    configure_torch(recipe, inputs.device)
    if make_evaluator is None:
        tasks = load_tasks(recipe.tasks, source)

        def make_evaluator(recipe: Recipe, inputs: ResolvedInputs) -> Evaluator:
            return recipe_evaluator(recipe, inputs, tasks)

    state = prepare_output(out, recipe, resume=resume, force=force)
    if state is not None and state.finished:
        return state
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(
        recipe=recipe,
        out=out,
        models=inputs.models,
        base=inputs.base,
        evaluator=make_evaluator(recipe, inputs),
        device=inputs.device,
        dtype=inputs.dtype,
        progress=progress,
        shard_size=recipe.shard_size,
    )
    ctx.tracker = open_tracker(recipe.tracking, out, recipe, state, source)
    try:
        state = evolve(ctx, state, stop_after=stop_after, on_checkpoint=on_checkpoint)
        if is_complete(recipe, state):
            state = finish(ctx, state)
    finally:
        if ctx.tracker:
            ctx.tracker.close()
    return state
