"""SAE on M2N2's framework: its rules by hand, its budget, resume and MergeKit rebuilds."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from evolve_fixtures import FakeEvaluator, assert_identical, load_weights, tiny_llama

from mergekit_sae.merging.recipes import RECIPE_FILE, recipe_documents, run_recipe
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.records import lineage
from mergekit_sae.run import run
from mergekit_sae.search.niches import (
    EXCLUDED,
    attraction,
    choose_parents,
    eviction_slot,
    fate,
    item_fitness,
    place_child,
    selection_probabilities,
)
from mergekit_sae.search.sae import (
    SaeSearch,
    child_tick,
    result_index,
    selection_term,
    sparsity_terms,
    total_scores,
)
from mergekit_sae.search.sae_ga import SaeGaSearch
from mergekit_sae.search.sae_settings import SaeSettings, Schedule, SparsityTerm

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 members x 4 items of weight 1/4: members 0 and 1 share item 0, each solves one item alone,
# member 2 solves nothing, and nobody solves item 3 (an all-zero column).
S = [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
W = [0.25] * 4
ZEROS = [0.0, 0.4, 0.7]  # member 2 is the sparsest


def test_sparsity_terms_linear_and_softmax() -> None:
    assert sparsity_terms(ZEROS, "linear") == ZEROS
    exps = [math.exp(z / 0.5) for z in ZEROS]
    expected = [e / sum(exps) for e in exps]
    assert sparsity_terms(ZEROS, "softmax", 0.5) == pytest.approx(expected)
    assert sum(sparsity_terms(ZEROS, "softmax", 2.0)) == pytest.approx(1.0)


def test_total_scores_by_hand_with_a_cap_and_an_all_zero_column() -> None:
    # column totals 2, 1, 1, 0 (-> 1): F0 = (1/2 + 1) / 4, F1 = (1/2 + 1) / 4, F2 = 0
    term = SparsityTerm(form="linear", weight=0.5, max_zeros=None)
    assert total_scores(S, W, ZEROS, 1.0, term) == pytest.approx([0.375, 0.575, 0.35])
    capped = SparsityTerm(form="linear", weight=0.5, max_zeros=0.6)
    totals = total_scores(S, W, ZEROS, 1.0, capped)
    assert totals[:2] == pytest.approx([0.375, 0.575]) and totals[2] == EXCLUDED
    # alpha 0: no competition, the fitness is the performance (items weigh 1/4)
    plain = total_scores(S, W, ZEROS, 0.0, SparsityTerm(weight=0.0, max_zeros=None))
    assert plain == pytest.approx([0.5, 0.5, 0.0])
    softmax = SparsityTerm(form="softmax", weight=0.2, temperature=1.0, max_zeros=None)
    exps = [math.exp(z) for z in ZEROS]
    expected = [f + 0.2 * e / sum(exps) for f, e in zip([0.375, 0.375, 0.0], exps, strict=True)]
    assert total_scores(S, W, ZEROS, 1.0, softmax) == pytest.approx(expected)


def test_selection_without_sparsity_keeps_only_the_cap() -> None:
    term = SparsityTerm(form="linear", weight=0.5, max_zeros=0.6)
    assert selection_term(term, True) is term
    totals = total_scores(S, W, ZEROS, 1.0, selection_term(term, False))
    # the shared fitness alone (F0 = F1 = 0.375, by hand above), member 2 still over the cap
    assert totals[:2] == pytest.approx([0.375, 0.375]) and totals[2] == EXCLUDED
    # the answer still weighs the term: member 1 (0.5 + 0.5 * 0.4) over member 0 (0.5)
    assert result_index([0.5, 0.5, 0.0], ZEROS, term) == 1


def test_selection_probabilities_never_normalise_negative_or_capped_scores() -> None:
    assert selection_probabilities([0.375, 0.575, EXCLUDED]) == pytest.approx(
        [0.375 / 0.95, 0.575 / 0.95, 0.0]
    )
    assert selection_probabilities([0.375, 0.575, 0.35], exclude=1) == pytest.approx(
        [0.375 / 0.725, 0.0, 0.35 / 0.725]
    )
    # nothing positive: uniform over those not capped (a negative score is not a weight)
    assert selection_probabilities([-0.2, 0.0, EXCLUDED]) == [0.5, 0.5, 0.0]
    # everything capped: uniform over all but the excluded one
    assert selection_probabilities([EXCLUDED, EXCLUDED, EXCLUDED], exclude=0) == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="no member"):
        selection_probabilities([1.0], exclude=0)


def test_first_parent_by_total_second_by_attraction() -> None:
    term = SparsityTerm(form="linear", weight=0.5, max_zeros=None)
    totals = total_scores(S, W, ZEROS, 1.0, term)
    counts = {}
    rng = random.Random(5)
    for _ in range(4000):
        pair = choose_parents(S, W, totals, 1.0, rng)
        counts[pair] = counts.get(pair, 0) + 1
    # attraction to member 0: member 1 gains item 2 (1/4), member 2 gains nothing: 1 is its mate;
    # attraction to member 1: member 0 gains item 1; to member 2: both gain, in proportion
    pulls = [attraction(item_fitness(S, 1.0, W), first) for first in range(3)]
    assert pulls[0] == pytest.approx([0.0, 0.25, 0.0]) and pulls[2][:2] == [0.375, 0.375]
    first = [t / sum(totals) for t in totals]
    expected = {
        (0, 1): first[0],
        (1, 0): first[1],
        (2, 0): first[2] / 2,
        (2, 1): first[2] / 2,
    }
    assert set(counts) == set(expected)
    for pair, share in expected.items():
        assert counts[pair] / 4000 == pytest.approx(share, abs=0.03), pair


def test_capped_members_are_never_parents() -> None:
    capped = SparsityTerm(form="linear", weight=0.5, max_zeros=0.6)
    totals = total_scores(S, W, ZEROS, 1.0, capped)
    rng = random.Random(1)
    pairs = {choose_parents(S, W, totals, 1.0, rng) for _ in range(300)}
    assert pairs == {(0, 1), (1, 0)}
    pairs = {choose_parents(S, W, totals, 1.0, rng, matchmaker=False) for _ in range(300)}
    assert pairs == {(0, 1), (1, 0)}


def test_eviction_appends_until_full_then_drops_the_lowest() -> None:
    assert eviction_slot([0.4, 0.1, 0.2], capacity=3) == 2  # two members, room for the child
    assert eviction_slot([0.4, 0.1, 0.3, 0.2], capacity=3) == 1
    assert eviction_slot([0.4, 0.3, 0.2, 0.1], capacity=3) is None  # the child is the worst
    assert eviction_slot([0.4, 0.2, 0.3, 0.2], capacity=3) == 1  # a tie drops the member
    assert eviction_slot([0.4, EXCLUDED, 0.3, 0.0], capacity=3) == 1  # over the cap goes first


def test_the_answer_is_the_best_performance_plus_sparsity_term() -> None:
    term = SparsityTerm(form="linear", weight=0.5, max_zeros=None)
    assert result_index([0.6, 0.5, 0.3], [0.0, 0.4, 0.1], term) == 1  # 0.6 < 0.5 + 0.2
    assert result_index([0.6, 0.5, None], [0.0, 0.1, 0.9], term) == 0  # never scored
    capped = SparsityTerm(form="linear", weight=0.5, max_zeros=0.3)
    assert result_index([0.6, 0.5, 0.3], [0.0, 0.4, 0.1], capped) == 0
    assert result_index([0.6, 0.7], [0.9, 0.8], capped) == 1  # only capped members are left


# --- runs on tiny models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sae")
    return {
        name: tiny_llama(root / name, seed) for seed, name in ((60, "base"), (61, "a"), (62, "b"))
    }


def recipe(models: dict[str, Path], **sae) -> dict:
    """A niches SAE recipe over the tiny models (FakeEvaluator tasks a and b)."""
    return {
        "models": [str(models["a"]), str(models["b"])],
        "base_model": str(models["base"]),
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 10} for name in "ab"],
        "steps": 3,
        "prune_target": "delta",
        "dtype": "float32",
        "device": "cpu",
        "test_baselines": [],
        "sae": {"archive_size": 4, "children_per_step": 2, **sae},
    }


class Counting(FakeEvaluator):
    """Counts training-item scorings; with ``stop_at`` raises on that call (a stop mid-step)."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.calls, self.stop_at = 0, stop_at

    def score_items(self, items):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt("stopped mid-step")
        return super().score_items(items)


