"""M2N2 as a search: its pure rules against hand-computed values, then whole runs on tiny models."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from evolve_fixtures import FakeEvaluator, assert_identical, load_weights, tiny_llama

from mergekit_sae.driver.context import RunContext
from mergekit_sae.driver.loop import evolve
from mergekit_sae.merging.per_tensor import resolve, resolve_parameters
from mergekit_sae.merging.recipes import RECIPE_FILE, run_recipe, write_recipe
from mergekit_sae.merging.stream import open_model, stream_merge, tensor_names
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.records import lineage, member_dir
from mergekit_sae.run import run
from mergekit_sae.search.m2n2 import M2n2Settings
from mergekit_sae.search.niches import (
    archive_slot,
    attraction,
    crossover_record,
    crossover_t,
    crossover_units,
    draw,
    draw_crossover,
    flat_items,
    item_fitness,
    select_parents,
    selection_probabilities,
    shared_fitness,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 models x 4 items: 0 and 1 share item 0, each has one item alone, model 2 alone solves item 3.
S = [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
W = [0.25] * 4


class Scripted(random.Random):
    """A generator whose ``random()`` returns the given values in turn."""

    def __init__(self, *values: float):
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


# --- fitness sharing and archive replacement ---------------------------------------------------


def test_shared_fitness_by_hand() -> None:
    # alpha 1: column totals z = [2, 1, 1, 1]
    assert shared_fitness(S, 1.0, W) == pytest.approx(
        [0.25 * (1 / 2 + 1), 0.25 * (1 / 2 + 1), 0.25 * 1]
    )
    # alpha 0: the plain weighted sum (the performance)
    assert shared_fitness(S, 0.0, W) == pytest.approx([0.5, 0.5, 0.25])
    # an item nobody solves: its total 0 counts as 1 and gives nobody anything
    assert shared_fitness([[0.0, 1.0], [0.0, 0.0]], 1.0) == [1.0, 0.0]
    # the per-item matrix f_ij sums to the shared fitness
    matrix = item_fitness(S, 1.0, W)
    assert matrix == [[0.125, 0.25, 0.0, 0.0], [0.125, 0.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.25]]
    assert [sum(row) for row in matrix] == shared_fitness(S, 1.0, W)


def test_flat_items_weights_make_the_task_weighted_mean() -> None:
    row, weights = flat_items({"b": [1.0, 0.0], "a": [1.0, 1.0, 0.0, 0.0]}, {"a": 1.0, "b": 3.0})
    assert row == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # tasks in sorted order
    assert sum(s * w for s, w in zip(row, weights, strict=True)) == pytest.approx(
        (0.5 * 1 + 0.5 * 3) / 4
    )


def test_archive_replacement_by_hand() -> None:
    child = [1.0, 1.0, 1.0, 0.0]
    # not full: the child joins at the end
    assert archive_slot(S, child, 4, 1.0, W) == 3
    # full, alpha 1: z = [3, 2, 2, 1]; f = [.25(1/3+1/2), same, .25, .25(1/3+1/2+1/2)]:
    # models 0 and 1 tie lowest, the earliest goes; model 2 keeps its niche (item 3)
    assert archive_slot(S, child, 3, 1.0, W) == 0
    # full, alpha 0 (plain GA): f = [.5, .5, .25, .75]: model 2 goes
    assert archive_slot(S, child, 3, 0.0, W) == 2
    # the child is the worst: z = [3, 1, 1, 1], f_child = .25/3 < .25: rejected
    assert archive_slot(S, [1.0, 0.0, 0.0, 0.0], 3, 1.0, W) is None
    assert archive_slot(S, [0.0] * 4, 3, 0.0, W) is None
    # a child tied with the worst member replaces it (the child counts as last):
    # z = [2, 1, 1, 2]; f = [.375, .375, .125, .125]
    assert archive_slot(S, [0.0, 0.0, 0.0, 1.0], 3, 1.0, W) == 2


# --- mate selection ----------------------------------------------------------------------------


def test_first_parent_proportional_to_shared_fitness() -> None:
    assert selection_probabilities(shared_fitness(S, 1.0, W)) == pytest.approx([0.375, 0.375, 0.25])
    assert selection_probabilities([0.0, 0.0, 0.0, 0.0]) == [0.25] * 4  # all-zero guard


def test_attraction_by_hand() -> None:
    matrix = item_fitness(S, 1.0, W)
    # to model 0: model 1 beats it on item 2 (.25), model 2 on item 3 (.25)
    assert attraction(matrix, 0) == [0.0, 0.25, 0.25]
    assert selection_probabilities(attraction(matrix, 0), exclude=0) == [0.0, 0.5, 0.5]
    # to model 2: model 0 gains on items 0, 1 (.125 + .25), model 1 on items 0, 2
    assert attraction(matrix, 2) == [0.375, 0.375, 0.0]
    assert selection_probabilities(attraction(matrix, 2), exclude=2) == [0.5, 0.5, 0.0]


def test_attraction_all_zero_falls_back_to_uniform_over_the_others() -> None:
    dominant = [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]  # model 0 is at least as good everywhere
    pull = attraction(item_fitness(dominant, 1.0, [0.5, 0.5]), 0)
    assert pull == [0.0, 0.0, 0.0]
    assert selection_probabilities(pull, exclude=0) == [0.0, 0.5, 0.5]
    # every model fails every item: both draws are uniform, never the same model twice
    zeros = [[0.0, 0.0]] * 3
    for seed in range(50):
        first, second = select_parents(zeros, [0.5, 0.5], 1.0, random.Random(seed))
        assert first != second


def test_draw_never_picks_probability_zero() -> None:
    assert draw([0.375, 0.375, 0.25], Scripted(0.5)) == 1
    assert draw([0.375, 0.375, 0.25], Scripted(0.0)) == 0
    assert draw([0.5, 0.0, 0.5], Scripted(0.5)) == 2
    assert draw([0.5, 0.5, 0.0], Scripted(math.nextafter(1.0, 0.0))) == 1


def test_select_parents_scripted_and_by_frequency() -> None:
    # u = .8 -> model 2 (cumulative .375, .75, 1); attraction to 2: [.5, .5, 0]; u = .3 -> model 0
    assert select_parents(S, W, 1.0, Scripted(0.8, 0.3)) == (2, 0)
    assert select_parents(S, W, 1.0, Scripted(0.1, 0.6)) == (0, 2)
    # without attraction the second follows shared fitness among the others: [.6, 0, .4] / 1
    assert select_parents(S, W, 1.0, Scripted(0.5, 0.55), use_attraction=False) == (1, 0)
    assert select_parents(S, W, 1.0, Scripted(0.5, 0.65), use_attraction=False) == (1, 2)
    rng = random.Random(7)
    counts = [[0] * 3 for _ in range(3)]
    trials = 6000
    for _ in range(trials):
        first, second = select_parents(S, W, 1.0, rng)
        counts[first][second] += 1
    # P(first, second) = P(first) * the second's attraction share (0 and 1 attract each other
    # through their own items, 2 attracts both through item 3)
    expected = [[0, 0.375 * 0.5, 0.375 * 0.5], [0.375 * 0.5, 0, 0.375 * 0.5], [0.125, 0.125, 0]]
    for i in range(3):
        for j in range(3):
            assert counts[i][j] / trials == pytest.approx(expected[i][j], abs=0.02)


# --- crossover ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("m2n2")
    return [tiny_llama(root / "p0", 30), tiny_llama(root / "p1", 31)]


def names_of(path: Path) -> list[str]:
    return tensor_names([open_model(path)], [path])


def test_crossover_units_follow_the_model() -> None:
    names = [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
    ]
    assert crossover_units(names) == [
        ["model.embed_tokens.weight"],
        ["model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"],
        ["model.layers.1.mlp.up_proj.weight"],
        ["model.layers.10.mlp.up_proj.weight"],
        ["lm_head.weight", "model.norm.weight"],
    ]


def test_split_point_is_uniform_over_tensors() -> None:
    units = [["e"], ["a0", "b0", "c0"], ["x"]]  # 5 tensors: unit 1 holds 3 of them
    rng = random.Random(3)
    draws = [draw_crossover(units, rng) for _ in range(5000)]
    splits = [split for split, _ in draws]
    assert [splits.count(k) / 5000 for k in range(3)] == pytest.approx([0.2, 0.6, 0.2], abs=0.03)
    assert all(0.0 <= w < 1.0 for _, w in draws)
    assert sum(w for _, w in draws) / 5000 == pytest.approx(0.5, abs=0.02)


def reference_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SLERP of two whole tensors (one angle per tensor), in float64, written here."""
    x, y = a.double().flatten(), b.double().flatten()
    cos = float(torch.dot(x / x.norm(), y / y.norm()).clamp(-1, 1))
    if abs(cos) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    theta = math.acos(cos)
    mixed = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    return mixed.reshape(a.shape)


