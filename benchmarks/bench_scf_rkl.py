"""SCF-RKL on the testbed against the one-shot baselines at one density, plus a diagnosis of the
functional importance.

    python benchmarks/bench_scf_rkl.py [--density 0.35] [--seeds 3] [--test-subsample 100]

Part 1 runs `mergekit-sae compare` (in process) twice on recipes/evolve_testbed.yml's tasks:
the math expert first (anchor of scf_rkl) with scf_rkl, scf_rkl_functional, task_arithmetic,
ties, dare_ties, sce and sae_oneshot, and the multilingual expert first with the two scf_rkl
methods. Every method gets ``oneshot.density`` (TIES/DARE density, SCE select_topk, SCF-RKL
density, SAE offspring density). A seed sets the test subsample, the calibration items
(the first task's step-1 training draw) and DARE's masks; the data-free merges are
deterministic. Part 2 (math anchor, seed 0) diagnoses the functional importance at density 0.1:
calibration on the anchor's task vs the donor's, a line search along the selected delta
(scale), the opposite selection, and the calibration KL to the donor at each point.
Writes benchmarks/results/scf_rkl.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_sae.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "evolve_testbed.yml"
RESULTS = ROOT / "benchmarks" / "results"
MATH_FIRST = ["scf_rkl", "scf_rkl_functional", "task_arithmetic", "ties", "dare_ties", "sce"]
MATH_FIRST += ["sae_oneshot"]
LANG_FIRST = ["scf_rkl", "scf_rkl_functional"]
NOTE = """\
Definitions: accuracy on the seeded test subsample (mean ± std over seeds); delta zeros =
exactly-zero elements of merged - base; changed vs anchor = elements that differ from the
first model (for scf_rkl: the fused share; embeddings and 1-d tensors are never fused, so
density 0.35 changes 22.3 % of all elements); repetition = share of the math generations with
a whitespace 3-gram occurring 3+ times; distinct-2 over those generations; calibration passes
= forward + backward passes of the importance pass (not fitness evaluations). The data-free
merges (scf_rkl, task_arithmetic, ties, sce) are deterministic; their spread over seeds is the
test subsample's. sae_oneshot spends 2 fitness evaluations (the experts' training scores).
The diagnosis re-fuses with the same kernel in process: `scale` multiplies the selected delta,
"lowest scores instead" selects by -score; KL is the token mean on the calibration prompts.
Interpretation: docs/scf_rkl.md, "Testbed numbers".
"""


def bench_recipe(out: Path, *, anchor_first: str, density: float, test_subsample: int) -> Path:
    """The testbed recipe with the anchor first, test subsamples and the one-shot density."""
    data = yaml.safe_load(RECIPE.read_text())
    models = data["models"]
    data["models"] = sorted(models, key=lambda m: Path(m).name != anchor_first)
    data["oneshot"] = {"density": density}
    data["device"] = "cpu"
    for task in data["tasks"]:
        task["test_subsample"] = test_subsample
    path = out / f"recipe_{anchor_first}.yml"
    write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def run_part1(out: Path, density: float, seeds: int, test_subsample: int) -> list[dict]:
    """Both comparisons; one dict per run with the CSV's fields and the calibration report."""
    from mergekit_sae.compare.run import Comparison, compare
    from mergekit_sae.driver.checkpoint import load_state

    rows = []
    for anchor, methods in (("math", MATH_FIRST), ("multilingual", LANG_FIRST)):
        recipe = bench_recipe(
            out, anchor_first=anchor, density=density, test_subsample=test_subsample
        )
        folder = out / f"anchor_{anchor}"
        comparison = Comparison(recipe=recipe, methods=methods, seeds=seeds, command="bench")
        for row in compare(comparison, folder, resume=True, progress=False):
            state = load_state(folder / row.method / f"seed{row.seed}")
            calibration = next(
                (r.info["calibration"] for r in state.history if "calibration" in r.info), None
            )
            rows.append(
                {
                    "anchor": anchor if row.method.startswith("scf_rkl") else "(base)",
                    "method": row.method,
                    "seed": row.seed,
                    "scores": row.scores,
                    "mean": row.mean,
                    "zeros": row.zeros,
                    "changed": changed_fraction(folder / row.method / f"seed{row.seed}", recipe),
                    "repetition_rate": row.repetition_rate,
                    "distinct_2": row.distinct_2,
                    "evaluations": row.evaluations,
                    "calibration_passes": row.calibration_passes,
                    "calibration": calibration,
                    "wall_s": row.wall_s,
                }
            )
    return rows


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def changed_fraction(model: Path, recipe: Path) -> float:
    """Fraction of elements that differ from the recipe's first model (the scf_rkl anchor)."""
    data = yaml.safe_load(recipe.read_text())
    anchor = weights(ROOT / data["models"][0])
    merged = weights(model)
    changed = sum(int((merged[n] != anchor[n]).sum()) for n in anchor)
    return changed / sum(t.numel() for t in anchor.values())


