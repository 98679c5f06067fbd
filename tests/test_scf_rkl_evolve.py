"""SCF-RKL inside the driver: the SAE search's offspring operator and the functional one-shot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from evolve_fixtures import (
    FakeEvaluator,
    assert_identical,
    load_weights,
    recipe_data,
    task_files,
    tiny_llama,
)

from mergekit_sae.driver.context import derive_seed
from mergekit_sae.merging.recipes import RECIPE_FILE, recipe_documents, render_recipe, run_recipe
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.records import lineage, member_dir
from mergekit_sae.run import run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("experts")
    return [tiny_llama(root / name, seed) for seed, name in enumerate("ab")]


def test_sae_search_with_scf_rkl_offspring_rebuilds_bit_for_bit(tmp_path: Path, experts) -> None:
    """Every offspring is scf_rkl(fitter anchor, other donor, density = rate); the best model
    and every kept offspring rebuild exactly from their written recipes."""
    data = {
        "models": [str(m) for m in experts],
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 12} for name in "ab"],
        "steps": 4,
        "sae": {"framework": "ga", "archive_size": 4, "crossover": "scf_rkl"},
        "keep_population": True,
        "dtype": "float32",
        "device": "cpu",
    }
    recipe = parse_recipe(data)
    out = tmp_path / "OUT"
    state = run(recipe, out, progress=False, make_evaluator=lambda r, i: FakeEvaluator())
    offspring = [m for m in state.members.values() if m.origin == "offspring"]
    assert len(offspring) == recipe.steps * 2
    for child in offspring:
        record = child.merge
        assert record.method == "scf_rkl"
        rate = recipe.settings_for().schedule.rate(child.born - 1)
        assert record.parameters == {"density": pytest.approx(rate)}
        (donor,) = [item.member for item in record.inputs]
        anchor = record.base_member
        assert sorted([anchor, donor]) == sorted(child.inputs)
        # the anchor is the member of higher fitness when the pair was made (ties: first)
        step = state.history[child.born - 1]
        first, second = child.inputs
        before = step.info["fitness_before"]
        expected = second if before[second] > before[first] else first
        assert anchor == expected
    assert all(s.info.get("scf_rkl_density") == s.info["rate"] for s in state.history)
    assert all("offspring_density" not in s.info for s in state.history)

    rebuilt = run_recipe(out / RECIPE_FILE, tmp_path / "re", intermediate_dir=tmp_path / "st")
    assert_identical(out, rebuilt)
    kept = [m for m in offspring if member_dir(m, out).is_dir()]
    assert kept, "no scf_rkl offspring survived: the rebuild would not cover the operator"
    child = kept[-1]
    assert any(m.merge and m.merge.method == "scf_rkl" for m in lineage(state.members, child.id))
    recipe_file = tmp_path / f"{child.id}.yml"
    recipe_file.write_text(render_recipe(recipe_documents(state.members, child.id)))
    again = run_recipe(recipe_file, tmp_path / "child", intermediate_dir=tmp_path / "st2")
    assert_identical(member_dir(child, out), again)


class GeneratingEvaluator(FakeEvaluator):
    """The fake evaluator plus generations: item i's text is 8 words, word j is ``p`` when
    flat position (i + j) of task ``a``'s probe tensor is positive, else ``n``."""

    def texts(self, ids) -> list[str]:
        flat = self.current["model.layers.0.mlp.up_proj.weight"].flatten()
        return [
            " ".join("p" if flat[(i + j) % flat.numel()] > 0 else "n" for j in range(8))
            for i in ids
        ]

    def score_with_generation(self, items):
        from mergekit_sae.evaluate.repetition import distinct_n, repetition_rate

        texts = self.texts(items["a"])
        metrics = {
            "repetition_rate": repetition_rate(texts),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "generations": float(len(texts)),
        }
        return self.score(items), metrics