def counted(data: dict, out: Path, evaluator: Counting | None = None, **options):
    evaluator = evaluator or Counting()
    state = run(
        parse_recipe(data), out, progress=False, make_evaluator=lambda r, i: evaluator, **options
    )
    return state, evaluator


def test_framework_picks_the_loop(models) -> None:
    niches = parse_recipe(recipe(models))
    assert type(SaeSearch.create(niches, niches.settings_for())) is SaeSearch
    ga = parse_recipe(recipe(models, framework="ga", children_per_step=4))
    assert type(SaeSearch.create(ga, ga.settings_for())) is SaeGaSearch


@pytest.mark.parametrize(
    ("sae", "expected"),
    [
        ({}, 4 + 3 * 2),  # the archive once, then one evaluation per child
        ({"redraw_every": 2}, 4 + 4 + 3 * 2),  # step 3 re-draws items: the archive again
        ({"crossover": "slerp"}, 4 + 3 * 2),  # pruning and SLERP stages are not evaluations
        ({"initial_variants": False}, 2 + 3 * 2),  # the two dense parents, then the children
        ({"initial_variants": False, "redraw_every": 2}, 2 + 4 + 3 * 2),  # full by step 3
    ],
)
def test_every_child_costs_one_evaluation(tmp_path: Path, models, sae, expected) -> None:
    data = recipe(models, **sae)
    parsed = parse_recipe(data)
    assert SaeSearch.natural_budget(parsed, parsed.settings_for()) == expected
    state, evaluator = counted(data, tmp_path / "run")
    assert evaluator.calls == state.evaluations == expected
    children = [m for m in state.members.values() if m.origin == "offspring"]
    assert len(children) == 3 * 2 and all(m.scored_at for m in children)
    assert [r.evaluations for r in state.history][-1] == expected
    draws = {r.step: r.info["total_before"] for r in state.history}
    assert len(draws) == 3


