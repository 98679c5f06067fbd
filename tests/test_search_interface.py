"""The shared search interface: per-tensor settings, fitness sharing, budget, SAE, one-shots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from evolve_fixtures import FakeEvaluator, assert_identical, load_weights, tiny_llama

from mergekit_sae.merging.per_tensor import conditional, layer_groups, layer_of, resolve
from mergekit_sae.merging.recipes import RECIPE_FILE, run_recipe
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.recipe.schema import RecipeError
from mergekit_sae.run import run
from mergekit_sae.search import search_class, search_names
from mergekit_sae.search.base import Search
from mergekit_sae.search.niches import flat_items, shared_fitness
from mergekit_sae.search.sae import SaeSearch

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.10.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interface")
    return {
        "base": tiny_llama(root / "base", 30),
        "a": tiny_llama(root / "a", 31),
        "b": tiny_llama(root / "b", 32),
    }


def recipe(models: dict[str, Path], **overrides) -> dict:
    """A recipe of SAE's generational GA (``sae`` overrides merge into its block)."""
    data = {
        "models": [str(models["a"]), str(models["b"])],
        "base_model": str(models["base"]),
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 10} for name in "ab"],
        "steps": 3,
        "dtype": "float32",
        "device": "cpu",
        "test_baselines": [],
        "prune_target": "delta",
    }
    sae = {"framework": "ga", "archive_size": 4, **overrides.pop("sae", {})}
    data.update(overrides, sae=sae)
    return data


