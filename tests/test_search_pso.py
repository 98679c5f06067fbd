"""PSO-Merging: the update rule, best bookkeeping, budget, resume and the rebuilt lineage."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from evolve_fixtures import PROBE, FakeEvaluator, assert_identical, probe_score, tiny_llama

from mergekit_sae.driver.context import derive_seed
from mergekit_sae.errors import RecipeError
from mergekit_sae.merging.recipes import RECIPE_FILE, load_stages, run_recipe
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.records import lineage
from mergekit_sae.run import run
from mergekit_sae.search.pso import (
    Best,
    PsoSettings,
    position_record,
    pso_update,
    update_bests,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pso")
    return {
        name: tiny_llama(root / name, seed) for name, seed in (("base", 40), ("a", 41), ("b", 42))
    }


def recipe(models: dict[str, Path], **overrides):
    data = {
        "models": [str(models["a"]), str(models["b"])],
        "base_model": str(models["base"]),
        "search": "pso",
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 12} for name in "ab"],
        "steps": 3,
        "seed": 1,
        "dtype": "float32",
        "device": "cpu",
        "test_baselines": [],
    }
    data.update(overrides)
    return parse_recipe(data)


class CountingEvaluator(FakeEvaluator):
    """FakeEvaluator counting fitness evaluations (``score_items``) apart from the test report."""

    def __init__(self) -> None:
        super().__init__()
        self.fitness_calls = 0

    def score_items(self, items):
        self.fitness_calls += 1
        return super().score_items(items)

    def score(self, items):
        return {
            task: probe_score(self.current[PROBE[task]], list(ids)) for task, ids in items.items()
        }


def fake_run(recipe, out: Path, evaluator: FakeEvaluator | None = None, **options):
    evaluator = evaluator or FakeEvaluator()
    return run(recipe, out, progress=False, make_evaluator=lambda r, i: evaluator, **options)


# --- the pure rules ------------------------------------------------------------------------


def test_update_of_two_particles_by_hand() -> None:
    """Coefficients over two initial particles, w = 0.2, c1 = c2 = 2 (dyadic r's: exact)."""
    # particle 0: v' = 0.2 [0.5, -0.5] + 2 (0.5) [0, 0] + 2 (0.25) ([0, 1] - [1, 0])
    #                = [0.1, -0.1] + [-0.5, 0.5] = [-0.4, 0.4]; x' = [0.6, 0.4]
    x, v = pso_update([1.0, 0.0], [0.5, -0.5], [1.0, 0.0], [0.0, 1.0], 0.5, 0.25, 0.2, 2.0, 2.0)
    assert v == pytest.approx([-0.4, 0.4], abs=1e-15)
    assert x == pytest.approx([0.6, 0.4], abs=1e-15)
    # particle 1: v' = 0 + 2 (0.5) ([0.75, 0.25] - [0.25, 0.75]) + 2 (0.25) ([0, 1] - [0.25, 0.75])
    #                = [0.5, -0.5] + [-0.125, 0.125] = [0.375, -0.375]; x' = [0.625, 0.375]
    x, v = pso_update([0.25, 0.75], [0.0, 0.0], [0.75, 0.25], [0.0, 1.0], 0.5, 0.25, 0.2, 2.0, 2.0)
    assert v == [0.375, -0.375] and x == [0.625, 0.375]
    # zero velocity at the global best that is also the personal best: it stays
    assert pso_update([0.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0], 0.9, 0.9, 0.2, 2, 2) == (
        [0.0, 1.0],
        [0.0, 0.0],
    )


def test_personal_and_global_bests_over_a_sequence_of_fitnesses() -> None:
    def best(step: int, particle: int, fitness: float) -> tuple[int, Best]:
        return particle, Best(
            position=[float(step), float(particle)], fitness=fitness, member=f"s{step}p{particle}"
        )

    pbest, gbest = update_bests([None, None], None, [best(1, 0, 0.3), best(1, 1, 0.5)])
    assert [b.member for b in pbest] == ["s1p0", "s1p1"] and gbest.member == "s1p1"
    # particle 0 improves; particle 1 ties the global best: the earlier one stays
    pbest, gbest = update_bests(pbest, gbest, [best(2, 0, 0.5), best(2, 1, 0.4)])
    assert [b.member for b in pbest] == ["s2p0", "s1p1"] and gbest.member == "s1p1"
    # a budget cut: only particle 0 was scored this step
    pbest, gbest = update_bests(pbest, gbest, [best(3, 0, 0.1)])
    assert [b.member for b in pbest] == ["s2p0", "s1p1"] and gbest.member == "s1p1"
    pbest, gbest = update_bests(pbest, gbest, [best(4, 0, 0.2), best(4, 1, 0.7)])
    assert [b.member for b in pbest] == ["s2p0", "s4p1"] and gbest.member == "s4p1"
    assert gbest.position == [4.0, 1.0] and gbest.fitness == 0.7
    # two new equal maxima in one step: the lower particle index wins
    pbest, gbest = update_bests([None, None], None, [best(1, 0, 0.6), best(1, 1, 0.6)])
    assert gbest.member == "s1p0"


def test_position_is_one_linear_stage_without_normalisation() -> None:
    record = position_record(["m0", "m1", "m2"], [0.5, 0.0, -0.25], "bfloat16")
    assert record.method == "linear" and record.parameters == {"normalize": False}
    assert [(i.member, i.parameters) for i in record.inputs] == [
        ("m0", {"weight": 0.5}),
        ("m2", {"weight": -0.25}),
    ]
    assert record.dtype == "bfloat16"


# --- runs on tiny models ---------------------------------------------------------------------


def test_step_one_scores_the_stored_particles_then_moves_by_hand(tmp_path: Path, models) -> None:
    r = recipe(models, steps=1)
    state = fake_run(r, tmp_path / "out", stop_after=1)
    search = state.search
    particles = search["particles"]
    members = state.members
    assert [members[p].origin for p in particles] == [
        "base",
        "parent",
        "parent",
        "pruned",
        "pruned",
    ]
    assert [members[p].merge.method for p in particles[3:]] == ["dare_seeded"] * 2
    # step 1 re-scored the stored particles: nothing was merged
    (record,) = state.history
    assert record.offspring == [] and record.evaluations == 5
    assert list(record.info["particle_members"].values()) == particles
    fitness = [members[p].performance for p in particles]
    g = max(range(5), key=lambda i: (fitness[i], -i))
    assert search["gbest"]["member"] == particles[g] == state.best
    # x1 = e_i + c1 r1 (e_i - e_i) + c2 r2 (e_g - e_i), with r2 the second draw of (seed, 1, pso, i)
    for i in range(5):
        rng = random.Random(derive_seed(1, 1, "pso", i))
        rng.random()
        r2 = rng.random()
        expected = [float(j == i) + 2.0 * r2 * (float(j == g) - float(j == i)) for j in range(5)]
        assert search["positions"][i] == pytest.approx(expected, abs=1e-12)
        assert search["velocities"][i] == pytest.approx(
            [e - float(j == i) for j, e in enumerate(expected)], abs=1e-12
        )


def test_budget_is_spent_exactly_with_a_truncated_last_step(tmp_path: Path, models) -> None:
    evaluator = CountingEvaluator()
    state = fake_run(recipe(models, steps=5, budget=13), tmp_path / "out", evaluator)
    assert state.finished and state.evaluations == 13
    assert evaluator.fitness_calls == 13  # the test-split report is not a fitness evaluation
    assert [h.evaluations for h in state.history] == [5, 10, 13]
    assert [len(h.offspring) for h in state.history] == [0, 5, 3]
    # the two particles the budget cut off were neither scored nor moved at step 3
    last = state.history[-1]
    assert sorted(last.info["particle_members"]) == ["0", "1", "2"]
    assert state.search["members"][3:] == [None, None]
    for position in state.search["positions"]:
        assert sum(position) == pytest.approx(1.0, abs=1e-12)  # affine combinations


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, models) -> None:
    r = recipe(models, steps=3, seed=10)  # seed 10: the global best improves at every step
    whole = fake_run(r, tmp_path / "whole")
    partial = fake_run(r, tmp_path / "split", stop_after=2)
    assert partial.step == 2 and not partial.finished
    # what the state keeps on disk: the DARE particles and the global best
    gbest = partial.search["gbest"]["member"]
    for member in [*partial.search["particles"][3:], gbest]:
        assert member in partial.population
        if partial.members[member].merge is not None:
            assert (tmp_path / "split" / partial.members[member].path).is_dir()
    resumed = fake_run(r, tmp_path / "split", resume=True)
    assert resumed.finished

    def history(state) -> list[dict]:
        return [record.model_dump(exclude={"seconds"}) for record in state.history]

    assert history(resumed) == history(whole)
    assert resumed.search == whole.search
    assert resumed.best == whole.best
    assert_identical(tmp_path / "whole", tmp_path / "split")


