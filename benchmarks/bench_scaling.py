"""Wall time per driver step against population size and against model size, with slopes.

Population: 4, 8, 16 on the ~0.5B bf16 model (read from ``results/memory.json`` when
bench_memory.py wrote it, else run here). Model size: three Llama shapes up to that model at
population 4. Each point is one `evolve` run in a subprocess with the cheap probe scorer of
bench_memory.py (so the driver is measured); the time of a step is the sum of its
merge/write/load/score seconds. Writes ``results/scaling.{json,md,png}``.

    python benchmarks/bench_scaling.py [--rerun-populations] [--keep]
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


def plot(populations, pop_times, sizes, size_times, path: Path) -> None:
    """Two panels: step time against population, and against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(populations, pop_times, "o-")
    left.set(xlabel="population size", ylabel="seconds per step", title="0.5B model")
    right.plot(sizes, size_times, "o-")
    right.set(xlabel="parameters (B)", ylabel="seconds per step", title="population 4")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rerun-populations", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the cached models")
    args = parser.parse_args()
    from mergekit_sae.atomic import write_text

    memory = RESULTS / "memory.json"
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp)
        if memory.is_file() and not args.rerun_populations:
            by_population = {r["population"]: r for r in json.loads(memory.read_text())["runs"]}
        else:
            by_population = {p: run_point(LARGE, p, root, args.threads) for p in (4, 8, 16)}
        size_runs = [
            by_population[4] if shape == LARGE else run_point(shape, 4, root, args.threads)
            for shape in SIZES
        ]
    populations = sorted(by_population)
    pop_times = [step_seconds(by_population[p]) for p in populations]
    sizes = [params_b(shape) for shape in SIZES]
    size_times = [step_seconds(run) for run in size_runs]
    per_member = slope(populations, pop_times)
    per_billion = slope(sizes, size_times)
    plot(populations, pop_times, sizes, size_times, RESULTS / "scaling.png")
    lines = [
        "# Driver step time: scaling",
        "",
        f"Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine: "
        "absolute seconds are noisy). One SAE step, cheap probe scorer, no re-scoring.",
        "",
        "| population (0.5B model) | seconds per step |",
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
