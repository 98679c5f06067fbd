"""The accuracy-sparsity front: pure rules, the run's outputs, and exports of evicted members."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from evolve_fixtures import FakeEvaluator, load_weights, recipe_data, task_files, tiny_llama
from hypothesis import given
from hypothesis import strategies as st

from mergekit_sae.merging.recipes import RECIPE_FILE, load_stages
from mergekit_sae.outputs import pareto
from mergekit_sae.outputs.export import export
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import run

# scores on a coarse grid so that ties and duplicates happen often
values = st.integers(min_value=0, max_value=6).map(lambda v: v / 6)


def make_points(pairs: list[tuple[float, float]]) -> list[pareto.Point]:
    return [
        pareto.Point(f"m{i:04d}", 1, zeros, mean, {"t": mean})
        for i, (mean, zeros) in enumerate(pairs)
    ]


def worse(a: pareto.Point, b: pareto.Point) -> bool:
    """Whether ``a`` is beaten by ``b``: no better in either objective, worse in one."""
    return (a.train_mean, a.zeros) != (b.train_mean, b.zeros) and (
        a.train_mean <= b.train_mean and a.zeros <= b.zeros
    )


@given(st.lists(st.tuples(values, values), min_size=1, max_size=25))
def test_front_is_exactly_the_non_dominated_set(pairs) -> None:
    candidates = make_points(pairs)
    front = pareto.front(candidates)
    on_front = {p.candidate for p in front}
    for point in front:
        assert not any(worse(point, other) for other in candidates)
    for point in candidates:
        if point.candidate not in on_front:
            assert any(worse(point, row) for row in front)
    assert [p.zeros for p in front] == sorted(p.zeros for p in front)


def test_front_of_a_hand_made_set() -> None:
    candidates = make_points(
        [(0.80, 0.0), (0.79, 0.2), (0.70, 0.1), (0.79, 0.2), (0.60, 0.5), (0.50, 0.5), (0.1, 0.4)]
    )
    assert [p.candidate for p in pareto.front(candidates)] == ["m0000", "m0001", "m0003", "m0004"]


def test_sparsest_within_uses_training_means_and_the_tolerance() -> None:
    front = make_points([(0.80, 0.0), (0.795, 0.2), (0.79, 0.3), (0.70, 0.6)])
    assert pareto.sparsest_within(front, 1.0).candidate == "m0002"  # 0.79 >= 0.80 - 0.01
    assert pareto.sparsest_within(front, 0.5).candidate == "m0001"
    assert pareto.sparsest_within(front, 0.0).candidate == "m0000"
    assert pareto.sparsest_within(front, 10.0).candidate == "m0003"


def test_cap_keeps_the_chosen_the_ends_and_a_spread() -> None:
    front = make_points([(1 - i / 20, i / 20) for i in range(10)])
    kept = pareto.cap(front, 4, keep=["m0006"])
    ids = [p.candidate for p in kept]
    assert len(ids) == 4 and {"m0000", "m0009", "m0006"} <= set(ids)
    assert ids == sorted(ids)  # front order
    assert "m0002" in ids or "m0003" in ids  # the widest remaining gap is filled
    assert pareto.cap(front, 20) == front


class SnapshotEvaluator(FakeEvaluator):
    """A fake evaluator that keeps every tensor it receives for each scored merge."""

    def __init__(self) -> None:
        super().__init__()
        self.receiving: dict[str, torch.Tensor] = {}
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def receive(self, name: str, tensor: torch.Tensor) -> None:
        super().receive(name, tensor)
        self.receiving[name] = tensor.detach().clone()

    def score_items(self, items):
        if self.receiving:
            self.snapshots.append(self.receiving)
            self.receiving = {}
        return super().score_items(items)

    def score(self, items):
        self.receiving = {}
        return super().score(items)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[list[Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("pareto")
    parents = [tiny_llama(root / "p0", 40, tied=True), tiny_llama(root / "p1", 41, tied=True)]
    return parents, task_files(root / "data")


def fake_recipe(setup, **overrides):
    parents, files = setup
    data = recipe_data(parents, files, steps=5, **overrides)
    data["tasks"] = [
        {"name": "a", "type": "lm_eval", "subsample": 10},
        {"name": "b", "type": "lm_eval"},
    ]
    return parse_recipe(data)


@pytest.mark.usefixtures("one_thread")
def test_run_writes_the_front_and_evicted_members_export_bit_identical(
    tmp_path: Path, setup
) -> None:
    evaluator = SnapshotEvaluator()
    recipe = fake_recipe(setup, select="sparsest_within", tolerance=5.0, pareto_max=3)
    out = tmp_path / "run"
    state = run(recipe, out, progress=False, make_evaluator=lambda r, i: evaluator)
    offspring = [child.id for record in state.history for child in record.offspring]
    weights = dict(zip(offspring, evaluator.snapshots, strict=True))

    # the front, computed here from the member records
    scored = [m for m in state.members.values() if m.scores]
    front = [
        m
        for m in scored
        if not any(
            o.performance >= m.performance
            and o.zero_fraction >= m.zero_fraction
            and (o.performance, o.zero_fraction) != (m.performance, m.zero_fraction)
            for o in scored
        )
    ]
    with (out / "pareto.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["candidate"] for r in rows) == sorted(m.id for m in front)
    assert list(rows[0]) == [
        "candidate", "step", "zeros", "train_mean", "test_mean", "a", "b", "train_a", "train_b"
    ]  # fmt: skip
    tested = [r for r in rows if r["test_mean"]]
    assert len(tested) == min(3, len(front))
    for row in tested:
        member = state.members[row["candidate"]]
        assert float(row["test_mean"]) == pytest.approx((float(row["a"]) + float(row["b"])) / 2)
        assert {"a": float(row["a"]), "b": float(row["b"])} == member.test_scores
        assert float(row["zeros"]) == member.zero_fraction
        assert int(row["step"]) == member.scored_at
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")

    # the final model: sparsest front member within 5 points of the front's top training mean
    top = max(m.performance for m in front)
    eligible = [m for m in front if m.performance >= top - 0.05 - 1e-12]
    chosen = max(eligible, key=lambda m: (m.zero_fraction, m.performance))
    assert state.best == chosen.id
    assert state.members[chosen.id].test_scores is not None

    # an evicted member (its weights are gone) is rebuilt bit-identical to what was scored
    living = set(state.history[-1].population_after)
    evicted = [i for i in offspring if i not in living and state.members[i].born > 1]
    assert evicted
    assert not (out / ".work" / "population" / evicted[-1]).exists()
    target = export(out, evicted[-1], tmp_path / "exported", device="cpu")
    rebuilt = load_weights(target)
    assert sorted(rebuilt) == sorted(weights[evicted[-1]])
    for name, tensor in weights[evicted[-1]].items():
        assert rebuilt[name].dtype == tensor.dtype
        assert torch.equal(rebuilt[name], tensor), name
    assert (target / "README.md").is_file() and (target / "config.json").is_file()
    assert (target / "tokenizer.json").is_file()
    stages = load_stages(target / RECIPE_FILE)
    assert "name" not in stages[-1]
    assert evicted[-1] in (target / "README.md").read_text()