def test_a_budget_stops_mid_step(tmp_path: Path, models) -> None:
    data = {**recipe(models, children_per_step=3), "budget": 9}
    state, evaluator = counted(data, tmp_path / "cut")
    assert evaluator.calls == state.evaluations == 9 and state.finished
    assert [len(r.info["children"]) for r in state.history] == [3, 2]


def rates_at_or_under(cap: float, count: int) -> list[float]:
    """The first ``count`` rates of the default schedule that are at most ``cap``."""
    schedule, rates, tick = Schedule(), [], 0
    while len(rates) < count:
        rates += [schedule.rate(tick)] if schedule.rate(tick) <= cap else []
        tick += 1
    return rates


def test_children_prune_parents_and_child_at_the_schedule_rate(tmp_path: Path, models) -> None:
    data = {**recipe(models, crossover="sae_evolve"), "keep_population": True}
    state, _ = counted(data, tmp_path / "run")
    children = [m for m in state.members.values() if m.origin == "offspring"]
    for rate, child in zip(rates_at_or_under(0.5, 6), children, strict=True):
        assert child.merge.method == "sae_evolve"
        assert child.merge.parameters["offspring_density"] == pytest.approx(1 - rate)
        assert child.merge.parameters["prune_target"] == "delta"
        for item in child.merge.inputs:
            assert item.parameters["density"] == pytest.approx(1 - rate)
            assert item.parameters["score"] == state.members[item.member].performance
    dense = recipe(models, crossover="sae_evolve", prune_parents=False, prune_child=False)
    state, _ = counted(dense, tmp_path / "dense")
    for child in (m for m in state.members.values() if m.origin == "offspring"):
        assert child.merge.parameters["offspring_density"] == 1.0
        assert all(i.parameters["density"] == 1.0 for i in child.merge.inputs)


def test_slerp_children_are_a_chain_of_stages(tmp_path: Path, models) -> None:
    """Default operator: parents pruned (sae_prune), blended (slerp), the blend pruned."""
    state, _ = counted(recipe(models), tmp_path / "run")
    children = [m for m in state.members.values() if m.origin == "offspring"]
    for rate, child in zip(rates_at_or_under(0.5, 6), children, strict=True):
        assert child.merge.method == "sae_prune"
        assert child.merge.inputs[0].parameters["density"] == pytest.approx(1 - rate)
        (blend,) = [state.members[i] for i in child.inputs]
        assert blend.merge.method == "slerp" and blend.scored_at is None
        ends = [blend.merge.base_member, blend.merge.inputs[0].member]
        for end in ends:
            pruned = state.members[end]
            assert pruned.merge.method == "sae_prune" and pruned.origin == "pruned"
            assert pruned.merge.inputs[0].parameters["density"] == pytest.approx(1 - rate)


def cosine_rate(t: int, cycle: int, s_min: float = 0.1, s_max: float = 0.6) -> float:
    """The schedule's rate at position t of a cycle of length ``cycle``, written out."""
    return s_min + (s_max - s_min) * (1 - math.cos(math.pi * t / (cycle - 1))) / 2


