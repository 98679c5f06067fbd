"""The driver's peak memory and per-step time split on the ~0.5B bf16 model, by population size.

Each population size runs `mergekit_sae.run.run` in its own subprocess (so its
peak RSS is its own) with ``profile: true``, a resident bf16 scoring model and a cheap scorer
(two probe "tasks" read from the resident weights, so the run measures the driver, not a
benchmark), for a few steps. Reports the peak RSS of the whole process (initial population
included) against the model's size, and each step's seconds split into merge, write, load
(into the scorer) and score, from ``history.jsonl``.

    python benchmarks/bench_memory.py [--populations 4,8,16] [--steps 1] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_throughput import CACHE, build_models, model_bytes  # noqa: E402

PROBES = {"a": "model.layers.0.mlp.up_proj.weight", "b": "model.layers.1.self_attn.q_proj.weight"}
RESULTS = Path(__file__).parent / "results"


class ProbeEvaluator:
    """A resident bf16 model whose 'tasks' score the sign of probe weights (item i of task t:
    entry i of PROBES[t] > 0): the weights are really copied in, scoring costs nothing."""

    task_names = tuple(PROBES)

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        self.targets = self.model.state_dict()

    def items(self, task: str, split: str) -> list[int]:
        return list(range(64)) if split == "train" else list(range(64, 96))

    def receive(self, name: str, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.targets[name].copy_(tensor)

    def load(self, path: Path) -> None:
        from mergekit_sae.evaluate.resident import copy_weights

        copy_weights(self.model, path)

    def score_items(self, items: Mapping[str, Sequence[int]]) -> dict[str, list[float]]:
        flat = {task: self.targets[PROBES[task]].reshape(-1) for task in items}
        return {t: [float(flat[t][i] > 0) for i in ids] for t, ids in items.items()}

    def score(self, items: Mapping[str, Sequence[int]]) -> dict[str, float]:
        return {t: sum(v) / len(v) for t, v in self.score_items(items).items()}


def child(args: argparse.Namespace) -> None:
    """One driver run (in this process); prints one JSON line with its peak RSS."""
    from mergekit_sae.recipe.loading import parse_recipe
    from mergekit_sae.run import run

    paths = build_models(args.hidden, args.layers, args.intermediate, args.vocab)
    recipe = parse_recipe(
        {
            "models": [str(paths["a"]), str(paths["b"])],
            "tasks": [{"name": "a", "type": "lm_eval"}, {"name": "b", "type": "lm_eval"}],
            "steps": args.steps,
            "sae": {"framework": "ga", "archive_size": args.population, "rescore": args.rescore},
            "dtype": "bfloat16",
            "device": "cpu",
            "test_baselines": [],
            "profile": True,
            "threads": args.threads,
        }
    )
    out = Path(args.out)
    from mergekit_sae.driver.profiling import rss_mib

    evaluator = ProbeEvaluator(paths["a"])
    before = rss_mib()  # interpreter, libraries and the resident scoring model
    peaks = {"VmRSS": 0.0, "RssAnon": 0.0}
    done = threading.Event()

    def sample() -> None:  # peak of anonymous memory (the kernel keeps only the total's)
        while not done.wait(0.02):
            for key in peaks:
                peaks[key] = max(peaks[key], rss_mib(key))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    state = run(recipe, out, progress=False, make_evaluator=lambda r, i: evaluator)
    done.set()
    sampler.join()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "population": args.population,
                "peak_rss_mib": round(peak, 1),
                "rss_before_run_mib": round(before, 1),
                "peak_anon_mib": round(peaks["RssAnon"], 1),
                "initial_seconds": round(state.seconds.get("initial", 0.0), 2),
                "steps": [
                    {
                        "seconds": {k: round(v, 2) for k, v in h["seconds"].items()},
                        "peak_rss_mib": h["info"]["profile"]["peak_rss_mib"],
                        "models_scored": h["info"]["profile"]["models_scored"],
                    }
                    for h in history
                ],
            }
        )
    )


def driver_run(population: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run one population size in a subprocess and return its JSON line."""
    command = [
        sys.executable,
        __file__,
        "--child",
        "--population",
        str(population),
        "--out",
        str(root / f"pop{population}"),
        *model_flags(args),
        "--steps",
        str(args.steps),
    ]
    if args.rescore:
        command.append("--rescore")
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    shutil.rmtree(root / f"pop{population}", ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--intermediate",
        str(args.intermediate),
        "--vocab",
        str(args.vocab),
    ]


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parse.add_argument("--hidden", type=int, default=1024)
    parse.add_argument("--layers", type=int, default=24)
    parse.add_argument("--intermediate", type=int, default=4096)
    parse.add_argument("--vocab", type=int, default=32000)
    parse.add_argument("--populations", default="4,8,16")
    parse.add_argument("--steps", type=int, default=1)
    parse.add_argument("--rescore", action="store_true", help="re-score members every step")
    parse.add_argument("--threads", type=int, default=None)
    parse.add_argument("--keep", action="store_true", help="keep the cached models")
    parse.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parse.add_argument("--population", type=int, default=4, help=argparse.SUPPRESS)
    parse.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parse