def summary_table(rows: list[dict], tasks: list[str]) -> str:
    """Mean +- std over seeds per (anchor, method)."""

    def cell(values: list[float], percent: bool = True) -> str:
        scale = 100 if percent else 1
        mean = scale * statistics.fmean(values)
        spread = scale * statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.1f} ± {spread:.1f}" if percent else f"{mean:.3f}"

    header = ["method", "anchor", *tasks, "mean", "delta zeros %", "changed vs anchor %"]
    header += ["repetition %", "distinct-2", "calibration passes", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["anchor"]), []).append(row)
    for (method, anchor), group in groups.items():
        reps = [r["repetition_rate"] for r in group if r["repetition_rate"] is not None]
        cells = [
            method,
            anchor,
            *(cell([r["scores"][t] for r in group]) for t in tasks),
            f"**{cell([r['mean'] for r in group])}**",
            f"{100 * statistics.fmean(r['zeros'] for r in group):.1f}",
            f"{100 * statistics.fmean(r['changed'] for r in group):.1f}",
            cell(reps) if reps else "n/a",
            cell([r["distinct_2"] for r in group if r["distinct_2"] is not None], False),
            f"{statistics.fmean(r['calibration_passes'] for r in group):.0f}",
            str(len(group)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(rows: list[dict]) -> str:
    """Wall time and peak memory of each functional importance pass."""
    lines = [
        "| anchor | seed | prompts | tokens | forward | backward | seconds | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        report = row["calibration"]
        if not report:
            continue
        passes = report["calibration_passes"]
        lines.append(
            f"| {row['anchor']} | {row['seed']} | {report['items']} | {report['tokens']} | "
            f"{passes['forward']} | {passes['backward']} | {report['seconds']:.2f} | "
            f"{report['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- part 2: the diagnosis


class Scorer:
    """The testbed tasks scored on test subsamples by one resident model."""

    def __init__(self, anchor: Path, recipe: Path, seed: int):
        from mergekit_sae.driver.context import derive_seed
        from mergekit_sae.evaluate import ResidentModel, load_task, subsample
        from mergekit_sae.evaluate.evaluator import ResidentEvaluator
        from mergekit_sae.recipe.loading import load_recipe

        parsed = load_recipe(recipe)
        self.tasks = [load_task(task) for task in parsed.tasks]
        self.resident = ResidentModel(anchor, device="cpu")
        self.evaluator = ResidentEvaluator(self.resident, self.tasks)
        self.items = {
            t.name: subsample(
                t.items("test"), spec.test_subsample, derive_seed(seed, "test", t.name)
            )
            for t, spec in zip(self.tasks, parsed.tasks, strict=True)
        }
        first = parsed.tasks[0]
        self.train = {
            t.name: subsample(t.items("train"), first.subsample, derive_seed(seed, 1, t.name))
            for t in self.tasks
        }

    def score(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, float], float | None]:
        """Test accuracy per task and the repetition rate of the math generations."""
        self.resident.load_weights(state)
        scores, generation = self.evaluator.score_with_generation(self.items)
        return scores, (generation or {}).get("repetition_rate")


def kl_to_donor(scorer: Scorer, state, donor_targets, batches) -> float:
    """Token-mean KL(p_state || p_donor) on the calibration batches."""
    from mergekit_sae.calibration.scf_rkl import next_token_kl

    scorer.resident.load_weights(state)
    model = scorer.resident.model
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch, target in zip(batches, donor_targets, strict=True):
            logits = model(**batch).logits
            total += float(next_token_kl(logits, target, batch["attention_mask"]))
            tokens += int(batch["attention_mask"].sum())
    return total / tokens


def fused(anchor, donor, importance, density: float, scale: float, sign: float = 1.0):
    """The scf_rkl kernel over a state dict (embeddings and 1-d tensors kept, as by default)."""
    from mergekit_sae.methods.scf_rkl import is_merged, scf_rkl_tensor, tensor_role

    out = {}
    for name, tensor in anchor.items():
        role = tensor_role(name, tensor)
        if not is_merged(role, merge_embeddings=False, merge_norms=False):
            out[name] = tensor
            continue
        scores = None if importance is None else [sign * importance[name]]
        out[name] = scf_rkl_tensor(
            tensor, [donor[name]], importances=scores, density=density, scale=scale, name=name
        )
    return out


def run_part2(out: Path, recipe: Path, density: float) -> dict[str, Any]:
    """Functional importance at `density`, math anchor, seed 0: what goes wrong, and a fix."""
    from safetensors.torch import load_file

    from mergekit_sae.calibration.scf_rkl import (
        compute_importance,
        target_log_probs,
        tokenize_batches,
    )

    data = yaml.safe_load(recipe.read_text())
    anchor_dir, donor_dir = (ROOT / m for m in data["models"])
    scorer = Scorer(anchor_dir, recipe, seed=0)
    anchor, donor = weights(anchor_dir), weights(donor_dir)
    points: list[dict[str, Any]] = []

    def record(label: str, state, kl_batches=None, kl_targets=None, **extra) -> None:
        scores, repetition = scorer.score(state)
        point = {"label": label, **scores, "repetition_rate": repetition, **extra}
        if kl_batches is not None:
            point["kl_to_donor"] = kl_to_donor(scorer, state, kl_targets, kl_batches)
        points.append(point)
        print(json.dumps(point), flush=True)

    record("anchor (math expert)", anchor)
    record("data-free scf_rkl", fused(anchor, donor, None, density, 1.0))
    for task in ("math", "multilingual"):
        prompts = [item["prompt"] for item in scorer.train[task]]
        report = compute_importance(
            str(anchor_dir),
            [str(donor_dir)],
            prompts,
            out / f"importance_{task}",
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        importance = load_file(report["donors"][0]["file"])
        batches = tokenize_batches(scorer.resident.tokenizer, prompts, 8, 256)
        donor_model = scorer.resident  # reuse the resident model to get the donor's targets
        donor_model.load_weights(donor)
        targets = target_log_probs(donor_model.model, batches, torch.device("cpu"))
        record(f"calibration on {task}: anchor", anchor, batches, targets)
        for scale in (0.25, 0.5, 1.0):
            record(
                f"calibration on {task}: functional, scale {scale}",
                fused(anchor, donor, importance, density, scale),
                batches,
                targets,
            )
        record(
            f"calibration on {task}: lowest scores instead",
            fused(anchor, donor, importance, density, 1.0, sign=-1.0),
            batches,
            targets,
        )
    return {"density": density, "points": points}


def part2_table(part2: dict[str, Any]) -> str:
    """One line per diagnosed model."""
    lines = [
        "| model | math % | multilingual % | repetition % | KL(model ‖ donor) on calibration |",
        "|---|---|---|---|---|",
    ]
    for p in part2["points"]:
        kl = f"{p['kl_to_donor']:.4f}" if "kl_to_donor" in p else ""
        rep = "" if p["repetition_rate"] is None else f"{100 * p['repetition_rate']:.1f}"
        accuracy = f"{100 * p['math']:.1f} | {100 * p['multilingual']:.1f}"
        lines.append(f"| {p['label']} | {accuracy} | {rep} | {kl} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.35)
    parser.add_argument("--diagnosis-density", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--test-subsample", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_scf_rkl")
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.results is not None:
        global RESULTS
        RESULTS = args.results
    start = time.perf_counter()
    rows = run_part1(args.out, args.density, args.seeds, args.test_subsample)
    part1_s = time.perf_counter() - start
    recipe = args.out / "recipe_math.yml"
    part2 = run_part2(args.out, recipe, args.diagnosis_density)
    tasks = list(rows[0]["scores"])
    report = {"command": command, "rows": rows, "diagnosis": part2}
    write_text(RESULTS / "scf_rkl.json", json.dumps(report, indent=1) + "\n")
    text = "\n".join(
        [
            "# SCF-RKL on the testbed",
            "",
            "```bash",
            command,
            "```",
            "",
            f"Density {args.density} for every method, {args.seeds} seeds, "
            f"{args.test_subsample} test items per task; part 1 took {part1_s:.0f} s.",
            "",
            summary_table(rows, tasks),
            "",
            NOTE,
            "## Functional importance pass",
            "",
            calibration_table(rows),
            "",
            f"## Diagnosis (math anchor, density {args.diagnosis_density}, seed 0)",
            "",
            part2_table(part2),
            "",
        ]
    )
    write_text(RESULTS / "scf_rkl.md", text)
    print(text)


if __name__ == "__main__":
    main()