def test_child_tick_skips_the_rates_above_the_cap() -> None:
    # cycles of 3 then 6: rates 0.1, 0.35, 0.6 | 0.1, 0.148, 0.273, 0.427, 0.552, 0.6 | 0.1 ...
    rates = [cosine_rate(t, 3) for t in range(3)] + [cosine_rate(t, 6) for t in range(6)]
    schedule = Schedule()
    assert [schedule.rate(t) for t in range(9)] == pytest.approx(rates)
    above = [t for t, r in enumerate(rates) if r > 0.5]
    assert above == [2, 7, 8]
    # under a cap of 0.5 a skipped tick moves to the next cycle's start (tick 3, tick 9)
    assert [child_tick(schedule, t, 0.5) for t in range(9)] == [0, 1, 3, 3, 4, 5, 6, 9, 9]
    assert [child_tick(schedule, t, None) for t in range(9)] == list(range(9))
    assert child_tick(schedule, 1, 0.35) == 1  # a rate equal to the cap is kept
    assert child_tick(schedule, 2, 0.6) == 2
    with pytest.raises(ValueError, match="above the cap"):
        child_tick(Schedule(s_min=0.3), 0, 0.2)


def test_rates_under_cap_needs_a_rate_under_the_cap(models) -> None:
    high = {"s_min": 0.6, "s_max": 0.6}
    message = r"sae.schedule.s_min \(0.6\) is above sae.sparsity_term.max_zeros \(0.5\)"
    with pytest.raises(ValueError, match=message):
        parse_recipe(recipe(models, schedule=high))
    # each of these leaves the children's rates alone (or puts 0.6 under the cap): it stands
    for sae, skips in (
        ({"rates_under_cap": False}, False),
        ({"prune_child": False}, False),
        ({"sparsity_term": {"max_zeros": None}}, False),
        ({"sparsity_term": {"max_zeros": 0.6}}, True),
    ):
        settings = parse_recipe(recipe(models, schedule=high, **sae)).settings_for()
        assert settings.skips_rates_above_cap("zero_count") is skips
    # under the magnitude measure a rate does not bound the zeros: nothing is skipped
    data = {**recipe(models, schedule=high), "sparsity_measure": "magnitude"}
    assert not parse_recipe(data).settings_for().skips_rates_above_cap("magnitude")
    assert parse_recipe(recipe(models)).settings_for().skips_rates_above_cap("zero_count")
    with pytest.raises(ValueError, match="rates_under_cap is not read under framework 'ga'"):
        SaeSettings(framework="ga", rates_under_cap=False)
    with pytest.raises(ValueError, match="select_by_sparsity is not read under framework 'ga'"):
        SaeSettings(framework="ga", select_by_sparsity=True)


def test_under_a_cap_no_child_is_pruned_past_it(tmp_path: Path, models) -> None:
    state, evaluator = counted(recipe(models), tmp_path / "run")  # the default
    children = [m for m in state.members.values() if m.origin == "offspring"]
    # 6 children at ticks 0, 1, 3, 4, 5, 6 (tick 2 is above the cap): no evaluation skipped
    expected = [cosine_rate(0, 3), cosine_rate(1, 3), *(cosine_rate(t, 6) for t in range(4))]
    densities = [c.merge.inputs[0].parameters["density"] for c in children]
    assert densities == pytest.approx([1 - r for r in expected])
    assert all(c.zero_fraction <= 0.5 for c in children)
    assert evaluator.calls == state.evaluations == 4 + 6
    assert state.search["children"] == 7
    plain, _ = counted(recipe(models, rates_under_cap=False), tmp_path / "plain")
    over = [m for m in plain.members.values() if m.origin == "offspring" and m.zero_fraction > 0.5]
    assert len(over) == 1  # tick 2 (rate 0.6): a child the cap excludes


def test_without_initial_variants_the_archive_grows_from_the_parents(
    tmp_path: Path, models
) -> None:
    state, _ = counted(recipe(models, initial_variants=False), tmp_path / "run")
    parents = [m.id for m in state.members.values() if m.origin == "parent"]
    assert state.history[0].population_before == parents  # no pruned copies
    pruned = [m for m in state.members.values() if m.origin == "pruned"]
    assert pruned and all(m.performance is None for m in pruned)  # only parents pruned to merge
    first = state.history[0].offspring
    assert [child.replaced for child in first] == [None, None]  # both join: 2 of 4 places free
    assert state.history[0].population_after == [*parents, *(child.id for child in first)]
    assert len(state.search["archive"]) == 4  # full from then on


