"""Test accuracy on the testbed: the experts, static MergeKit merges and SAE, over several seeds.

For each seed: the two experts, linear 50/50, task arithmetic and TIES (MergeKit's methods,
with the testbed base) are merged with MergeKit's ``run_merge`` and scored on the seed's test
items with the same evaluator the search uses; SAE runs the evolve driver once with global and
once with local sparsity scope. Prints a table and writes ``benchmarks/results/quality.md`` and
``quality.json``.

    mergekit-sae testbed build            # once: writes ./testbed
    python benchmarks/bench_evolve_quality.py [--recipe recipes/evolve_testbed.yml]
        [--seeds 0 1 2] [--steps N] [--scopes global local]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

# Static merges of the two experts, as MergeKit configs ({a}, {b}: experts, {base}: base).
STATIC_MERGES: dict[str, dict[str, Any]] = {
    "linear 50/50": {
        "merge_method": "linear",
        "models": [
            {"model": "{a}", "parameters": {"weight": 0.5}},
            {"model": "{b}", "parameters": {"weight": 0.5}},
        ],
    },
    "task arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "{base}",
        "models": [
            {"model": "{a}", "parameters": {"weight": 1.0}},
            {"model": "{b}", "parameters": {"weight": 1.0}},
        ],
        "parameters": {"normalize": False},
    },
    "TIES": {
        "merge_method": "ties",
        "base_model": "{base}",
        "models": [
            {"model": "{a}", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "{b}", "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {"normalize": True},
    },
}


def fill(config: Any, paths: dict[str, str]) -> Any:
    """Replace ``{a}``, ``{b}``, ``{base}`` placeholders in a config with model paths."""
    if isinstance(config, dict):
        return {key: fill(value, paths) for key, value in config.items()}
    if isinstance(config, list):
        return [fill(value, paths) for value in config]
    return config.format(**paths) if isinstance(config, str) else config


def static_merge(config: dict[str, Any], out: Path, dtype: str) -> Path:
    """Run one static merge with MergeKit's ``run_merge`` into ``out``."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    merge_config = MergeConfiguration.model_validate({**config, "out_dtype": dtype})
    run_merge(merge_config, str(out), options=MergeOptions(copy_tokenizer=False))
    return out


def row(seed: int, label: str, kind: str, scores: dict[str, float], weights) -> dict[str, Any]:
    """One result row with the task-weighted mean."""
    total = sum(weights[t] for t in scores)
    mean = sum(weights[t] * s for t, s in scores.items()) / total
    return {"seed": seed, "model": label, "kind": kind, "scores": scores, "mean": mean}