def test_crossover_stage_gives_w_before_the_split_and_1_minus_w_after(tmp_path, parents) -> None:
    p0, p1 = parents
    names = names_of(p0)
    units = crossover_units(names)
    assert [len(unit) for unit in units] == [1, 9, 9, 2]  # embeddings, 2 layers, norm + lm_head
    w = 0.3
    record = crossover_record("first", "second", units, 2, w, "float32")
    assert record.method == "slerp" and record.base_member == "first"
    assert [item.member for item in record.inputs] == ["second"]
    t = record.parameters["t"]
    before = {"model.embed_tokens.weight", *(n for n in names if ".layers.0." in n)}
    for name in names:
        assert resolve(t, name) == (w if name in before else 1.0 - w), name
    assert crossover_t(units, 2, w) == {n: w if n in before else 1.0 - w for n in names}

    stream_merge(record, [p1], p0, tmp_path / "child")
    child, a, b = load_weights(tmp_path / "child"), load_weights(p0), load_weights(p1)
    for name, t_value in [
        ("model.layers.0.self_attn.q_proj.weight", w),
        ("lm_head.weight", 1.0 - w),
    ]:
        expected = reference_slerp(t_value, a[name], b[name]).float()
        assert torch.allclose(child[name], expected, rtol=1e-5, atol=1e-6), name
        assert not torch.allclose(child[name], ((1 - t_value) * a[name] + t_value * b[name]))

    # t = 0 everywhere before a split after the last unit: parent 1 bit for bit
    zero = crossover_record("first", "second", units, len(units), 0.0, "float32")
    assert resolve_parameters(zero.parameters, "lm_head.weight") == {"t": 0.0}
    stream_merge(zero, [p1], p0, tmp_path / "same")
    assert_identical(tmp_path / "same", p0)


