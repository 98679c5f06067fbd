"""Choose SAE's defaults on training data only: variants x seeds, scored on held-out train items.

Each variant is the recipe with some fields overridden (dotted paths, as ``compare --sweep``);
each run's answer is then scored on *validation* items: items of each task's train split that
the run never saw (not in any draw it scored on), a fixed seeded sample of them. The test split
is not read. Results go to a JSON file, one entry per (variant, seed); a rerun skips what is
there (resumable), and prints a table: validation mean, per task, zeros, training mean.

    python benchmarks/sae_defaults.py recipes/evolve_testbed.yml runs/sae_defaults \
        --variant base --variant "slerp:sae.crossover=slerp" --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from mergekit_sae.atomic import write_text
from mergekit_sae.compare.plan import set_field
from mergekit_sae.driver.context import build_search, derive_seed
from mergekit_sae.evaluate import subsample
from mergekit_sae.evaluate.evaluator import load_tasks
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import recipe_evaluator, resolve_inputs, run

VALIDATION_SEED = 20261207


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:field=value;field=value`` (``base``: no override)."""
    name, _, rest = text.partition(":")
    overrides = {}
    for part in filter(None, rest.split(";")):
        field, _, value = part.partition("=")
        overrides[field.strip()] = yaml.safe_load(value)
    return name, overrides


def seen_items(recipe: Any, evaluator: Any, draws: set[int]) -> dict[str, set[str]]:
    """The training items a run scored on (every draw it used), as JSON lines per task."""
    seen: dict[str, set[str]] = {}
    for task in recipe.tasks:
        items = evaluator.items(task.name, "train")
        seen[task.name] = {
            json.dumps(item, sort_keys=True)
            for draw in draws
            for item in subsample(items, task.subsample, derive_seed(recipe.seed, draw, task.name))
        }
    return seen


def validation_items(recipe: Any, evaluator: Any, draws: set[int], size: int) -> dict[str, list]:
    """A seeded sample of each task's train items that no draw of the run contains."""
    seen = seen_items(recipe, evaluator, draws)
    result = {}
    for task in recipe.tasks:
        unseen = [
            item
            for item in evaluator.items(task.name, "train")
            if json.dumps(item, sort_keys=True) not in seen[task.name]
        ]
        result[task.name] = subsample(unseen, size, VALIDATION_SEED)
    return result


def run_variant(base: dict, overrides: dict, seed: int, folder: Path, size: int) -> dict:
    """Run one variant at one seed, score its answer on validation items."""
    data = json.loads(json.dumps(base))
    for path, value in overrides.items():
        set_field(data, path, value)
    data.update(seed=seed, test_baselines=[], keep_population=False)
    recipe = parse_recipe(data, "variant")
    start = time.perf_counter()
    state = run(recipe, folder, resume=True, progress=False)
    seconds = time.perf_counter() - start
    inputs = resolve_inputs(recipe, "variant")
    evaluator = recipe_evaluator(recipe, inputs, load_tasks(recipe.tasks, "variant"))
    draws = {search_draw(recipe, step) for step in range(1, state.step + 1)}
    items = validation_items(recipe, evaluator, draws, size)
    evaluator.load(folder)
    scores = evaluator.score(items)
    best = state.members[state.best]  # the member written out (select included)
    return {
        "validation": scores,
        "validation_mean": statistics.fmean(scores.values()),
        "train_mean": best.performance,
        "zeros": best.zero_fraction,
        "evaluations": state.evaluations,
        "seconds": round(seconds, 1),
    }


def search_draw(recipe: Any, step: int) -> int:
    """The item draw a step of the recipe's search used."""
    return build_search(recipe).items_draw(step)


def table(results: dict[str, dict[str, dict]]) -> str:
    """Mean ± std over seeds per variant, best validation mean first."""
    lines = ["| variant | validation mean | per task | zeros % | train mean | seeds |"]
    lines.append("|---|---|---|---|---|---|")
    rows = []
    for name, seeds in results.items():
        values = list(seeds.values())
        means = [100 * v["validation_mean"] for v in values]
        tasks = sorted(values[0]["validation"])
        per_task = " / ".join(
            f"{100 * statistics.fmean(v['validation'][t] for v in values):.1f}" for t in tasks
        )
        spread = statistics.stdev(means) if len(means) > 1 else 0.0
        zeros = 100 * statistics.fmean(v["zeros"] for v in values)
        train = 100 * statistics.fmean(v["train_mean"] for v in values)
        rows.append((statistics.fmean(means), name, spread, per_task, zeros, train, len(values)))
    for mean, name, spread, per_task, zeros, train, count in sorted(rows, reverse=True):
        lines.append(
            f"| {name} | {mean:.1f} ± {spread:.1f} | {per_task} | {zeros:.1f} | {train:.1f} "
            f"| {count} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", action="append", default=[], help="name:field=value;...")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="validation items per task")
    args = parser.parse_args()
    base = yaml.safe_load(args.recipe.read_text())
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for text in args.variant or ["base"]:
        name, overrides = parse_variant(text)
        for seed in range(args.seeds):
            if str(seed) in results.get(name, {}):
                continue
            folder = args.out / name.replace("/", "_") / f"seed{seed}"
            entry = run_variant(base, overrides, seed, folder, args.size)
            entry["overrides"] = overrides
            results.setdefault(name, {})[str(seed)] = entry
            args.out.mkdir(parents=True, exist_ok=True)
            write_text(results_file, json.dumps(results, indent=1))
            print(name, seed, f"{100 * entry['validation_mean']:.1f}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