class CountingEvaluator(FakeEvaluator):
    """The fake evaluator, counting the training-item scorings (fitness evaluations)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def score_items(self, items):
        self.calls += 1
        return super().score_items(items)


def counted_run(data: dict, out: Path, **options):
    evaluator = CountingEvaluator()
    state = run(
        parse_recipe(data), out, progress=False, make_evaluator=lambda r, i: evaluator, **options
    )
    return state, evaluator


def test_resolve_follows_mergekit_filter_rules() -> None:
    from mergekit.config import ConditionalParameter, evaluate_setting

    setting = [
        {"filter": "layers.1.", "value": 0.25},
        {"filter": "lm_head", "value": 0.75},
        {"value": 0.5},
    ]
    mergekit_form = [ConditionalParameter(**entry) for entry in setting]
    for name in NAMES:
        expected = evaluate_setting(name, mergekit_form, validate=float)
        assert resolve(setting, name) == expected, name
    assert resolve(0.3, "anything") == 0.3
    with pytest.raises(ValueError, match="no filter"):
        resolve([{"filter": "x", "value": 1.0}], "model.norm.weight")


def test_conditional_gives_every_tensor_its_value() -> None:
    values = {name: 0.5 for name in NAMES}
    values["model.layers.1.mlp.up_proj.weight"] = 0.9
    values["model.layers.1.input_layernorm.weight"] = 0.9
    values["model.layers.0.mlp.up_proj.weight"] = 0.1  # layer 0 mixed
    values["lm_head.weight"] = 0.7
    setting = conditional(values)
    assert {name: resolve(setting, name) for name in NAMES} == values
    assert {"filter": "layers.1.", "value": 0.9} in setting
    assert setting[-1] == {"value": 0.5}
    assert conditional({name: 0.2 for name in NAMES}) == 0.2


def test_conditional_refuses_a_name_inside_another() -> None:
    with pytest.raises(ValueError, match="part of the name"):
        conditional({"norm.weight": 1.0, "model.norm.weight": 2.0, "x": 2.0})


def test_layer_groups_and_layer_of() -> None:
    assert [layer_of(n) for n in NAMES] == [None, 0, 0, 1, 1, 10, None, None]
    groups = layer_groups(NAMES, 2)
    assert groups == [
        NAMES[1:5],
        [NAMES[5]],
        [NAMES[0], NAMES[6], NAMES[7]],
    ]
    assert layer_groups(NAMES, 0) == [NAMES]


def test_shared_fitness_by_hand() -> None:
    scores = [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]]
    # column totals 3, 1, 1, 0 (-> 1): f = sum_j s_ij / z_j
    assert shared_fitness(scores, 1.0) == pytest.approx([1 / 3 + 1, 1 / 3 + 1, 1 / 3])
    assert shared_fitness(scores, 0.0) == [2, 2, 1]
    weighted = shared_fitness(scores, 1.0, [0.5, 0.5, 2.0, 2.0])
    assert weighted == pytest.approx([0.5 / 3 + 0.5, 0.5 / 3 + 2.0, 0.5 / 3])
    with pytest.raises(ValueError):
        shared_fitness([[1, 0], [1]], 1.0)


def test_flat_items_weights_give_the_performance() -> None:
    items = {"a": [1.0, 0.0, 1.0, 1.0], "b": [0.0, 1.0]}
    weights = {"a": 1.0, "b": 3.0}
    row, item_weights = flat_items(items, weights)
    performance = (1.0 * 0.75 + 3.0 * 0.5) / 4.0
    assert sum(s * w for s, w in zip(row, item_weights, strict=True)) == pytest.approx(performance)


def test_every_registered_search_implements_the_interface() -> None:
    for name in search_names():
        cls = search_class(name)
        assert issubclass(cls, Search) and cls.name == name
        cls.settings_model()  # every setting has a default
    with pytest.raises(ValueError, match="unknown search"):
        search_class("nope")


def test_recipe_validates_search_blocks(models) -> None:
    with pytest.raises(RecipeError, match="unknown search 'nope'"):
        parse_recipe(recipe(models, search="nope"))
    with pytest.raises(RecipeError, match=r"sae\.bogus"):
        parse_recipe(recipe(models, sae={"bogus": 1}))
    with pytest.raises(RecipeError, match=r"sae\.alpha"):
        parse_recipe(recipe(models, sae={"alpha": -1}))
    with pytest.raises(RecipeError, match="needs rescore: true"):
        parse_recipe(recipe(models, sae={"fitness": "shared", "rescore": False}))
    parsed = parse_recipe(recipe(models, sae={"fitness": "shared"}))
    assert parsed.settings_for().fitness == "shared"


def test_sae_natural_budget_is_what_a_run_uses(tmp_path: Path, models) -> None:
    data = recipe(models)
    parsed = parse_recipe(data)
    state, evaluator = counted_run(data, tmp_path / "a")
    expected = SaeSearch.natural_budget(parsed, parsed.settings_for())  # dispatches to the GA
    assert expected == 3 * (4 + 2)
    assert state.evaluations == evaluator.calls == expected
    assert [r.evaluations for r in state.history] == [6, 12, 18]
    no_rescore = recipe(models, sae={"rescore": False})
    state, evaluator = counted_run(no_rescore, tmp_path / "b")
    assert evaluator.calls == state.evaluations == 4 + 3 * 2


def test_budget_cuts_a_step_short_and_the_run_finishes(tmp_path: Path, models) -> None:
    state, evaluator = counted_run(recipe(models, steps=50, budget=8), tmp_path / "cut")
    assert evaluator.calls == state.evaluations == 8
    assert state.finished and state.step == 2
    last = state.history[-1]
    assert len(last.offspring) == 0  # step 2 could only re-score 2 of the 4 members
    assert (tmp_path / "cut" / RECIPE_FILE).is_file()


def test_budget_resume_matches_uninterrupted(tmp_path: Path, models) -> None:
    data = recipe(models, steps=50, budget=14, sae={"fitness": "shared"})
    whole, _ = counted_run(data, tmp_path / "whole")
    counted_run(data, tmp_path / "split", stop_after=1)
    resumed, evaluator = counted_run(data, tmp_path / "split", resume=True)
    assert evaluator.calls == 14 - 6
    strip = [r.model_dump(exclude={"seconds"}) for r in whole.history]
    assert [r.model_dump(exclude={"seconds"}) for r in resumed.history] == strip
    assert_identical(tmp_path / "whole", tmp_path / "split")


def test_shared_fitness_replacement_by_hand(models) -> None:
    from types import SimpleNamespace

    from mergekit_sae.records import Member
    from mergekit_sae.search.base import Result

    shared = {"fitness": "shared", "alpha": 1.0, "sparsity_term": {"weight": 0.0}}
    parsed = parse_recipe(recipe(models, sae=shared))
    search = SaeSearch.create(parsed, parsed.settings_for())
    members = {
        i: Member(id=i, path=i, origin="pruned", performance=p, fitness=p)
        for i, p in [("m1", 0.75), ("m2", 0.5), ("m3", 0.5)]
    }
    rows = {  # task a: 2 items, task b: 2 items (equal task weights: each item weighs 1/4)
        "m1": {"a": [1.0, 1.0], "b": [1.0, 0.0]},
        "m2": {"a": [1.0, 1.0], "b": [0.0, 0.0]},
        "m3": {"a": [1.0, 0.0], "b": [1.0, 0.0]},
    }
    child = Member(id="c", path="c", origin="offspring", performance=0.25, fitness=0.25)
    unique = Result(child, {"a": [0.0, 0.0], "b": [0.0, 1.0]})  # solves what nobody solves
    driver = SimpleNamespace(members={**members, "c": child}, task_weights={"a": 1.0, "b": 1.0})
    # column totals with the child: a: 3, 2; b: 2, 1 -> shared fitness
    # m1 = (1/3 + 1/2 + 1/2) / 4, m2 = (1/3 + 1/2) / 4, m3 = (1/3 + 1/2) / 4, c = 1 / 4
    slot = search.replacement(driver, ["m1", "m2", "m3"], rows, unique)
    assert slot == 1  # m2 and m3 tie below the child: the earliest goes
    plain = SaeSearch.create(
        parse_recipe(recipe(models)), parse_recipe(recipe(models)).settings_for()
    )
    assert plain.replacement(driver, ["m1", "m2", "m3"], rows, unique) is None  # 0.25 < 0.5
    copy = Result(child, {"a": [1.0, 1.0], "b": [0.0, 0.0]})  # the same items as m2
    # totals a: 4, 3; b: 2, 0(->1): m2 = c = (1/4 + 1/3) / 4 < m3 = (1/4 + 1/2) / 4: no gain
    assert search.replacement(driver, ["m1", "m2", "m3"], rows, copy) is None


def test_oneshot_linear_equals_mergekit_and_rebuilds(tmp_path: Path, models) -> None:
    from mergekit.merge_methods import merge_state_dicts

    data = recipe(models, search="oneshot", oneshot={"method": "linear"}, steps=1)
    state, evaluator = counted_run(data, tmp_path / "linear")
    assert evaluator.calls == 0 and state.evaluations == 0 and state.finished
    a, b = load_weights(models["a"]), load_weights(models["b"])
    expected = merge_state_dicts(
        {"a": a, "b": b}, "linear", parameters={"weight": 1.0, "normalize": True}
    )
    written = load_weights(tmp_path / "linear")
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor.to(written[name].dtype)), name
    rebuilt = run_recipe(tmp_path / "linear" / RECIPE_FILE, tmp_path / "re")
    assert_identical(tmp_path / "linear", rebuilt)


def test_sae_oneshot_costs_one_evaluation_per_expert(tmp_path: Path, models) -> None:
    data = recipe(models, search="oneshot", oneshot={"method": "sae_oneshot"}, steps=1)
    state, evaluator = counted_run(data, tmp_path / "sae1")
    assert evaluator.calls == state.evaluations == 2
    made = state.members[state.best]
    assert made.merge.method == "sae_evolve"
    assert made.merge.parameters["offspring_density"] == pytest.approx(1 - 0.35)
    scores = [i.parameters["score"] for i in made.merge.inputs]
    parents = [state.members[i] for i in made.inputs]
    assert scores == [p.performance for p in parents]
    rebuilt = run_recipe(tmp_path / "sae1" / RECIPE_FILE, tmp_path / "re1")
    assert_identical(tmp_path / "sae1", rebuilt)