# --- whole runs --------------------------------------------------------------------------------


def m2n2_recipe(parents: list[Path], **block) -> dict:
    return {
        "models": [str(p) for p in parents],
        "tasks": [
            {"name": "a", "type": "lm_eval", "subsample": 12},
            {"name": "b", "type": "lm_eval", "subsample": 12},
        ],
        "search": "m2n2",
        "steps": 3,
        "dtype": "float32",
        "device": "cpu",
        "test_baselines": [],
        "m2n2": {"archive_size": 3, "children_per_step": 3, **block},
    }


def test_settings_defaults_and_recipe_checks(parents) -> None:
    settings = M2n2Settings()
    assert (settings.archive_size, settings.alpha, settings.children_per_step) == (20, 1.0, 4)
    assert (settings.resample, settings.crossover, settings.use_attraction) == (
        False,
        "slerp",
        True,
    )
    recipe = parse_recipe({**m2n2_recipe(parents), "m2n2": {"alpha": 0.0}})
    assert recipe.settings_for().alpha == 0.0
    with pytest.raises(ValueError, match="archive_size"):
        parse_recipe({**m2n2_recipe(parents), "m2n2": {"archive_size": 1}})
    with pytest.raises(ValueError, match="crossover"):
        parse_recipe({**m2n2_recipe(parents), "m2n2": {"crossover": "linear"}})