def test_written_lineage_rebuilds_the_answer_with_mergekit(tmp_path: Path, models) -> None:
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main as multimerge

    out = tmp_path / "OUT"
    # seed 18: the answer is a step-3 position over both DARE particles (a 3-stage lineage)
    state = fake_run(recipe(models, steps=3, seed=18), out)
    best = state.members[state.best]
    assert best.merge is not None and best.merge.method == "linear"
    merged = [m for m in lineage(state.members, best.id) if m.merge is not None]
    documents = load_stages(out / RECIPE_FILE)
    assert [d["merge_method"] for d in documents] == [m.merge.method for m in merged]
    assert "dare_seeded" in [d["merge_method"] for d in documents]
    assert documents[-1]["parameters"] == {"normalize": False}
    weights = [m["parameters"]["weight"] for m in documents[-1]["models"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)

    rebuilt = run_recipe(out / RECIPE_FILE, tmp_path / "re", intermediate_dir=tmp_path / "st")
    assert_identical(out, rebuilt)
    args = [str(out / RECIPE_FILE), "--intermediate-dir", str(tmp_path / "st2"), "--out-path"]
    result = CliRunner().invoke(multimerge, [*args, str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert_identical(out, tmp_path / "cli")


# --- recipe validation -----------------------------------------------------------------------


def test_settings_defaults_are_the_papers() -> None:
    settings = PsoSettings()
    assert (settings.drop_rate, settings.inertia, settings.c1, settings.c2) == (0.8, 0.2, 2.0, 2.0)
    assert not settings.resample and settings.include_base and settings.dare_particles


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"inertial": 0.3}, "pso.inertial: Extra inputs are not permitted"),
        ({"inertia": -0.1}, "pso.inertia: Input should be greater than or equal to 0"),
        ({"drop_rate": 1.0}, "pso.drop_rate: Input should be less than 1"),
        ({"c2": "many"}, "pso.c2: Input should be a valid number"),
    ],
)
def test_bad_settings_are_named(models, block, message) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe(models, pso=block)


def test_missing_base_model_is_named(models) -> None:
    with pytest.raises(RecipeError, match="search 'pso' needs base_model"):
        recipe(models, base_model=None)
    # without the base particle and DARE particles the experts alone need no base
    r = recipe(models, base_model=None, pso={"include_base": False, "dare_particles": False})
    assert r.settings_for().include_base is False