def hand_metrics(texts: list[str]) -> tuple[float, float]:
    """Share of texts with a 3-gram seen 3+ times, and distinct bigrams / bigrams, by hand."""
    looping = 0
    bigrams: list[str] = []
    for text in texts:
        words = text.split(" ")
        counts: dict[str, int] = {}
        for i in range(len(words) - 2):
            key = " ".join(words[i : i + 3])
            counts[key] = counts.get(key, 0) + 1
        looping += max(counts.values()) >= 3
        bigrams += [words[i] + " " + words[i + 1] for i in range(len(words) - 1)]
    return looping / len(texts), len(set(bigrams)) / len(bigrams)


def test_compare_reports_repetition_of_the_final_models_test_generations(
    tmp_path: Path, experts
) -> None:
    """results.csv's repetition_rate and distinct_2 match a hand count on each final model."""
    from mergekit_sae.compare.results import read_csv
    from mergekit_sae.compare.run import Comparison, compare
    from mergekit_sae.evaluate import subsample

    data = {
        "models": [str(m) for m in experts],
        "tasks": [
            {"name": "a", "type": "lm_eval", "subsample": 8, "test_subsample": 30},
            {"name": "b", "type": "lm_eval", "subsample": 8},
        ],
        "steps": 2,
        "sae": {"archive_size": 4, "children_per_step": 2},
        "dtype": "float32",
        "device": "cpu",
    }
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    methods = ["linear", "scf_rkl", "sae"]
    comparison = Comparison(recipe=recipe, methods=methods, seeds=2, command="cmd")
    out = tmp_path / "cmp"
    compare(comparison, out, progress=False, make_evaluator=lambda r, i: GeneratingEvaluator())
    rows = read_csv(out / "results.csv")
    assert [(r["method"], r["seed"]) for r in rows] == [
        (m, str(s)) for m in methods for s in (0, 1)
    ]
    rates = []
    for row in rows:
        weights = load_weights(out / row["method"] / f"seed{row['seed']}")
        flat = weights["model.layers.0.mlp.up_proj.weight"].flatten()
        ids = subsample(list(range(40, 80)), 30, derive_seed(int(row["seed"]), "test", "a"))
        texts = [
            " ".join("p" if flat[(i + j) % flat.numel()] > 0 else "n" for j in range(8))
            for i in ids
        ]
        rate, distinct = hand_metrics(texts)
        assert row["repetition_rate"] == f"{rate:.6f}"
        assert row["distinct_2"] == f"{distinct:.6f}"
        assert row["calibration_passes"] == "0"
        rates.append(rate)
    assert max(rates) > 0.0  # the check is not vacuous: some final model loops
    table = (out / "results.md").read_text()
    line = next(x for x in table.splitlines() if x.startswith("| linear |"))
    shown = float(line.split("|")[6])  # method, a, b, mean, zeros, repetition %
    assert shown == pytest.approx(100 * (rates[0] + rates[1]) / 2, abs=0.051)


def test_without_generation_metrics_the_cells_are_empty(tmp_path: Path, experts) -> None:
    """An evaluator that cannot measure generations leaves the columns empty (n/a in the table)."""
    from mergekit_sae.compare.results import read_csv
    from mergekit_sae.compare.run import Comparison, compare

    data = {
        "models": [str(m) for m in experts],
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 8} for name in "ab"],
        "dtype": "float32",
        "device": "cpu",
    }
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    comparison = Comparison(recipe=recipe, methods=["linear"], seeds=1, budget=4, command="c")
    compare(comparison, tmp_path / "o", progress=False, make_evaluator=lambda r, i: FakeEvaluator())
    (row,) = read_csv(tmp_path / "o" / "results.csv")
    assert row["repetition_rate"] == "" and row["distinct_2"] == ""
    assert "| n/a | n/a |" in (tmp_path / "o" / "results.md").read_text()