@pytest.mark.parametrize(
    ("resample", "budget", "steps"),
    [
        # step 1: 2 parents + 3 children; step 2: 2 of its 3 children fit
        (False, 7, [5, 7]),
        # step 1: 2 + 3 (archive full after the first child); step 2: 3 re-scored + 1 child
        (True, 9, [5, 9]),
    ],
)
def test_budget_counts_every_evaluation(tmp_path, parents, resample, budget, steps) -> None:
    recipe = parse_recipe({**m2n2_recipe(parents, resample=resample), "budget": budget, "steps": 9})
    evaluator = FakeEvaluator()
    ctx = RunContext(
        recipe=recipe,
        out=tmp_path,
        models=list(parents),
        base=None,
        evaluator=evaluator,
        progress=False,
    )
    state = evolve(ctx)
    assert evaluator.scored == budget == state.evaluations
    assert [record.evaluations for record in state.history] == steps
    assert len(state.history[-1].offspring) == (2 if not resample else 1)
    search = ctx.search
    assert len(search.state.archive) == 3 and set(search.state.rows) == set(search.state.archive)
    # every child is one slerp stage from parent 1 (its base) to parent 2
    for record in state.history:
        for child in record.offspring:
            merge = state.members[child.id].merge
            assert merge.method == "slerp" and merge.base_member == child.parents[0]
            assert [item.member for item in merge.inputs] == child.parents[1:]
    # the stored rows are each member's own scores on the fixed items (step 1's draw)
    for member_id in search.state.archive:
        row = search.state.rows[member_id]
        scores = state.members[member_id].scores
        assert sum(row[:12]) / 12 == pytest.approx(scores["a"])
        assert sum(row[12:]) / 12 == pytest.approx(scores["b"])


def comparable_history(state) -> list[dict]:
    return [record.model_dump(exclude={"seconds"}) for record in state.history]


def fake_run(recipe, out: Path, **options):
    return run(recipe, out, progress=False, make_evaluator=lambda r, i: FakeEvaluator(), **options)


def test_resume_matches_and_lineage_rebuilds_with_mergekit(tmp_path, parents) -> None:
    data = {**m2n2_recipe(parents, children_per_step=2), "steps": 4, "keep_population": True}
    recipe = parse_recipe(data)
    whole = fake_run(recipe, tmp_path / "whole")
    assert whole.finished

    partial = fake_run(recipe, tmp_path / "split", stop_after=2)
    assert partial.step == 2 and not partial.finished
    resumed = fake_run(recipe, tmp_path / "split", resume=True)
    assert comparable_history(resumed) == comparable_history(whole)
    assert resumed.best == whole.best and resumed.search == whole.search
    assert_identical(tmp_path / "whole", tmp_path / "split")

    # the best is the archive member of highest plain performance
    archive = whole.search["archive"]
    performances = [whole.members[i].performance for i in archive]
    assert whole.best == archive[performances.index(max(performances))]

    # OUT/mergekit_config.yml rebuilds OUT's weights with MergeKit, bit for bit
    out = tmp_path / "whole"
    rebuilt = run_recipe(out / RECIPE_FILE, tmp_path / "re", intermediate_dir=tmp_path / "st")
    assert_identical(out, rebuilt)

    # and so does the deepest lineage of the archive (several slerp stages in a row)
    def depth(member_id: str) -> int:
        return sum(m.merge is not None for m in lineage(whole.members, member_id))

    deepest = max(archive, key=depth)
    assert depth(deepest) >= 2
    path = write_recipe(whole.members, deepest, tmp_path / "deep")
    rebuilt = run_recipe(path, tmp_path / "re-deep", intermediate_dir=tmp_path / "st-deep")
    assert_identical(member_dir(whole.members[deepest], out), rebuilt)
