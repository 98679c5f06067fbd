"""The driver and SAE's generational GA (``framework: ga``) on tiny random models with a fake
evaluator of known scores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from evolve_fixtures import (
    PROBE,
    FakeEvaluator,
    load_weights,
    probe_score,
    tiny_llama,
)

from mergekit_sae.driver.checkpoint import HISTORY_FILE, load_state
from mergekit_sae.driver.context import RunContext, derive_seed, training_subsample
from mergekit_sae.driver.loop import evolve, initial_population
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.records import Member, lineage, member_dir
from mergekit_sae.run import run
from mergekit_sae.search.sae_ga import random_pairs, replacement_slot
from mergekit_sae.search.sae_operators import offspring_record

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("parents")
    return [tiny_llama(root / "p0", 10), tiny_llama(root / "p1", 11)]


def make_context(out: Path, parents: list[Path], **overrides) -> RunContext:
    """A GA run with eq. 5 offspring (``sae`` overrides merge into its block)."""
    data = {
        "models": [str(p) for p in parents],
        "tasks": [
            {"name": "a", "type": "lm_eval", "subsample": 12},
            {"name": "b", "type": "lm_eval", "subsample": 12, "weight": 3.0},
        ],
        "steps": 2,
        "dtype": "float32",
    }
    sae = {
        "framework": "ga",
        "crossover": "sae_evolve",
        "archive_size": 6,
        "sparsity_term": {"weight": 0.2},
    }
    data.update(overrides, sae={**sae, **overrides.get("sae", {})})
    recipe = parse_recipe(data)
    return RunContext(
        recipe=recipe,
        out=out,
        models=list(parents),
        base=None,
        evaluator=FakeEvaluator(),
        progress=False,
    )


def expected_scores(path: Path, items: dict[str, list[int]]) -> dict[str, float]:
    """Scores recomputed from the written weights, independently of the loop's evaluator."""
    weights = load_weights(path)
    return {task: probe_score(weights[PROBE[task]], ids) for task, ids in items.items()}


def test_initial_population_prunes_variants_at_spread_rates(tmp_path: Path, parents) -> None:
    ctx = make_context(tmp_path, parents)
    state = initial_population(ctx)
    members = [state.members[i] for i in state.population]
    assert [m.origin for m in members] == ["parent", "parent"] + ["pruned"] * 4
    assert [m.inputs for m in members[2:]] == [["m0000"], ["m0001"], ["m0000"], ["m0001"]]
    for m, rate in zip(members[2:], [0.1, 0.1, 0.6, 0.6], strict=True):
        assert m.merge.method == "sae_prune"
        assert m.merge.inputs[0].parameters["density"] == pytest.approx(1 - rate)
        weights = load_weights(member_dir(m, tmp_path))
        zeros = sum(int((t == 0).sum()) for t in weights.values())
        numel = sum(t.numel() for t in weights.values())
        assert zeros / numel == pytest.approx(rate, abs=0.01)
        assert m.zero_fraction == pytest.approx(zeros / numel)
    assert members[0].zero_fraction == 0.0


def test_step_scores_pairs_and_replaces_as_specified(tmp_path: Path, parents) -> None:
    ctx = make_context(tmp_path, parents, steps=1)
    state = evolve(ctx)
    (record,) = state.history
    items = training_subsample(ctx, 1)
    assert {k: len(v) for k, v in items.items()} == {"a": 12, "b": 12}
    weights = {"a": 1.0, "b": 3.0}

    def fit(scores, sparsity):
        perf = sum(weights[t] * s for t, s in scores.items()) / 4.0
        return perf + 0.2 * sparsity

    population = list(record.population_before)
    fitnesses = []
    for identifier in population:
        m = state.members[identifier]
        assert m.scored_at == 1
        if member_dir(m, tmp_path).exists():  # replaced members' weights are gone
            assert m.scores == expected_scores(member_dir(m, tmp_path), items)
        fitnesses.append(fit(m.scores, m.sparsity))
    assert [record.info["fitness_before"][i] for i in population] == pytest.approx(fitnesses)

    pairs = random_pairs(population, random.Random(derive_seed(ctx.recipe.seed, 1, "pairs")))
    assert [tuple(o.parents) for o in record.offspring] == pairs
    for offspring in record.offspring:
        child = state.members[offspring.id]
        params = child.merge.parameters
        rate = ctx.recipe.settings_for().schedule.rate(0)
        assert params["offspring_density"] == pytest.approx(1 - rate)
        for item, parent in zip(child.merge.inputs, offspring.parents, strict=True):
            assert item.member == parent
            assert item.parameters["score"] == state.members[parent].performance
            assert item.parameters["density"] == 1.0
            assert item.parameters["global_sparsity"] == state.members[parent].sparsity
        assert offspring.fitness == pytest.approx(fit(offspring.scores, offspring.sparsity))
        slot = replacement_slot(fitnesses, offspring.fitness)
        assert offspring.replaced == (population[slot] if slot is not None else None)
        if slot is not None:
            population[slot] = offspring.id
            fitnesses[slot] = offspring.fitness
    assert record.population_after == population == state.population
    # the living generated members and those of the previous checkpoint (the fallback of a
    # resume) are on disk; the others were removed after the checkpoint
    on_disk = {p.name for p in (tmp_path / ".work" / "population").iterdir()}
    kept = set(population) | set(record.population_before)
    assert on_disk == {i for i in kept if state.members[i].origin != "parent"}
    assert not on_disk & {o.id for o in record.offspring if o.id not in population}