def test_resident_evaluator_measures_the_outputs_it_scores(tmp_path: Path, experts) -> None:
    """score_with_generation: the same scores as score(), and the generation task's metrics."""
    from mergekit_sae.evaluate import load_task
    from mergekit_sae.evaluate.evaluator import ResidentEvaluator
    from mergekit_sae.evaluate.resident import ResidentModel

    files = task_files(tmp_path / "data")
    recipe = parse_recipe(recipe_data(experts, files))
    tasks = [load_task(task) for task in recipe.tasks]
    resident = ResidentModel(experts[0], device="cpu")
    evaluator = ResidentEvaluator(resident, tasks)
    items = {t.name: t.items("test") for t in tasks}
    scores, generation = evaluator.score_with_generation(items)
    assert scores == evaluator.score(items)
    sums = next(t for t in tasks if t.name == "sums")
    details = sums.score_details(resident.model, resident.tokenizer, items["sums"])
    assert generation == {**sums.generation_metrics(details), "generations": len(details)}


def test_functional_one_shot_counts_its_calibration_passes(tmp_path: Path, experts) -> None:
    """scf_rkl_functional: 0 evaluations, its passes in the history and the CSV, importance
    equal to a direct computation on the first task's step-1 items, and an exact rebuild."""
    from safetensors.torch import load_file

    from mergekit_sae.calibration.scf_rkl import compute_importance
    from mergekit_sae.compare.results import read_csv
    from mergekit_sae.compare.run import Comparison, compare
    from mergekit_sae.driver.checkpoint import load_state
    from mergekit_sae.evaluate import load_task, subsample

    files = task_files(tmp_path / "data")
    data = recipe_data(experts, files)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    comparison = Comparison(recipe=recipe, methods=["scf_rkl_functional"], seeds=1, command="c")
    out = tmp_path / "cmp"
    compare(comparison, out, progress=False)
    (row,) = read_csv(out / "results.csv")
    run_dir = out / "scf_rkl_functional" / "seed0"
    state = load_state(run_dir)
    (step,) = state.history
    calibration = step.info["calibration"]
    first = data["tasks"][0]
    batches = math.ceil(first["subsample"] / 8)
    groups = 2 + 1  # layer by layer: the tiny models' 2 decoder layers, then the other tensors
    passes = {"forward": batches + groups * batches, "backward": groups * batches}
    assert calibration["calibration_passes"] == passes
    assert row["evaluations"] == "0"
    assert row["calibration_passes"] == str(passes["forward"] + passes["backward"])
    assert state.evaluations == 0

    task = load_task(parse_recipe(data).tasks[0])
    items = subsample(task.items("train"), first["subsample"], derive_seed(0, 1, first["name"]))
    direct = compute_importance(
        str(experts[0].absolute()),
        [str(experts[1].absolute())],
        [item["prompt"] for item in items],
        tmp_path / "direct",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    ours = load_file(calibration["donors"][0]["file"])
    theirs = load_file(direct["donors"][0]["file"])
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    stage = yaml.safe_load((run_dir / RECIPE_FILE).read_text())
    assert stage["models"][0]["parameters"]["importance"] == calibration["donors"][0]["file"]
    rebuilt = run_recipe(run_dir / RECIPE_FILE, tmp_path / "re")
    assert_identical(run_dir, rebuilt)


def test_one_shot_density_override_reaches_each_method() -> None:
    """oneshot.density sets ties/dare density, sce select_topk, scf_rkl density."""
    from mergekit_sae.search.oneshot import STATIC_MERGES, static_record, with_density

    parents = ["m0", "m1"]
    for method, where in [
        ("ties", "inputs"),
        ("dare_ties", "inputs"),
        ("sce", "select_topk"),
        ("scf_rkl", "density"),
        ("task_arithmetic", None),
    ]:
        record = with_density(
            static_record(STATIC_MERGES[method], parents, "base", "float32"), 0.35
        )
        if where == "inputs":
            assert [item.parameters["density"] for item in record.inputs] == [0.35, 0.35]
        elif where is None:
            assert all("density" not in item.parameters for item in record.inputs)
        else:
            assert record.parameters[where] == 0.35
    sce = static_record(STATIC_MERGES["sce"], parents, "base", "float32")
    assert sce.base_model == "base" and [i.member for i in sce.inputs] == parents
