"""Run a comparison: every planned run in its own folder, resumable, then the result files.

Layout of OUT/::

    OUT/compare.json              the plan (methods, seeds, budget, sweeps, command)
    OUT/<method>/seed<k>/         one run with its usual outputs (model, recipe, history...)
    OUT/<method>/seed<k>/wall.json  wall seconds of the attempts that ran it
    OUT/results.csv, results.md, progress.png

A finished run is never redone; an unfinished one continues from its checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from mergekit_sae.atomic import write_text
from mergekit_sae.compare.plan import RunSpec, plan_runs, run_recipe_data
from mergekit_sae.compare.results import Row, mean_curve, run_row, write_results
from mergekit_sae.driver.checkpoint import RunState, load_state
from mergekit_sae.driver.lock import claim_for_fresh_run, lock_folder
from mergekit_sae.errors import OutputFolderError, RecipeError
from mergekit_sae.outputs.tracking import comparison_tracking
from mergekit_sae.recipe.loading import load_recipe, parse_recipe
from mergekit_sae.run import run
from mergekit_sae.search.sae import SaeSearch

PLAN_FILE = "compare.json"
WALL_FILE = "wall.json"


@dataclass
class Comparison:
    """What to compare: the recipe file, methods, seeds, budget (None: SAE's), sweeps."""

    recipe: Path
    methods: list[str]
    seeds: int = 3
    budget: int | None = None
    sweeps: list[tuple[str, list[Any]]] = field(default_factory=list)
    command: str = ""
    tensorboard: str | None = None  # as the recipe's tracking.tensorboard
    wandb_project: str | None = None  # as the recipe's tracking.wandb.project


def with_tracking_options(base: dict[str, Any], comparison: Comparison) -> dict[str, Any]:
    """The recipe data with the command line's tracking options applied."""
    tracking = dict(base.get("tracking") or {})
    if comparison.tensorboard is not None:
        tracking["tensorboard"] = comparison.tensorboard
    if comparison.wandb_project is not None:
        tracking["wandb"] = {**(tracking.get("wandb") or {}), "project": comparison.wandb_project}
    return {**base, "tracking": tracking} if tracking else base


def default_budget(recipe_path: Path) -> int:
    """The evaluations the recipe's SAE run uses."""
    recipe = load_recipe(recipe_path)
    budget = SaeSearch.natural_budget(recipe, recipe.settings_for("sae"))
    assert budget is not None
    return budget


def prepare(out: Path, plan: dict[str, Any], *, resume: bool, force: bool) -> None:
    """Check OUT/ for a fresh or resumed comparison and record the plan.

    A resume may add methods and sweeps (their runs are made, the finished ones kept).
    """
    marker = out / PLAN_FILE
    if resume and marker.is_file():
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        changed = [k for k in ("seeds", "budget") if recorded.get(k) != plan[k]]
        changed += [
            k for k in ("methods", "sweeps") if any(v not in plan[k] for v in recorded.get(k, []))
        ]
        if changed:
            raise OutputFolderError(
                f"{out} holds a comparison with other {', '.join(changed)} (a resume may add "
                "methods and sweeps, not drop them or change seeds or budget); resume with the "
                "same options, or start over with --force"
            )
        write_text(marker, json.dumps(plan, indent=1))
        return
    if not resume:
        claim_for_fresh_run(out, force=force, holds_run=marker.is_file(), what="comparison")
    out.mkdir(parents=True, exist_ok=True)
    write_text(marker, json.dumps(plan, indent=1))


def run_one(
    spec: RunSpec,
    base: dict[str, Any],
    budget: int,
    folder: Path,
    source: str,
    progress: bool,
    make_evaluator: Callable | None,
    group: str = "compare",
) -> tuple[RunState, float]:
    """Run (or continue, or just read) one planned run; return its state and wall seconds.

    A tracked run logs as ``<method>/seed<k>`` in W&B group ``group`` (TensorBoard: under
    the recipe's log directory in ``<method>/seed<k>``), so the runs overlay.
    """
    wall_path = folder / WALL_FILE
    wall = json.loads(wall_path.read_text())["seconds"] if wall_path.is_file() else 0.0
    state = load_state(folder) if folder.is_dir() else None
    if state is not None and state.finished:
        return state, wall
    data = comparison_tracking(run_recipe_data(base, spec, budget), spec.folder, group)
    recipe = parse_recipe(data, f"{source} [{spec.method}]")
    start = time.perf_counter()
    state = run(
        recipe, folder, source=source, resume=True, progress=progress, make_evaluator=make_evaluator
    )
    wall += time.perf_counter() - start
    write_text(wall_path, json.dumps({"seconds": wall}))
    return state, wall


def compare(
    comparison: Comparison,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    make_evaluator: Callable | None = None,
) -> list[Row]:
    """Run every planned run into OUT/ and write the result files; return the rows."""
    source = str(comparison.recipe)
    recipe = load_recipe(comparison.recipe)
    base = with_tracking_options(
        yaml.safe_load(comparison.recipe.read_text(encoding="utf-8")), comparison
    )
    budget = comparison.budget or default_budget(comparison.recipe)
    runs = plan_runs(comparison.methods, comparison.seeds, comparison.sweeps)
    for spec in runs:  # every recipe validates before any work starts
        try:
            parse_recipe(run_recipe_data(base, spec, budget), f"{source} [{spec.method}]")
        except RecipeError as error:
            raise RecipeError(f"{error} (in the run of {spec.method})") from None
    plan = {
        "methods": comparison.methods,
        "seeds": comparison.seeds,
        "budget": budget,
        "sweeps": [[path, values] for path, values in comparison.sweeps],
        "command": comparison.command,
    }
    with lock_folder(out, "comparison"):  # each run also locks its own folder
        prepare(out, plan, resume=resume, force=force)
        rows, states = [], {}
        for spec in tqdm(runs, desc="compare", unit="run", disable=not progress):
            state, wall = run_one(
                spec,
                base,
                budget,
                out / spec.folder,
                source,
                progress,
                make_evaluator,
                group=out.resolve().name,
            )
            rows.append(run_row(spec.method, spec.seed, state, wall))
            states.setdefault(spec.method, []).append(state)
        curves = {m: mean_curve(s) for m, s in states.items() if any(x.history for x in s)}
        curves = {m: c for m, c in curves.items() if len(c) > 1}
        tasks = [task.name for task in recipe.tasks]
        write_results(out, rows, tasks, comparison.command, budget, curves)
    return rows