def test_without_select_by_sparsity_the_archive_totals_are_the_shared_fitness(
    tmp_path: Path, models
) -> None:
    # the shared fitness of an archive sums to the share of items it solves, whoever holds them;
    # only the term (weight x zeros) comes on top of it, and only when it enters the selection
    weight = SaeSettings().sparsity_term.weight
    shares, terms = [], []
    for flag in (True, False):
        state, _ = counted(recipe(models, select_by_sparsity=flag), tmp_path / str(flag))
        for record in state.history:
            totals = record.info["archive_total"]
            term = weight * sum(state.members[i].sparsity for i in totals)
            shares.append(sum(totals.values()) - (term if flag else 0.0))
            terms.append(term)
    assert min(terms) > 0.0  # sparse members in every archive: the term would show
    assert shares == pytest.approx([shares[0]] * len(shares))


def test_the_ga_takes_slerp_children(tmp_path: Path, models) -> None:
    data = recipe(models, framework="ga", children_per_step=4)
    state, evaluator = counted(data, tmp_path / "ga")
    children = [m for m in state.members.values() if m.origin == "offspring"]
    assert len(children) == 3 * 2  # floor(4 / 2) pairs per step
    for child in children:
        (blend,) = [state.members[i] for i in child.inputs]
        assert (child.merge.method, blend.merge.method) == ("sae_prune", "slerp")
        rate = parse_recipe(data).settings_for().schedule.rate(child.born - 1)
        assert child.merge.inputs[0].parameters["density"] == pytest.approx(1 - rate)
    assert evaluator.calls == state.evaluations == 3 * (4 + 2)


def test_archive_follows_the_eviction_rule(tmp_path: Path, models) -> None:
    state, _ = counted(recipe(models), tmp_path / "run")
    archive = list(state.history[0].population_before)
    for record in state.history:
        assert record.population_before == archive
        for child in record.info["children"]:
            fate = child["fate"]
            if fate.startswith("replaced "):
                archive[archive.index(fate.split()[1])] = child["id"]
            else:
                assert fate == "rejected" and child["id"] not in record.population_after
        assert record.population_after == archive
        assert set(record.info["archive_total"]) == set(archive)
        lowest = min(record.info["archive_total"].values())
        assert lowest > EXCLUDED


def test_stop_mid_step_then_resume_is_bit_identical(tmp_path: Path, models) -> None:
    data = recipe(models, crossover="slerp")
    whole, _ = counted(data, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):  # call 7: the archive (4), then step 2's 1st child
        counted(data, tmp_path / "split", Counting(stop_at=7))
    resumed, evaluator = counted(data, tmp_path / "split", resume=True)
    assert evaluator.calls == whole.evaluations - 6  # step 2 is made again, from its start
    strip = [r.model_dump(exclude={"seconds"}) for r in whole.history]
    assert [r.model_dump(exclude={"seconds"}) for r in resumed.history] == strip
    assert resumed.best == whole.best
    assert_identical(tmp_path / "whole", tmp_path / "split")


@pytest.mark.parametrize("crossover", ["sae_evolve", "slerp"])
def test_the_answer_rebuilds_with_mergekit(tmp_path: Path, models, crossover) -> None:
    # a heavy term in the selection breeds sparse members from sparse parents: a deep lineage
    data = recipe(
        models, crossover=crossover, sparsity_term={"weight": 2.0}, select_by_sparsity=True
    )
    data["steps"] = 4
    state, _ = counted(data, tmp_path / "run")
    chain = lineage(state.members, state.best)
    methods = {m.merge.method for m in chain if m.merge}
    assert len([m for m in chain if m.merge]) >= 2, "the answer should be a merge of merges"
    if crossover == "slerp":
        assert {"sae_prune", "slerp"} <= methods
    documents = recipe_documents(state.members, state.best)
    assert len(documents) >= len([m for m in chain if m.merge])  # a stage per merge at least
    rebuilt = run_recipe(
        tmp_path / "run" / RECIPE_FILE, tmp_path / "re", intermediate_dir=tmp_path / "st"
    )
    assert_identical(tmp_path / "run", rebuilt)
    zeros = sum(int((t == 0).sum()) for t in load_weights(rebuilt).values())
    assert zeros == 0  # pruning the task vectors leaves the base's (non-zero) values


def test_place_child_appends_replaces_or_rejects() -> None:
    archive, rows = ["a", "b"], {"a": [1.0], "b": [0.0]}
    assert place_child(archive, rows, "c", [0.5], 2) is None and archive == ["a", "b", "c"]
    assert fate(2, None) == "joined" and rows["c"] == [0.5]
    assert place_child(archive, rows, "d", [0.7], 1) == "b" and archive == ["a", "d", "c"]
    assert "b" not in rows and rows["d"] == [0.7] and fate(1, "b") == "replaced b"
    assert place_child(archive, rows, "e", [0.0], None) is None and "e" not in rows
    assert archive == ["a", "d", "c"] and fate(None, None) == "rejected"
