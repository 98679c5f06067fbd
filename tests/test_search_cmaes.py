"""CMA-ES search: MergeKit's genome decoding, per-tensor values, replay, budget, resume, rebuild."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from evolve_fixtures import FakeEvaluator, assert_identical, tiny_llama

from mergekit_sae.driver.checkpoint import load_state
from mergekit_sae.errors import RecipeError
from mergekit_sae.merging.per_tensor import layer_groups, resolve
from mergekit_sae.merging.recipes import RECIPE_FILE, load_stages, run_recipe
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import run
from mergekit_sae.search.cmaes import (
    CmaesSettings,
    CmaesState,
    Generation,
    candidate_record,
    decode,
    initial_genotype,
    numpy_rng_kept,
    replay,
    tensor_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]
# granularity 1: layer 0, layer 1, then the tensors outside the layers
GROUP_BY_HAND = {NAMES[0]: 2, NAMES[1]: 0, NAMES[2]: 0, NAMES[3]: 1, NAMES[4]: 1}
GROUP_BY_HAND |= {NAMES[5]: 2, NAMES[6]: 2}


# --- genome -------------------------------------------------------------------------------


def test_initial_genotype_and_decoding_by_hand() -> None:
    assert initial_genotype(2, 2, "ties") == [0.5, 1.0] * 4
    assert initial_genotype(1, 4, "linear") == [0.25] * 4
    # group 0: model 0 (w=-0.3, d=1.7), model 1 (w=2.5, d=-0.2); group 1: model 0, model 1
    genotype = [-0.3, 1.7, 2.5, -0.2, 0.1, -1.4, -0.0, 0.6]
    values = decode(genotype, 2, 2, "ties")
    assert values.shape == (2, 2, 2)
    assert values[0, 0].tolist() == [0.3, 1.0]  # weight abs, density clamped after abs
    assert values[0, 1].tolist() == [2.5, 0.2]  # weight not clamped, density abs
    assert values[1, 0].tolist() == [0.1, 1.0]
    assert values[1, 1].tolist() == [0.0, 0.6]
    assert decode([-2.0, 3.0], 1, 2, "linear").tolist() == [[[2.0], [3.0]]]


def test_decoding_matches_mergekit_genome(models: dict[str, Path]) -> None:
    """MergeKit's own ModelGenome decodes the layer groups to the same per-model values."""
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition

    for granularity in (0, 1):
        definition = ModelGenomeDefinition(
            models=[str(models["e0"]), str(models["e1"])],
            merge_method="ties",
            base_model=str(models["base"]),
            layer_granularity=granularity,
        )
        genome = ModelGenome(definition)
        n_layer_groups = 1 if granularity == 0 else 2
        ours = len(layer_groups(NAMES, granularity))
        assert ours == (1 if granularity == 0 else 3)
        x0 = initial_genotype(ours, 2, "ties")
        assert x0[: 4 * n_layer_groups] == genome.initial_genotype().view(-1).tolist()
        rng = np.random.default_rng(granularity)
        genotype = rng.normal(0.4, 0.8, size=4 * ours).tolist()
        layer_part = genotype[: 4 * n_layer_groups]
        config = genome.genotype_merge_config(np.asarray(layer_part))
        values = decode(genotype, ours, 2, "ties")
        for group, output_slice in enumerate(config.slices):
            sources = [s for s in output_slice.sources if s.parameters]
            for model, source in enumerate(sources):
                assert source.parameters["weight"] == values[group, model, 0]
                assert source.parameters["density"] == values[group, model, 1]
        assert config.parameters["normalize"] is True


@pytest.mark.parametrize("granularity", [1, 0])
def test_genome_to_per_tensor_parameters(granularity: int) -> None:
    groups = layer_groups(NAMES, granularity)
    n_groups = len(groups)
    genotype = [(-1) ** i * (0.15 + 0.2 * i) for i in range(n_groups * 2 * 2)]
    per_model = tensor_parameters(decode(genotype, n_groups, 2, "ties"), groups, "ties")
    assert len(per_model) == 2
    for model in range(2):
        for name in NAMES:
            group = GROUP_BY_HAND[name] if granularity == 1 else 0
            offset = (group * 2 + model) * 2  # MergeKit's row-major (group, model, param)
            weight, density = abs(genotype[offset]), min(1.0, abs(genotype[offset + 1]))
            assert resolve(per_model[model]["weight"], name) == weight, name
            assert resolve(per_model[model]["density"], name) == density, name
    if granularity == 0:  # one group: plain values, no filter lists
        assert isinstance(per_model[0]["weight"], float)