def table(runs: list[dict[str, Any]], size_mib: float) -> str:
    """The markdown table of the runs."""
    lines = [
        "| population | peak RSS MiB | x model | peak anon MiB | x model | RSS before run MiB "
        "| step s | merge s | write s | load s | score s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in runs:
        step = entry["steps"][-1]["seconds"]
        lines.append(
            f"| {entry['population']} | {entry['peak_rss_mib']:.0f} | "
            f"{entry['peak_rss_mib'] / size_mib:.2f} | {entry['peak_anon_mib']:.0f} | "
            f"{entry['peak_anon_mib'] / size_mib:.2f} | {entry['rss_before_run_mib']:.0f} | "
            f"{sum(step.values()):.1f} | "
            f"{step['merge']:.1f} | {step['write']:.1f} | {step['load']:.1f} | "
            f"{step['score']:.2f} |"
        )
    return "\n".join(lines)


def write_results(runs: list[dict[str, Any]], size_mib: float, args: argparse.Namespace) -> None:
    """Print and write results/memory.{md,json} for the runs so far."""
    import os

    from mergekit_sae.atomic import write_text

    text = (
        f"Model: {size_mib:.0f} MiB in bfloat16 ({size_mib * 2**20 / 2 / 1e9:.2f}B parameters), "
        f"{args.steps} step(s), rescore_population {args.rescore}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. Peak RSS of the driver process "
        "(initial population included; memory-mapped weight files count in RSS, not in anon); "
        "step seconds of the last step.\n\n" + table(runs, size_mib)
    )
    print(text, flush=True)
    RESULTS.mkdir(exist_ok=True)
    result = {"model_mib": round(size_mib, 1), "runs": runs}
    write_text(RESULTS / "memory.json", json.dumps(result, indent=2) + "\n")
    write_text(RESULTS / "memory.md", "# Driver memory by population size\n\n" + text + "\n")


def main() -> None:
    args = parser().parse_args()
    if args.child:
        child(args)
        return
    paths = build_models(args.hidden, args.layers, args.intermediate, args.vocab)
    size_mib = model_bytes(paths["a"]) / 2**20
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for population in args.populations.split(","):
            runs.append(driver_run(int(population), args, Path(tmp)))
            write_results(runs, size_mib, args)  # after each size: partial results survive
    if not args.keep:
        shutil.rmtree(CACHE / paths["a"].parent.name, ignore_errors=True)
    peaks = [run["peak_rss_mib"] for run in runs]
    print(json.dumps({"model_mib": round(size_mib, 1), "peak_rss_mib": peaks}))


if __name__ == "__main__":
    main()
