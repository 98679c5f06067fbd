"""Wall time per driver step against population size and against model size, with slopes.

Population: 4, 8, 16, read from ``results/memory.json`` (bench_memory.py, whatever model it
ran on). Model size: three Llama shapes up to the ~0.5B bf16 model at population 4 (a point
bench_memory.py measured is reused; ``--large-point`` gives the largest one's run). Each
point is one `evolve` run in a subprocess with the cheap probe scorer of bench_memory.py (so
the driver is measured); a step's time is the sum of its merge/write/load/score seconds.
Writes ``results/scaling.{json,md,png}``.

    python benchmarks/bench_scaling.py [--large-point run.json] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory import RESULTS, driver_run  # noqa: E402
from bench_throughput import CACHE, build_models  # noqa: E402

LARGE = {"hidden": 1024, "layers": 24, "intermediate": 4096, "vocab": 32000}
SIZES = [
    {"hidden": 256, "layers": 4, "intermediate": 1024, "vocab": 8000},
    {"hidden": 512, "layers": 12, "intermediate": 2048, "vocab": 16000},
    LARGE,
]


def params_b(shape: dict[str, int]) -> float:
    """Parameters (billions) of an untied Llama shape."""
    h, n, i, v = shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"]
    return (2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h) / 1e9


def step_seconds(run: dict) -> float:
    """Seconds of the run's last step (merge + write + load + score)."""
    return sum(run["steps"][-1]["seconds"].values())


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def run_point(shape: dict[str, int], population: int, root: Path, threads: int | None) -> dict:
    """One driver run of a shape and population size."""
    flags = argparse.Namespace(**shape, steps=1, rescore=False, threads=threads)
    build_models(shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"])
    return driver_run(population, flags, root)


def plot(populations, pop_times, sizes, size_times, path: Path, title: str) -> None:
    """Two panels: step time against population, and against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(populations, pop_times, "o-")
    left.set(xlabel="population size", ylabel="seconds per step", title=title)
    right.plot(sizes, size_times, "o-")
    right.set(xlabel="parameters (B)", ylabel="seconds per step", title="population 4")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--large-point", default=None, help="JSON of a bench_memory run of the largest shape"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the cached models")
    args = parser.parse_args()
    from mergekit_sae.atomic import write_text

    memory = json.loads((RESULTS / "memory.json").read_text())
    memory_params = memory["model_mib"] * 2**20 / 2 / 1e9
    by_population = {r["population"]: r for r in memory["runs"]}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp)
        size_runs = []
        for shape in SIZES:
            if abs(params_b(shape) - memory_params) < 0.01 * memory_params and 4 in by_population:
                size_runs.append(by_population[4])  # measured by bench_memory.py
            elif shape == LARGE and args.large_point:
                size_runs.append(json.loads(Path(args.large_point).read_text()))
            else:
                size_runs.append(run_point(shape, 4, root, args.threads))
    populations = sorted(by_population)
    pop_times = [step_seconds(by_population[p]) for p in populations]
    sizes = [params_b(shape) for shape in SIZES]
    size_times = [step_seconds(run) for run in size_runs]
    per_member = slope(populations, pop_times)
    per_billion = slope(sizes, size_times)
    title = f"{memory_params:.2f}B model"
    plot(populations, pop_times, sizes, size_times, RESULTS / "scaling.png", title)
    lines = [
        "# Driver step time: scaling",
        "",
        f"Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine: "
        "absolute seconds are noisy). One SAE step, cheap probe scorer, no re-scoring.",
        "",
        f"| population ({memory_params:.2f}B model) | seconds per step |",
        "|---:|---:|",
        *[f"| {p} | {t:.1f} |" for p, t in zip(populations, pop_times, strict=True)],
        "",
        f"Slope: {per_member:.2f} s per extra population member "
        f"({per_member * 2:.2f} s per offspring: a step makes population/2 of them).",
        "",
        "| parameters (B), population 4 | seconds per step |",
        "|---:|---:|",
        *[f"| {s:.3f} | {t:.1f} |" for s, t in zip(sizes, size_times, strict=True)],
        "",
        f"Slope: {per_billion:.1f} s per billion parameters per step.",
        "",
        "![scaling](scaling.png)",
    ]
    write_text(RESULTS / "scaling.md", "\n".join(lines) + "\n")
    result = {
        "populations": populations,
        "population_seconds": pop_times,
        "params_b": sizes,
        "size_seconds": size_times,
        "seconds_per_member": per_member,
        "seconds_per_billion_params": per_billion,
    }
    write_text(RESULTS / "scaling.json", json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    if not args.keep:
        for shape in SIZES:
            name = f"h{shape['hidden']}-l{shape['layers']}-i{shape['intermediate']}"
            shutil.rmtree(CACHE / f"{name}-v{shape['vocab']}", ignore_errors=True)
    print(json.dumps({"seconds_per_member": per_member, "seconds_per_billion": per_billion}))


if __name__ == "__main__":
    main()