def test_candidate_records_by_method() -> None:
    per_model = [{"weight": 0.5}, {"weight": 0.5}]
    linear = candidate_record(CmaesSettings(method="linear"), ["a", "b"], per_model, "B", "float32")
    assert linear.base_model is None and linear.parameters == {"normalize": True}
    settings = CmaesSettings(method="task_arithmetic")
    arithmetic = candidate_record(settings, ["a", "b"], per_model, "B", "bfloat16")
    assert arithmetic.base_model == "B"
    assert arithmetic.parameters == {"normalize": False, "int8_mask": True}
    assert [i.member for i in arithmetic.inputs] == ["a", "b"]
    settings = CmaesSettings(method="ties", normalize=False)
    ties = candidate_record(settings, ["a", "b"], per_model, "B", "float32")
    assert ties.parameters == {"normalize": False, "int8_mask": True}


# --- replay -------------------------------------------------------------------------------


def sphere_run(x0: list[float], seed: int, n: int) -> tuple[list[Generation], object]:
    """n generations of an uninterrupted ask/tell run maximising -|x - 0.3|^2."""
    import cma

    from mergekit_sae.search.cmaes import cma_options

    strategy = cma.CMAEvolutionStrategy(x0, 1 / 6, cma_options(seed, None))
    generations = []
    for _ in range(n):
        asked = strategy.ask()
        fitness = [-float(np.sum((np.asarray(x) - 0.3) ** 2)) for x in asked]
        strategy.tell(asked, [-f for f in fitness])
        solutions = [[float(v) for v in x] for x in asked]
        generations.append(Generation(solutions=solutions, fitnesses=fitness))
    return generations, strategy


def test_replay_asks_the_same_next_solutions() -> None:
    x0 = initial_genotype(3, 2, "ties")
    with numpy_rng_kept():
        generations, original = sphere_run(x0, 1234, 4)
        expected = original.ask()
    # through the checkpoint's JSON
    state = CmaesState.model_validate_json(CmaesState(generations=generations).model_dump_json())
    np.random.seed(7)
    caller = np.random.get_state()[1].copy()
    with numpy_rng_kept():
        rebuilt = replay(x0, 1 / 6, 1234, None, state.generations)
        asked = rebuilt.ask()
    assert (np.random.get_state()[1] == caller).all()  # the caller's NumPy state is untouched
    assert len(asked) == len(expected) == 4 + int(3 * np.log(len(x0)))
    assert all(np.array_equal(a, b) for a, b in zip(asked, expected, strict=True))
    assert rebuilt.sigma == original.sigma


def test_replay_refuses_a_history_it_does_not_reproduce() -> None:
    x0 = initial_genotype(2, 2, "linear")
    with numpy_rng_kept():
        generations, _ = sphere_run(x0, 99, 2)
    generations[1].solutions[0][0] += 1e-12
    with numpy_rng_kept(), pytest.raises(RuntimeError, match="does not replay generation 2"):
        replay(x0, 1 / 6, 99, None, generations)


# --- recipe -------------------------------------------------------------------------------


def recipe(models: dict[str, Path], *, base: bool = True, **overrides) -> dict:
    data = {
        "models": [str(models["e0"]), str(models["e1"])],
        "tasks": [
            {"name": "a", "type": "lm_eval", "subsample": 12},
            {"name": "b", "type": "lm_eval"},
        ],
        "search": "cmaes",
        "steps": 3,
        "dtype": "float32",
        "device": "cpu",
        "test_baselines": [],
    }
    if base:
        data["base_model"] = str(models["base"])
    data.update(overrides)
    return data


def test_recipe_validation_messages(tmp_path: Path) -> None:
    models = {name: tmp_path / name for name in ("base", "e0", "e1")}
    with pytest.raises(RecipeError, match=r"cmaes\.method: unknown method 'dare_ties'.*unseeded"):
        parse_recipe(recipe(models, cmaes={"method": "dare_ties"}))
    for method in ("ties", "task_arithmetic"):
        with pytest.raises(RecipeError, match=f"cmaes.method '{method}'.*set base_model"):
            parse_recipe(recipe(models, base=False, cmaes={"method": method}))
    with pytest.raises(RecipeError, match=r"cmaes\.popsize"):
        parse_recipe(recipe(models, cmaes={"popsize": 1}))
    with pytest.raises(RecipeError, match=r"cmaes\.sigma"):
        parse_recipe(recipe(models, cmaes={"sigma": 0.2}))
    settings = parse_recipe(recipe(models, base=False, cmaes={"method": "linear"})).settings_for()
    assert settings == CmaesSettings(method="linear")
    assert settings.layer_granularity == 1 and settings.sigma0 == 1 / 6
    assert settings.popsize is None and settings.normalize is None and settings.resample is False