def markdown(rows: list[dict[str, Any]], tasks: list[str], meta: dict[str, Any]) -> str:
    """The results as a Markdown report: per-seed table, then mean and spread over seeds."""
    lines = [
        "# Evolve quality on the testbed",
        "",
        f"Recipe `{meta['recipe']}`, seeds {meta['seeds']}, {meta['steps']} steps, "
        f"population {meta['population_size']}; test accuracy (%) on each seed's test items.",
        "",
        "| seed | model | " + " | ".join(tasks) + " | mean |",
        "|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for r in rows:
        cells = [f"{100 * r['scores'][t]:.1f}" for t in tasks] + [f"{100 * r['mean']:.1f}"]
        lines.append(f"| {r['seed']} | {r['model']} | " + " | ".join(cells) + " |")
    lines += ["", "| model | " + " | ".join(tasks) + " | mean | std of mean |"]
    lines.append("|---|" + "---|" * (len(tasks) + 2))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        cells = [f"{100 * statistics.fmean(r['scores'][t] for r in mine):.1f}" for t in tasks]
        means = [r["mean"] for r in mine]
        spread = statistics.pstdev(means) if len(means) > 1 else 0.0
        cells += [f"{100 * statistics.fmean(means):.1f}", f"{100 * spread:.1f}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", verdict(rows)]
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict[str, Any]]) -> str:
    """Whether each SAE variant's mean beats every static merge on every seed."""
    parts = []
    for sae in dict.fromkeys(r["model"] for r in rows if r["kind"] == "evolved"):
        wins = []
        for seed in dict.fromkeys(r["seed"] for r in rows):
            here = [r for r in rows if r["seed"] == seed]
            mine = next(r["mean"] for r in here if r["model"] == sae)
            best_static = max(r["mean"] for r in here if r["kind"] == "static")
            wins.append(mine > best_static)
        parts.append(f"{sae}: above every static merge on {sum(wins)}/{len(wins)} seeds")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/evolve_testbed.yml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scopes", nargs="+", default=["global", "local"])
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--base", default=None, help="base for task arithmetic/TIES")
    parser.add_argument("--work", type=Path, default=None, help="folder for runs and merges")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the result files (quality-TAG.*)")
    parser.add_argument(
        "--combine", type=Path, nargs="+", help="merge quality-*.json files into quality.md/json"
    )
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.results)

    from mergekit_sae.evolve.loop import RunContext, task_weights, test_items
    from mergekit_sae.evolve.recipe import load_recipe
    from mergekit_sae.evolve.runner import load_tasks, resident_evaluator, resolve_inputs, run

    recipe = load_recipe(args.recipe)
    if args.steps is not None:
        recipe = recipe.model_copy(update={"steps": args.steps})
    inputs = resolve_inputs(recipe, args.recipe)
    base = args.base or recipe.base_model or str(Path(inputs.models[0]).parent / "base")
    if len(inputs.models) != 2:
        print("the quality benchmark compares two experts", file=sys.stderr)
        return 2
    tasks = load_tasks(recipe, args.recipe)
    names = [t.name for t in recipe.tasks]
    weights = task_weights(recipe)
    evaluator = resident_evaluator(recipe, inputs, tasks)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-evolve-quality-"))
    paths = {"a": str(inputs.models[0]), "b": str(inputs.models[1]), "base": str(base)}

    started = time.perf_counter()
    static_dirs = {}
    for label, config in STATIC_MERGES.items():
        out = work / "static" / label.replace(" ", "_").replace("/", "-")
        static_dirs[label] = static_merge(fill(config, paths), out, inputs.dtype)

    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for seed in args.seeds:
        seeded = recipe.model_copy(update={"seed": seed, "test_baselines": []})
        ctx = RunContext(seeded, work, inputs.models, inputs.base, evaluator)
        items = test_items(ctx)
        for label, path in zip(recipe.models, inputs.models, strict=True):
            evaluator.load(Path(path))
            name = f"{Path(label).name} expert"
            rows.append(row(seed, name, "expert", evaluator.score(items), weights))
        for label, path in static_dirs.items():
            evaluator.load(path)
            rows.append(row(seed, label, "static", evaluator.score(items), weights))
        for scope in args.scopes:
            merge = seeded.merge.model_copy(update={"sparsity_scope": scope})
            variant = seeded.model_copy(update={"merge": merge})
            out = work / f"sae-{scope}-seed{seed}"
            start = time.perf_counter()
            state = run(variant, out, source=args.recipe, force=True, progress=False)
            seconds[f"sae-{scope}-seed{seed}"] = time.perf_counter() - start
            evolved = next(r for r in state.results if r.kind == "evolved")
            rows.append(row(seed, f"SAE ({scope})", "evolved", evolved.scores, weights))
        for r in rows[-(2 + len(static_dirs) + len(args.scopes)) :]:
            cells = "  ".join(f"{t} {100 * r['scores'][t]:5.1f}" for t in names)
            print(f"seed {seed}  {r['model']:<18} {cells}  mean {100 * r['mean']:5.1f}")

    meta = {
        "recipe": args.recipe,
        "seeds": args.seeds,
        "steps": recipe.steps,
        "population_size": recipe.population_size,
        "static_merges": {k: fill(v, paths) for k, v in STATIC_MERGES.items()},
        "evolve_seconds": seconds,
        "total_seconds": time.perf_counter() - started,
    }
    meta["tasks"] = names
    write_results(args.results, f"quality{'-' + args.tag if args.tag else ''}", meta, rows)
    return 0


def write_results(folder: Path, stem: str, meta: dict[str, Any], rows: list[dict]) -> None:
    """Print the Markdown report and write it with the JSON data as ``folder/stem.{md,json}``."""
    report = markdown(rows, meta["tasks"], meta)
    print()
    print(report)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(report)
    (folder / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


def combine(files: list[Path], folder: Path) -> int:
    """Merge the rows of partial runs (e.g. one per scope, run side by side) into one report."""
    parts = [json.loads(path.read_text()) for path in files]
    rows, seen = [], set()
    for part in parts:
        for r in part["rows"]:
            key = (r["seed"], r["model"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    order = {model: i for i, model in enumerate(dict.fromkeys(r["model"] for r in rows))}
    rows.sort(key=lambda r: (r["seed"], r["kind"] == "evolved", order[r["model"]]))
    meta = {k: v for k, v in parts[0].items() if k != "rows"}
    meta["seeds"] = sorted({r["seed"] for r in rows})
    meta["evolve_seconds"] = {k: v for p in parts for k, v in p["evolve_seconds"].items()}
    meta["total_seconds"] = max(p["total_seconds"] for p in parts)
    write_results(folder, "quality", meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
