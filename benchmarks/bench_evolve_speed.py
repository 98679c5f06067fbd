"""Speed of the evolve driver on the testbed: time per step, peak memory, merge vs mergekit-yaml.

1. Runs ``mergekit-sae evolve`` once in a child process and reports, from its history, the
   seconds per step spent merging, writing and scoring, and the child's peak RSS.
2. Times one offspring merge of the two experts (an ``sae_evolve`` stage as the driver records
   it) three ways, on the same models: the driver's streaming merge kept in memory (as when
   it feeds the scoring model), the driver's merge written to disk, and one ``mergekit-yaml``
   subprocess running the same stage (what a search that shells out per offspring pays).
   Prints the ratios.

    python benchmarks/bench_evolve_speed.py [--recipe recipes/evolve_testbed.yml] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).parent / "results"


def run_driver(recipe: str, out: Path, steps: int | None) -> tuple[float, float]:
    """Run the evolve CLI in a child process; return (wall seconds, child peak RSS in MiB)."""
    source = recipe
    if steps is not None:
        data = yaml.safe_load(Path(recipe).read_text())
        data["steps"] = steps
        source = str(out.parent / "speed-recipe.yml")
        Path(source).write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "mergekit_sae.cli", "evolve", source, str(out)]
    start = time.perf_counter()
    subprocess.run([*command, "--force", "--quiet"], check=True)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kib / 1024


def step_times(out: Path) -> dict[str, Any]:
    """Mean seconds per step (merge, write, score) and per offspring, from history.jsonl."""
    from mergekit_sae.outputs.plots import read_history

    history = read_history(out / "history.jsonl")
    offspring = sum(len(r.offspring) for r in history)
    totals = {k: sum(r.seconds.get(k, 0.0) for r in history) for k in ("merge", "write", "score")}
    return {
        "steps": len(history),
        "offspring": offspring,
        "per_step": {k: v / len(history) for k, v in totals.items()},
        "per_offspring_merge": totals["merge"] / offspring,
        "per_offspring_merge_write": (totals["merge"] + totals["write"]) / offspring,
    }


def offspring_stage(recipe_path: str) -> tuple[Any, list[Path], Path | None, dict[str, Any]]:
    """An sae_evolve record of the experts as the driver makes it, its base, its MergeKit config."""
    from mergekit_sae.merging.recipes import stage_config
    from mergekit_sae.merging.stream import model_stats
    from mergekit_sae.recipe.loading import load_recipe
    from mergekit_sae.records import Member
    from mergekit_sae.run import resolve_inputs
    from mergekit_sae.search.sae_operators import offspring_record
    from mergekit_sae.sparsity import sparsity_from_stats

    recipe = load_recipe(recipe_path)
    inputs = resolve_inputs(recipe, recipe_path)
    members = {}
    for index, path in enumerate(inputs.models):
        member = Member(id=f"p{index}", path=str(path), origin="parent", source=str(path))
        stats = model_stats(path)
        member.sparsity = sparsity_from_stats(stats, recipe.sparsity_measure)
        member.performance = 0.5 + 0.1 * index
        members[member.id] = member
    pair = list(members.values())
    merge = recipe.settings_for("sae").merge
    record = offspring_record(
        merge, recipe, pair, pair, parent_density=1.0, child_density=0.7, dtype=inputs.dtype
    )
    child = Member(id="child", path="child", origin="offspring", merge=record)
    base = inputs.base if record.base_model is not None else None
    return record, inputs.models, base, stage_config(child, members)


def timed(function, repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def merge_ratio(recipe_path: str, work: Path, repeat: int) -> dict[str, Any]:
    """Median seconds of one offspring merge: in-driver (sink, disk) vs a mergekit-yaml process."""
    import torch

    from mergekit_sae.merging.stream import stream_merge

    record, models, base, config = offspring_stage(recipe_path)
    received: dict[str, torch.Tensor] = {}
    stream_merge(record, models, base, None, sink=received.__setitem__)  # warm-up
    in_memory = timed(
        lambda: stream_merge(record, models, base, None, sink=received.__setitem__), repeat
    )
    to_disk = timed(lambda: stream_merge(record, models, base, work / "driver-child"), repeat)
    config_path = work / "offspring.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = ["mergekit-yaml", str(config_path), str(work / "yaml-child")]
    subprocess.run([*command, "--no-copy-tokenizer"], check=True, capture_output=True)  # warm-up
    shelled = timed(
        lambda: subprocess.run([*command, "--no-copy-tokenizer"], check=True, capture_output=True),
        repeat,
    )
    medians = {
        "driver_sink_only": statistics.median(in_memory),
        "driver_to_disk": statistics.median(to_disk),
        "mergekit_yaml_subprocess": statistics.median(shelled),
    }
    return {
        "repeat": repeat,
        "median_seconds": medians,
        "ratio_subprocess_over_driver_sink": medians["mergekit_yaml_subprocess"]
        / medians["driver_sink_only"],
        "ratio_subprocess_over_driver_disk": medians["mergekit_yaml_subprocess"]
        / medians["driver_to_disk"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/evolve_testbed.yml")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-run", action="store_true", help="only the merge comparison")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-evolve-speed-"))
    report: dict[str, Any] = {"recipe": args.recipe}
    if not args.skip_run:
        wall, peak = run_driver(args.recipe, work / "run", args.steps)
        report["run"] = {"wall_seconds": wall, "peak_rss_mib": peak, **step_times(work / "run")}
        per_step = report["run"]["per_step"]
        print(f"evolve run: {wall:.1f}s wall, peak RSS {peak:.0f} MiB")
        print(
            f"per step ({report['run']['steps']} steps, {report['run']['offspring']} offspring): "
            + ", ".join(f"{k} {v:.3f}s" for k, v in per_step.items())
        )
    ratio = merge_ratio(args.recipe, work, args.repeat)
    report["merge"] = ratio
    medians = ratio["median_seconds"]
    print(
        "one offspring merge, median of {r}: driver in memory (no write) {a:.3f}s, "
        "driver to disk {b:.3f}s, mergekit-yaml subprocess {c:.3f}s".format(
            r=args.repeat,
            a=medians["driver_sink_only"],
            b=medians["driver_to_disk"],
            c=medians["mergekit_yaml_subprocess"],
        )
    )
    print(
        f"mergekit-yaml per offspring / driver: {ratio['ratio_subprocess_over_driver_sink']:.1f}x "
        f"(in memory), {ratio['ratio_subprocess_over_driver_disk']:.1f}x (to disk) "
        "(target >= 5x)"
    )
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "speed.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
