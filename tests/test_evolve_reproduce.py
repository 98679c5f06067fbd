"""The written MergeKit recipe reproduces a lineage's tensors exactly when MergeKit re-runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import make_llama

from mergekit_sae.merging.recipes import (
    RECIPE_FILE,
    copy_stage_name,
    load_stages,
    recipe_documents,
    run_recipe,
    write_recipe,
)
from mergekit_sae.merging.stream import stream_merge
from mergekit_sae.records import Member, MergeInput, MergeRecord, lineage


def tiny_llama(path: Path, seed: int, *, tied: bool = False, dtype=torch.float32) -> Path:
    """Save a tiny random Llama (2 layers, hidden 16) with a given seed."""
    make_llama(seed, tie_word_embeddings=tied).to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parents")
    return {name: tiny_llama(root / name, seed) for seed, name in enumerate(["base", "a", "b"])}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (single-file or sharded safetensors)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def build_lineage(
    root: Path, parents: dict[str, Path], stages: list[tuple[str, MergeRecord]]
) -> tuple[dict[str, Member], dict[str, dict[str, torch.Tensor]]]:
    """Parent members plus one merged member per stage, made by the search's streaming merge."""
    members = {
        name: Member(id=name, path=str(path), origin="parent", source=str(path))
        for name, path in parents.items()
    }
    sources: dict[str, Path] = dict(parents)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for member_id, record in stages:
        base = Path(record.base_model) if record.base_model else None
        directory = root / member_id
        stream_merge(record, [sources[item.member] for item in record.inputs], base, directory)
        sources[member_id] = directory
        weights[member_id] = load_weights(directory)
        inputs = [item.member for item in record.inputs if item.member]
        members[member_id] = Member(
            id=member_id, path=str(directory), origin="offspring", inputs=inputs, merge=record
        )
    return members, weights


