"""Archive rules on hand-made archives: layout, pairing, fitness, replacement, lineage."""

from __future__ import annotations

import random

import pytest

from mergekit_sae.records import Member, MergeInput, MergeRecord, lineage, performance
from mergekit_sae.search.niches import best_index, worst_index
from mergekit_sae.search.sae_ga import plain_fitness, random_pairs, replacement_slot
from mergekit_sae.search.sae_operators import initial_layout, pruning_rates


def test_pruning_rates_spread_evenly() -> None:
    assert pruning_rates(3, 0.1, 0.6) == pytest.approx([0.1, 0.35, 0.6])
    assert pruning_rates(2, 0.1, 0.6) == pytest.approx([0.1, 0.6])
    assert pruning_rates(1, 0.1, 0.6) == pytest.approx([0.35])


def test_initial_layout_two_parents_six_slots() -> None:
    layout = initial_layout(2, 6, 0.1, 0.6)
    assert layout == [(0, None), (1, None), (0, 0.1), (1, 0.1), (0, 0.6), (1, 0.6)]


def test_initial_layout_uneven_variants() -> None:
    # 3 variants over 2 parents: parent 0 gets two (0.1, 0.6), parent 1 one (midpoint 0.35)
    layout = initial_layout(2, 5, 0.1, 0.6)
    assert layout == [(0, None), (1, None), (0, 0.1), (1, pytest.approx(0.35)), (0, 0.6)]


def test_initial_layout_only_parents_and_too_small() -> None:
    assert initial_layout(3, 3, 0.1, 0.6) == [(0, None), (1, None), (2, None)]
    with pytest.raises(ValueError, match="smaller than the 3 parents"):
        initial_layout(3, 2, 0.1, 0.6)


@pytest.mark.parametrize("size", [2, 5, 6, 9])
def test_random_pairs_are_disjoint_and_cover_floor_half(size: int) -> None:
    ids = [f"m{i}" for i in range(size)]
    pairs = random_pairs(ids, random.Random(7))
    assert len(pairs) == size // 2
    flat = [i for pair in pairs for i in pair]
    assert len(set(flat)) == len(flat) == 2 * (size // 2)
    assert set(flat) <= set(ids)


def test_random_pairs_follow_the_generator() -> None:
    ids = ["a", "b", "c", "d"]
    order = list(ids)
    random.Random(3).shuffle(order)
    assert random_pairs(ids, random.Random(3)) == [(order[0], order[1]), (order[2], order[3])]


def test_performance_and_fitness() -> None:
    assert performance({"a": 0.5, "b": 1.0}, {"a": 1.0, "b": 3.0}) == pytest.approx(0.875)
    assert plain_fitness(0.5, 0.4, 0.25) == pytest.approx(0.6)
    assert plain_fitness(0.5, 0.4, 0.0) == 0.5


def test_worst_and_best_break_ties_by_position() -> None:
    assert worst_index([0.3, 0.1, 0.1, 0.9]) == 1
    assert best_index([0.3, 0.9, 0.1, 0.9]) == 1


def test_replacement_only_when_strictly_fitter() -> None:
    fitnesses = [0.4, 0.2, 0.7]
    assert replacement_slot(fitnesses, 0.3) == 1
    assert replacement_slot(fitnesses, 0.2) is None
    assert replacement_slot(fitnesses, 0.1) is None


def test_sequential_replacement_keeps_the_fittest() -> None:
    population = [0.4, 0.2, 0.7, 0.5]
    for candidate in [0.6, 0.3, 0.45, 0.9]:
        slot = replacement_slot(population, candidate)
        if slot is not None:
            population[slot] = candidate
    assert sorted(population) == sorted([0.4, 0.2, 0.7, 0.5, 0.6, 0.3, 0.45, 0.9])[-4:]


def member(identifier: str, inputs: list[str], extra: str | None = None) -> Member:
    """A hand-made member made from inputs (plus an extra merge-only input)."""
    if not inputs:
        return Member(id=identifier, path=f"/{identifier}", origin="parent", source=identifier)
    merge_inputs = [MergeInput(member=i) for i in inputs]
    if extra:
        merge_inputs.append(MergeInput(member=extra, parameters={"dense_reference": True}))
    record = MergeRecord(method="sae_evolve", inputs=merge_inputs, dtype="float32")
    return Member(id=identifier, path=identifier, origin="offspring", inputs=inputs, merge=record)


def test_lineage_lists_ancestors_before_descendants() -> None:
    members = {
        m.id: m
        for m in [
            member("p0", []),
            member("p1", []),
            member("x", ["p0", "p1"]),
            member("y", ["x", "p1"], extra="p0"),
            member("unrelated", ["p0", "p1"]),
        ]
    }
    order = [m.id for m in lineage(members, "y")]
    assert set(order) == {"p0", "p1", "x", "y"}
    for m in order:
        for parent in members[m].inputs:
            assert order.index(parent) < order.index(m)
    assert order[-1] == "y"


def test_merge_input_names_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        MergeInput(member="a", model="b")
    with pytest.raises(ValueError, match="exactly one"):
        MergeInput()