# --- runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cmaes_models")
    return {name: tiny_llama(root / name, seed) for seed, name in enumerate(["base", "e0", "e1"])}


def fake_run(data: dict, out: Path, evaluator: FakeEvaluator | None = None, **options):
    evaluator = evaluator or FakeEvaluator()
    return run(
        parse_recipe(data), out, progress=False, make_evaluator=lambda r, i: evaluator, **options
    )


def comparable_history(state) -> list[dict]:
    return [record.model_dump(exclude={"seconds"}) for record in state.history]


@pytest.fixture(scope="module")
def whole(models, tmp_path_factory):
    """An uninterrupted ties run: 3 generations of 4 candidates, test report with baselines."""
    out = tmp_path_factory.mktemp("cmaes_whole") / "OUT"
    data = recipe(models, cmaes={"popsize": 4}, test_baselines=["parents", "linear"])
    return data, out, fake_run(data, out)


def test_whole_run_records_generations(whole) -> None:
    _, _, state = whole
    assert state.finished and state.evaluations == 12
    search = CmaesState.model_validate(state.search)
    assert [len(g.fitnesses) for g in search.generations] == [4, 4, 4] and search.pending is None
    candidates = [i for g in search.generations for i in g.members]
    fitnesses = [f for g in search.generations for f in g.fitnesses]
    first_best = candidates[fitnesses.index(max(fitnesses))]
    assert state.best == search.best == first_best
    assert state.population == [state.best]
    assert [r.info["cmaes"]["generation"] for r in state.history] == [1, 2, 3]
    member = state.members[state.best]
    assert member.origin == "candidate" and member.merge.method == "ties"
    assert member.inputs == [m.id for m in state.members.values() if m.origin == "parent"]
    assert member.fitness == member.performance


def test_stopped_then_resumed_equals_uninterrupted(whole, tmp_path: Path) -> None:
    data, out, state = whole
    split = tmp_path / "split"
    partial = fake_run(data, split, stop_after=2)
    assert partial.step == 2 and not partial.finished
    resumed = fake_run(data, split, resume=True)
    assert resumed.finished
    assert comparable_history(resumed) == comparable_history(state)
    assert resumed.search == state.search
    assert resumed.best == state.best
    assert_identical(out, split)


def test_lineage_rebuilds_bit_for_bit_with_mergekit(whole, tmp_path: Path) -> None:
    _, out, state = whole
    (document,) = load_stages(out / RECIPE_FILE)
    assert document["merge_method"] == "ties" and "name" not in document
    assert all(isinstance(m["parameters"]["weight"], list) for m in document["models"])
    assert_identical(out, run_recipe(out / RECIPE_FILE, tmp_path / "in_process"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = ["mergekit-yaml", str(out / RECIPE_FILE), str(tmp_path / "cli")]
    subprocess.run(command, check=True, env=env, timeout=300, capture_output=True)
    assert_identical(out, tmp_path / "cli")


class Abort(Exception):
    """Stops a run right after a checkpoint (as a kill before the finishing stage would)."""


def test_budget_counts_and_cut_generation(models, tmp_path: Path) -> None:
    """budget 10 with popsize 4 scores exactly 10 (4 + 4 + 2); a run continued with budget 12
    completes the cut generation and ends like an uninterrupted budget-12 run."""
    evaluator, counts = FakeEvaluator(), []

    def stop_at_3(state) -> None:
        counts.append((state.step, evaluator.scored))
        if state.step == 3:
            raise Abort

    data = recipe(models, base=False, steps=6, budget=10, cmaes={"method": "linear", "popsize": 4})
    with pytest.raises(Abort):
        fake_run(data, tmp_path / "cut", evaluator, on_checkpoint=stop_at_3)
    assert counts == [(0, 0), (1, 4), (2, 8), (3, 10)]
    stopped = load_state(tmp_path / "cut")
    search = CmaesState.model_validate(stopped.search)
    assert stopped.evaluations == 10 and len(search.generations) == 2
    assert search.pending is not None and len(search.pending.fitnesses) == 2
    assert len(search.pending.solutions) == 4
    assert stopped.history[-1].info["cmaes"]["cut_by_budget"] is True

    more = {**data, "budget": 12}
    continued = fake_run(more, tmp_path / "cut", resume=True)
    evaluator, counts = FakeEvaluator(), []
    uninterrupted = fake_run(
        more, tmp_path / "whole", evaluator, on_checkpoint=lambda s: counts.append(evaluator.scored)
    )
    assert counts[-1] == 12 == uninterrupted.evaluations == continued.evaluations
    assert continued.search == uninterrupted.search
    assert CmaesState.model_validate(continued.search).pending is None
    assert continued.best == uninterrupted.best
    assert_identical(tmp_path / "cut", tmp_path / "whole")