def assert_same_tensors(expected: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Every expected tensor is present in model_dir and bit-identical (dtype included)."""
    actual = load_weights(model_dir)
    assert set(expected) <= set(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def rec(method: str, inputs: list[tuple[str, dict]], **kwargs) -> MergeRecord:
    """A MergeRecord over members named in ``inputs`` (name, per-model parameters)."""
    items = [MergeInput(member=name, parameters=params) for name, params in inputs]
    return MergeRecord(method=method, inputs=items, dtype=kwargs.pop("dtype", "float32"), **kwargs)


def test_single_stage_is_a_plain_config(tmp_path: Path, parents) -> None:
    stage = rec("linear", [("a", {"weight": 0.3}), ("b", {"weight": 0.7})])
    members, weights = build_lineage(tmp_path, parents, [("m0003", stage)])
    path = write_recipe(members, "m0003", tmp_path / "OUT")
    assert path == tmp_path / "OUT" / RECIPE_FILE
    documents = load_stages(path)
    assert documents == [
        {
            "merge_method": "linear",
            "models": [
                {"model": str(parents["a"]), "parameters": {"weight": 0.3}},
                {"model": str(parents["b"]), "parameters": {"weight": 0.7}},
            ],
            "out_dtype": "float32",
        }
    ]
    assert "mergekit-yaml mergekit_config.yml" in path.read_text()
    run_recipe(path, tmp_path / "re")
    assert_same_tensors(weights["m0003"], tmp_path / "re")


def test_three_stage_lineage_reproduces_with_multimerge(tmp_path: Path, parents) -> None:
    stages = [
        ("m0003", rec("linear", [("a", {"weight": 0.25}), ("b", {"weight": 0.75})])),
        (
            "m0004",
            rec(
                "ties",
                [("a", {"weight": 1.0, "density": 0.5}), ("b", {"weight": 0.6, "density": 0.7})],
                base_model=str(parents["base"]),
            ),
        ),
        ("m0005", rec("linear", [("m0003", {"weight": 0.4}), ("m0004", {"weight": 0.6})])),
    ]
    members, weights = build_lineage(tmp_path, parents, stages)
    path = write_recipe(members, "m0005", tmp_path / "OUT")
    documents = load_stages(path)
    assert [doc.get("name") for doc in documents] == ["./m0003", "./m0004", None]
    assert documents[2]["models"][0]["model"] == "./m0003"
    assert documents[1]["base_model"] == str(parents["base"])
    assert "mergekit-multi mergekit_config.yml" in path.read_text()
    out = run_recipe(path, tmp_path / "re", intermediate_dir=tmp_path / "stages")
    assert_same_tensors(weights["m0005"], out)
    assert_same_tensors(weights["m0003"], tmp_path / "stages" / "m0003")


def test_multimerge_command_runs_the_file(tmp_path: Path, parents) -> None:
    """The documented ``mergekit-multi`` command line accepts the written file."""
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main as multimerge

    stages = [
        ("m0003", rec("linear", [("a", {"weight": 0.5}), ("b", {"weight": 0.5})])),
        ("m0004", rec("linear", [("m0003", {"weight": 0.2}), ("base", {"weight": 0.8})])),
    ]
    members, weights = build_lineage(tmp_path, parents, stages)
    path = write_recipe(members, "m0004", tmp_path / "OUT")
    args = [str(path), "--intermediate-dir", str(tmp_path / "st"), "--out-path"]
    result = CliRunner().invoke(multimerge, [*args, str(tmp_path / "re")])
    assert result.exit_code == 0, result.output
    assert_same_tensors(weights["m0004"], tmp_path / "re")


def test_mergekit_sae_merge_runs_a_multi_stage_file(tmp_path: Path, parents) -> None:
    """`mergekit-sae merge` runs the written multi-stage file like mergekit-multi."""
    from click.testing import CliRunner

    from mergekit_sae.cli.merge import merge

    stages = [
        ("m0003", rec("linear", [("a", {"weight": 0.3}), ("b", {"weight": 0.7})])),
        ("m0004", rec("linear", [("m0003", {"weight": 0.6}), ("base", {"weight": 0.4})])),
    ]
    members, weights = build_lineage(tmp_path, parents, stages)
    path = write_recipe(members, "m0004", tmp_path / "OUT")
    result = CliRunner().invoke(merge, [str(path), str(tmp_path / "re")])
    assert result.exit_code == 0, result.output
    assert_same_tensors(weights["m0004"], tmp_path / "re")
    assert_same_tensors(weights["m0003"], tmp_path / "re.stages" / "m0003")


def test_bf16_tied_parents_with_float32_output(tmp_path: Path) -> None:
    """Inputs in bfloat16 with tied embeddings, stages written in float32, then bfloat16."""
    parents = {
        name: tiny_llama(tmp_path / name, seed, tied=True, dtype=torch.bfloat16)
        for seed, name in enumerate(["a", "b"], start=7)
    }
    stages = [
        ("m0002", rec("linear", [("a", {"weight": 0.3}), ("b", {"weight": 0.9})])),
        (
            "m0003",
            rec("linear", [("m0002", {"weight": 0.5}), ("a", {"weight": 0.5})], dtype="bfloat16"),
        ),
    ]
    members, weights = build_lineage(tmp_path, parents, stages)
    assert weights["m0002"]["model.embed_tokens.weight"].dtype == torch.float32
    path = write_recipe(members, "m0003", tmp_path / "OUT")
    out = run_recipe(path, tmp_path / "re", intermediate_dir=tmp_path / "stages")
    assert_same_tensors(weights["m0003"], out)


def test_sae_prune_and_evolve_lineage_reproduces(tmp_path: Path, parents) -> None:
    """sae_prune and sae_evolve stages as the search records them: global scope with
    ``redense: original`` (a dense reference input), then local scope."""
    from types import SimpleNamespace

    from mergekit_sae.search.sae_operators import offspring_record, prune_record
    from mergekit_sae.search.sae_settings import SaeMergeSettings

    def run_settings(measure: str = "zero_count") -> SimpleNamespace:
        """The run-wide settings the operators read."""
        return SimpleNamespace(base_model=None, prune_target="weights", sparsity_measure=measure)

    def offspring(merge, run, pair, originals, rate) -> MergeRecord:
        return offspring_record(
            merge,
            run,
            pair,
            originals,
            parent_density=1.0,
            child_density=1.0 - rate,
            dtype="float32",
        )

    members = {
        name: Member(id=name, path=str(path), origin="parent", source=str(path))
        for name, path in parents.items()
        if name != "base"
    }
    members["a"].performance, members["a"].sparsity = 0.6, 0.0
    sources = {name: parents[name] for name in members}

    def make(member_id: str, record: MergeRecord, sparsity: float, score: float) -> None:
        directory = tmp_path / member_id
        stream_merge(record, [sources[item.member] for item in record.inputs], None, directory)
        sources[member_id] = directory
        inputs = [item.member for item in record.inputs if item.member]
        members[member_id] = Member(
            id=member_id, path=str(directory), origin="offspring", inputs=inputs, merge=record
        )
        members[member_id].performance, members[member_id].sparsity = score, sparsity

    merge = SaeMergeSettings(redense="original", sparsity_scope="global", sparsity_weight=0.5)
    make("m0002", prune_record("b", 0.4, run_settings(), "float32"), 0.4, 0.3)
    pair = [members["a"], members["m0002"]]
    originals = [members["a"], members["b"]]
    make("m0003", offspring(merge, run_settings(), pair, originals, 0.3), 0.3, 0.5)
    local = SaeMergeSettings(sparsity_scope="local", renormalize=False)
    pair = [members["m0003"], members["m0002"]]
    make("m0004", offspring(local, run_settings("magnitude"), pair, originals, 0.2), 0.2, 0.7)

    path = write_recipe(members, "m0004", tmp_path / "OUT")
    documents = load_stages(path)
    names = [doc.get("name") for doc in documents]
    assert names == ["./m0002", "./m0003", None]
    references = [m for m in documents[1]["models"] if m["parameters"].get("dense_reference")]
    assert [m["model"] for m in references] == [str(parents["b"])]
    assert documents[-1]["merge_method"] == "sae_evolve"
    out = run_recipe(path, tmp_path / "re", intermediate_dir=tmp_path / "stages")
    assert_same_tensors(load_weights(tmp_path / "m0004"), out)
    zeros = sum(int((t == 0).sum()) for t in load_weights(out).values())
    assert zeros > 0  # the pruned stages really are sparse


def test_lineage_order_and_unused_members(parents) -> None:
    stages = {
        "m0003": rec("linear", [("a", {"weight": 0.5}), ("b", {"weight": 0.5})]),
        "m0004": rec("linear", [("b", {"weight": 0.5}), ("base", {"weight": 0.5})]),
        "m0005": rec("linear", [("m0004", {"weight": 0.5}), ("a", {"weight": 0.5})]),
    }
    members = {
        name: Member(id=name, path=str(path), origin="parent", source=str(path))
        for name, path in parents.items()
    }
    for name, record in stages.items():
        inputs = [item.member for item in record.inputs]
        members[name] = Member(id=name, path=name, origin="offspring", inputs=inputs, merge=record)
    documents = recipe_documents(members, "m0005")
    # m0003 is not an ancestor of m0005: it must not appear
    assert [doc.get("name") for doc in documents] == ["./m0004", None]
    assert yaml.safe_load(yaml.safe_dump(documents[0]))["models"][1]["model"] == str(
        parents["base"]
    )


def test_best_parent_is_a_passthrough(parents) -> None:
    members = {"a": Member(id="a", path=str(parents["a"]), origin="parent", source="org/expert")}
    assert recipe_documents(members, "a") == [
        {"merge_method": "passthrough", "models": [{"model": "org/expert"}]}
    ]


def test_bad_lineages_are_refused(parents) -> None:
    members = {"a": Member(id="a", path=str(parents["a"]), origin="parent", source="a")}
    with pytest.raises(ValueError, match="'nope' has no record"):
        recipe_documents(members, "nope")
    dangling = rec("linear", [("a", {"weight": 1.0}), ("ghost", {"weight": 1.0})])
    members["m1"] = Member(id="m1", path="m1", origin="offspring", merge=dangling)
    with pytest.raises(ValueError, match="'ghost', which has no record"):
        recipe_documents(members, "m1")
    thrice = rec("linear", [("a", {"weight": 1.0})] * 3)
    members["m2"] = Member(id="m2", path="m2", origin="offspring", merge=thrice)
    with pytest.raises(ValueError, match="appears more often in one merge"):
        recipe_documents(members, "m2")


def test_model_given_twice_goes_through_a_copy_stage(parents) -> None:
    members = {"a": Member(id="a", path=str(parents["a"]), origin="parent", source="org/a")}
    twice = rec("linear", [("a", {"weight": 1.0}), ("a", {"weight": 2.0})])
    members["m1"] = Member(id="m1", path="m1", origin="offspring", inputs=["a"], merge=twice)
    documents = recipe_documents(members, "m1")
    assert documents[0] == {
        "name": "./org_a-copy",
        "merge_method": "passthrough",
        "models": [{"model": "org/a"}],
    }
    assert [m["model"] for m in documents[1]["models"]] == ["org/a", "./org_a-copy"]


def test_copy_stage_reproduces_exactly(tmp_path: Path, parents) -> None:
    stages = [
        ("m0003", rec("linear", [("a", {"weight": 0.3}), ("b", {"weight": 0.7})])),
        (
            "m0004",
            rec(
                "linear",
                [("m0003", {"weight": 0.2}), ("a", {"weight": 0.5}), ("m0003", {"weight": 0.3})],
            ),
        ),
    ]
    members, weights = build_lineage(tmp_path, parents, stages)
    path = write_recipe(members, "m0004", tmp_path / "OUT")
    names = [doc.get("name") for doc in load_stages(path)]
    assert names == ["./m0003", copy_stage_name("m0003"), None]
    out = run_recipe(path, tmp_path / "re", intermediate_dir=tmp_path / "stages")
    assert_same_tensors(weights["m0004"], out)


def test_invalid_recipe_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yml: not valid YAML"):
        load_stages(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yml: expected one or more YAML mappings"):
        load_stages(bad)


def test_driver_output_folder_reproduces_with_mergekit(tmp_path: Path) -> None:
    """A whole search on tiny models: OUT/mergekit_config.yml rebuilds OUT's weights exactly."""
    from evolve_fixtures import deep_lineage_recipe, run_fake
    from evolve_fixtures import tiny_llama as tiny_llama_with_tokenizer

    models = [tiny_llama_with_tokenizer(tmp_path / name, seed) for seed, name in enumerate("ab")]
    out = tmp_path / "OUT"
    state = run_fake(deep_lineage_recipe([str(m) for m in models]), out)
    documents = load_stages(out / RECIPE_FILE)
    best = state.members[state.best]
    merged = [m for m in lineage(state.members, best.id) if m.merge is not None]
    assert len(merged) >= 2
    assert [doc.get("name") for doc in documents] == [f"./{m.id}" for m in merged[:-1]] + [None]
    assert [doc["merge_method"] for doc in documents] == [m.merge.method for m in merged]
    rebuilt = run_recipe(out / RECIPE_FILE, tmp_path / "re", intermediate_dir=tmp_path / "st")
    assert_same_tensors(load_weights(out), rebuilt)
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == [
        "fitness.png",
        "sparsity.png",
        "test_accuracy.png",
    ]
    assert (out / "README.md").read_text().startswith("---\n")


def test_relative_local_parents_are_written_as_dot_paths(tmp_path: Path, monkeypatch) -> None:
    """``experts/a`` (a local folder) becomes ``./experts/a``; Hub ids stay as they are."""
    (tmp_path / "experts" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    members = {
        "p0": Member(id="p0", path="/abs/a", origin="parent", source="experts/a"),
        "p1": Member(id="p1", path="/abs/b", origin="parent", source="org/b"),
    }
    stage = rec("linear", [("p0", {"weight": 0.5}), ("p1", {"weight": 0.5})])
    members["m2"] = Member(id="m2", path="m2", origin="offspring", merge=stage)
    (document,) = recipe_documents(members, "m2")
    assert [m["model"] for m in document["models"]] == ["./experts/a", "org/b"]


def test_failed_recipe_run_leaves_no_output(tmp_path: Path, parents) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n- model: {parents['a']}\n  parameters: {{weight: 1.0}}\n"
        f"- model: {tmp_path / 'missing'}\n  parameters: {{weight: 1.0}}\n"
    )
    with pytest.raises(Exception):  # noqa: B017  (MergeKit's own error for the missing model)
        run_recipe(recipe, tmp_path / "re")
    assert not (tmp_path / "re").exists()