def test_offspring_scores_match_their_written_weights(tmp_path: Path, parents) -> None:
    ctx = make_context(tmp_path, parents, steps=1, keep_population=True)
    state = evolve(ctx)
    items = training_subsample(ctx, 1)
    for offspring in state.history[0].offspring:
        if offspring.replaced is not None:
            path = member_dir(state.members[offspring.id], tmp_path)
            assert offspring.scores == expected_scores(path, items)


def test_without_rescoring_members_keep_their_first_scores(tmp_path: Path, parents) -> None:
    ctx = make_context(tmp_path, parents, sae={"rescore": False})
    state = evolve(ctx)
    first, second = state.history
    for identifier in second.population_before:
        m = state.members[identifier]
        assert m.scored_at == (1 if identifier in first.population_before else m.born)


def test_history_and_checkpoint_agree(tmp_path: Path, parents) -> None:
    ctx = make_context(tmp_path, parents)
    state = evolve(ctx)
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    loaded = load_state(tmp_path)
    assert loaded.step == 2 and loaded.population == state.population
    assert [r.info["rate"] for r in loaded.history] == pytest.approx([0.1, 0.35])


def test_redense_original_references_the_pairs_other_originals(parents) -> None:
    recipe = parse_recipe(
        {
            "models": [str(p) for p in parents],
            "tasks": [{"name": "a", "type": "lm_eval"}],
            "sae": {"merge": {"redense": "original"}},
        }
    )
    merge = recipe.settings_for().merge
    p0 = Member(id="p0", path="/p0", origin="parent", performance=0.5)
    p1 = Member(id="p1", path="/p1", origin="parent", performance=0.4)
    v0 = Member(id="v0", path="v0", origin="pruned", inputs=["p0"], performance=0.3)
    v1 = Member(id="v1", path="v1", origin="pruned", inputs=["p1"], performance=0.2)

    def references(pair, originals):
        record = offspring_record(
            merge, recipe, pair, originals, parent_density=1.0, child_density=0.8, dtype="float32"
        )
        refs = [i.member for i in record.inputs if i.parameters.get("dense_reference")]
        return refs, record.parameters["redense"]

    assert references([v0, v1], [p0, p1]) == (["p0", "p1"], "original")
    assert references([p0, v1], [p0, p1]) == (["p1"], "original")
    assert references([p0, v0], [p0, p0]) == ([], "parents")
    assert references([p0, p1], [p0, p1]) == ([], "parents")


def test_redense_original_run_finishes_with_a_recipe(tmp_path: Path, parents) -> None:
    ctx = make_context(tmp_path / "out", parents, sae={"merge": {"redense": "original"}}, steps=2)
    state = run(ctx.recipe, ctx.out, progress=False, make_evaluator=lambda r, i: FakeEvaluator())
    assert state.finished and (ctx.out / "mergekit_config.yml").is_file()
    for record in state.history:
        for offspring in record.offspring:
            child = state.members[offspring.id]
            refs = [i.member for i in child.merge.inputs if i.parameters.get("dense_reference")]
            ancestors = {
                m.id
                for p in offspring.parents
                for m in lineage(state.members, p)
                if m.origin == "parent"
            }
            assert set(refs) == ancestors - set(offspring.parents)
            expected = "original" if refs else "parents"
            assert child.merge.parameters["redense"] == expected


def test_resident_evaluator_receives_tensors_in_place(parents) -> None:
    """A merged tensor lands in the scoring model's own parameter; misfits are named."""
    from mergekit_sae.evaluate import ResidentModel, WeightLoadError
    from mergekit_sae.evaluate.evaluator import ResidentEvaluator

    resident = ResidentModel(parents[0], device="cpu")
    evaluator = ResidentEvaluator(resident, tasks=[])
    name = "model.norm.weight"
    parameter = dict(resident.model.named_parameters())[name]
    evaluator.receive(name, torch.full_like(parameter, 0.25))
    assert torch.equal(parameter, torch.full_like(parameter, 0.25))
    with pytest.raises(WeightLoadError, match="model.missing.weight"):
        evaluator.receive("model.missing.weight", torch.zeros(3))
    with pytest.raises(WeightLoadError, match=rf"{name} has shape \(3,\)"):
        evaluator.receive(name, torch.zeros(3))
    assert torch.equal(parameter, torch.full_like(parameter, 0.25))
