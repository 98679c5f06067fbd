"""The Ray executor against the serial one on the testbed: seconds per step and same results.

Runs the testbed recipe (``recipes/evolve_testbed.yml``, a few steps, no final test report)
twice in this process, first scored in the driver (``executor: serial``) and then on a local
Ray instance with ``--workers`` actors of one CPU each (``executor: {kind: ray}``), and
reports each run's wall time, its seconds per step (merge + write + load + score, from
``history.jsonl``), the ratio serial / Ray (above 1: Ray is faster) and whether the two
histories and best models agree. Build the testbed first (``mergekit-sae testbed build``).
Writes ``results/ray.{json,md}``.

    python benchmarks/bench_ray.py [--steps 3] [--workers 2] [--transfer path]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent


def one_run(data: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the recipe into ``out``; its wall seconds, step seconds and what must match."""
    from mergekit_sae.recipe.loading import parse_recipe
    from mergekit_sae.run import run

    start = time.perf_counter()
    state = run(parse_recipe(data), out, progress=False)
    wall = time.perf_counter() - start
    steps = [sum(record.seconds.values()) for record in state.history]
    return {
        "wall_s": round(wall, 2),
        "step_s": [round(s, 3) for s in steps],
        "mean_step_s": round(sum(steps) / len(steps), 3),
        "history": [
            record.model_dump(mode="json", exclude={"seconds"}) for record in state.history
        ],
        "best": state.best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/evolve_testbed.yml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--transfer", choices=["path", "object_store"], default="path")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.chdir(ROOT)  # the recipe's paths are relative to the repository root
    data = yaml.safe_load(Path(args.recipe).read_text())
    data.update(steps=args.steps, test_baselines=[])
    executor = {"kind": "ray", "workers": args.workers, "transfer": args.transfer}
    with tempfile.TemporaryDirectory() as tmp:
        serial = one_run(data, Path(tmp) / "serial")
        ray_run = one_run({**data, "executor": executor}, Path(tmp) / "ray")
    same = serial["history"] == ray_run["history"] and serial["best"] == ray_run["best"]
    result = {
        "steps": args.steps,
        "workers": args.workers,
        "transfer": args.transfer,
        "cpus": os.cpu_count(),
        "load_avg": round(os.getloadavg()[0], 2),
        "serial_wall_s": serial["wall_s"],
        "ray_wall_s": ray_run["wall_s"],
        "serial_step_s": serial["mean_step_s"],
        "ray_step_s": ray_run["mean_step_s"],
        "step_ratio_serial_over_ray": round(serial["mean_step_s"] / ray_run["mean_step_s"], 3),
        "wall_ratio_serial_over_ray": round(serial["wall_s"] / ray_run["wall_s"], 3),
        "same_history_and_best": same,
    }
    write(result, args.results)


def write(result: dict[str, Any], results: Path) -> None:
    """Print and write results/ray.{json,md}."""
    from mergekit_sae.atomic import write_text

    lines = [
        "# Ray executor against serial scoring (testbed)",
        "",
        f"{result['steps']} steps of `recipes/evolve_testbed.yml` (population 8), Ray with "
        f"{result['workers']} one-CPU actors (`transfer: {result['transfer']}`) on "
        f"{result['cpus']} CPUs, load average {result['load_avg']}.",
        "",
        "| executor | wall s (whole run) | seconds per step |",
        "|---|---:|---:|",
        f"| serial | {result['serial_wall_s']:.1f} | {result['serial_step_s']:.2f} |",
        f"| ray | {result['ray_wall_s']:.1f} | {result['ray_step_s']:.2f} |",
        "",
        f"Serial / Ray: {result['step_ratio_serial_over_ray']:.2f}x per step, "
        f"{result['wall_ratio_serial_over_ray']:.2f}x over the whole run (above 1: Ray is "
        f"faster). Same history and best model: {result['same_history_and_best']}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text + json.dumps(result))
    results.mkdir(exist_ok=True)
    write_text(results / "ray.md", text)
    write_text(results / "ray.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
