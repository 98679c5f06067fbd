"""`sae_evolve` / `sae_prune` through MergeKit recipes: end to end, bad inputs, global scope."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import merge_tensors
from mergekit.options import MergeOptions
from method_fixtures import build_tiny_llama, load_weights, run_cli, save_weights, write_recipe

from mergekit_sae.cli import main
from mergekit_sae.cli.merge import merge as merge_command
from mergekit_sae.methods import register_all

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
OPTIONS = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=True)
N_LAYERS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "base": build_tiny_llama(root / "base", 0),
        "a": build_tiny_llama(root / "a", 1, zero_fraction=0.3),
        "b": build_tiny_llama(root / "b", 2),
    }


def layer_t(name: str) -> float:
    """MergeKit's gradient position: layer i of n -> i / (n - 1); other tensors -> 0."""
    if ".layers." not in name:
        return 0.0
    return int(name.split(".layers.")[1].split(".")[0]) / (N_LAYERS - 1)


def ref_prune(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * n) largest |x| (via topk), zero the rest."""
    k = round(density * x.numel())
    if k >= x.numel():
        return x.clone()
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[x.abs().flatten().topk(k).indices] = True
    return x * keep.view(x.shape)


def ref_tensor(name, base, a, b, score_b, density_a, beta, offspring_density):
    """Independent SAE merge of one tensor: delta pruning, zero_count rho, eq. 5, attraction."""
    deltas = [ref_prune(a - base, density_a), b - base]
    rhos = [float((d == 0).double().mean()) for d in deltas]
    raw = [0.6 + beta * rhos[0], score_b + beta * rhos[1]]
    weights = [r / sum(raw) for r in raw]
    total = weights[0] * deltas[0] + weights[1] * deltas[1]
    present = weights[0] * (deltas[0] != 0) + weights[1] * (deltas[1] != 0)
    mixed = torch.where(present > 0, total / present.clamp_min(1e-30), torch.zeros_like(total))
    return base + ref_prune(mixed, offspring_density)


def gradient_recipe(models) -> dict:
    return {
        "merge_method": "sae_evolve",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["a"]), "parameters": {"score": 0.6, "density": [0.5, 0.9]}},
            {"model": str(models["b"]), "parameters": {"score": [0.2, 0.4]}},
        ],
        "parameters": {
            "sparsity_weight": 0.8,
            "prune_target": "delta",
            "offspring_density": [{"filter": "mlp", "value": 0.7}, {"value": 1.0}],
        },
        "dtype": "float32",
    }


def test_plain_mergekit_yaml_runs_sae_evolve_with_gradients_and_filters(models, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", gradient_recipe(models))
    out = tmp_path / "merged"
    result = run_cli("mergekit-yaml", str(recipe), str(out), "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr[-3000:]

    merged = load_weights(out)
    base, a, b = (load_weights(models[key]) for key in ("base", "a", "b"))
    assert set(merged) == set(base)
    pruned_mlp = 0
    for name, tensor in merged.items():
        t = layer_t(name)
        offspring = 0.7 if "mlp" in name else 1.0
        expected = ref_tensor(
            name, base[name], a[name], b[name], 0.2 + 0.2 * t, 0.5 + 0.4 * t, 0.8, offspring
        )
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=name)
        # the in-memory path the evolution driver uses gives the very same bits
        in_memory = merge_tensors(
            [base[name], a[name], b[name]],
            "sae_evolve",
            base_index=0,
            name=name,
            parameters={
                "score": [0.6, 0.2 + 0.2 * t],
                "density": [0.5 + 0.4 * t, 1.0],
                "sparsity_weight": 0.8,
                "prune_target": "delta",
                "offspring_density": offspring,
            },
        )
        assert torch.equal(in_memory, tensor), name
        if "mlp" in name:
            pruned_mlp += int((tensor == base[name]).sum())
    assert pruned_mlp > 0

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 64) and bool(torch.isfinite(logits).all())


def test_plain_mergekit_yaml_failure_leaves_no_output_directory(models, tmp_path):
    recipe = gradient_recipe(models)
    recipe["parameters"]["sparsity_measure"] = "entropy"
    out = tmp_path / "nested" / "merged"
    result = run_cli("mergekit-yaml", str(write_recipe(tmp_path / "r.yml", recipe)), str(out))
    assert result.returncode != 0
    assert "unknown sparsity_measure 'entropy'" in result.stderr
    assert not (tmp_path / "nested").exists()


def merge_in_process(recipe: dict, out: Path) -> None:
    """Run a recipe with MergeKit's own run_merge (wrapped by the autoload hook)."""
    register_all()
    run_merge(MergeConfiguration.model_validate(recipe), str(out), OPTIONS)


def two_model_recipe(first: Path, second: Path, **shared) -> dict:
    return {
        "merge_method": "sae_evolve",
        "models": [
            {"model": str(first), "parameters": {"score": 0.5}},
            {"model": str(second), "parameters": {"score": 0.5}},
        ],
        "parameters": shared,
    }


@pytest.fixture(scope="module")
def broken(tmp_path_factory, models) -> dict[str, Path]:
    """Models with one defect each."""
    root = tmp_path_factory.mktemp("broken")
    bigger_vocab = build_tiny_llama(root / "vocab66", 3, vocab_size=66)
    missing = build_tiny_llama(root / "missing", 4)
    weights = load_weights(missing)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_weights(missing, weights)
    paths = {"vocab66": bigger_vocab, "missing": missing}
    for defect, value in (("nan", float("nan")), ("inf", float("-inf"))):
        path = build_tiny_llama(root / defect, 5)
        weights = load_weights(path)
        weights["model.layers.0.self_attn.q_proj.weight"][2, 3] = value
        save_weights(path, weights)
        paths[defect] = path
    return paths


BAD_CASES = {
    "shape": (
        "vocab66",
        {},
        {},
        r"Tensor size mismatch for (lm_head|model\.embed_tokens)\.weight: "
        r"\[\(64, 16\), \(66, 16\)\]",
    ),
    "missing": ("missing", {}, {}, "model.layers.1.mlp.up_proj.weight required but not present"),
    "nan": ("nan", {}, {}, r"q_proj\.weight: model .*nan contains 1 NaN and 0 Inf values"),
    "inf": ("inf", {}, {}, r"q_proj\.weight: model .*inf contains 0 NaN and 1 Inf values"),
    "negative score": ("b", {}, {"score": -0.5}, r"models\[1\] .*: score must be .* >= 0"),
    "zero scores": ("b", {}, {"score": 0.0, "first": 0.0}, r"\.weight: all scores are zero"),
    "density": ("b", {}, {"density": 1.5}, r"models\[1\] .*: density must be in \(0, 1\], got 1.5"),
    "measure": ("b", {"sparsity_measure": "l2"}, {}, r"parameters: unknown sparsity_measure 'l2'"),
    "scope": ("b", {"sparsity_scope": "layer"}, {}, r"parameters: unknown sparsity_scope 'layer'"),
    "global": ("b", {"sparsity_scope": "global"}, {}, "use `mergekit-sae merge`|run the recipe"),
    "unknown": ("b", {"sparsity_wieght": 1.0}, {}, "unknown parameter `sparsity_wieght`"),
    "misplaced": ("b", {}, {"sparsity_weight": 1.0}, "`sparsity_weight` is shared by all models"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_tensor_and_cause_and_writes_nothing(case, models, broken, tmp_path):
    second_key, shared, second_params, message = BAD_CASES[case]
    second = broken.get(second_key) or models[second_key]
    recipe = two_model_recipe(models["a"], second, **shared)
    recipe["models"][1]["parameters"].update(second_params)
    if "first" in second_params:
        del recipe["models"][1]["parameters"]["first"]
        recipe["models"][0]["parameters"]["score"] = second_params["first"]
    out = tmp_path / "out"
    with pytest.raises((ValueError, RuntimeError), match=message):
        merge_in_process(recipe, out)
    assert os.listdir(tmp_path) == []


def test_failure_keeps_an_existing_output_directory_untouched(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="unknown sparsity_scope"):
        merge_in_process(two_model_recipe(models["a"], models["b"], sparsity_scope="x"), out)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]


def test_sae_prune_delta_keeps_base_where_delta_is_pruned(models, tmp_path):
    recipe = {
        "merge_method": "sae_prune",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["b"]), "parameters": {"density": 0.3}}],
        "parameters": {"prune_target": "delta"},
    }
    merge_in_process(recipe, tmp_path / "pruned")
    pruned, base, b = (load_weights(p) for p in (tmp_path / "pruned", models["base"], models["b"]))
    for name, tensor in pruned.items():
        delta = b[name] - base[name]
        expected = base[name] + ref_prune(delta, 0.3)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=name)
        changed = tensor != base[name]
        assert int(changed.sum()) <= round(0.3 * tensor.numel())


def test_mergekit_sae_merge_computes_global_sparsity_reproducibly(models, tmp_path):
    recipe = two_model_recipe(
        models["a"], models["b"], sparsity_scope="global", sparsity_weight=2.0
    )
    recipe["models"][1]["parameters"]["density"] = 0.6
    path = write_recipe(tmp_path / "global.yml", recipe)

    with pytest.raises(ValueError, match="mergekit-sae merge"):
        merge_in_process(recipe, tmp_path / "plain")
    result = CliRunner().invoke(
        merge_command, [str(path), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"]
    )
    assert result.exit_code == 0, result.output

    written = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    sparsities = [m["parameters"]["global_sparsity"] for m in written["models"]]
    a_tensors = load_weights(models["a"]).values()
    b_tensors = load_weights(models["b"]).values()
    zeros_a = sum(int((t == 0).sum()) for t in a_tensors) / sum(t.numel() for t in a_tensors)
    pruned_b = [ref_prune(t, 0.6) for t in b_tensors]
    zeros_b = sum(int((t == 0).sum()) for t in pruned_b) / sum(t.numel() for t in pruned_b)
    assert sparsities == pytest.approx([zeros_a, zeros_b])

    merge_in_process(written, tmp_path / "again")
    first, second = load_weights(tmp_path / "out"), load_weights(tmp_path / "again")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_shipped_recipe_runs_as_written(tmp_path, monkeypatch):
    for name, seed in (("base", 0), ("math", 1), ("multilingual", 2)):
        build_tiny_llama(tmp_path / "testbed" / name, seed, zero_fraction=0.1 * seed)
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((RECIPES / "sae_evolve_testbed.yml").read_text())
    merge_in_process(recipe, tmp_path / "merged")
    merged = load_weights(tmp_path / "merged")
    assert set(merged) == set(load_weights(tmp_path / "testbed" / "base"))


def test_mergekit_sae_merge_reports_bad_input_and_writes_nothing(models, tmp_path):
    recipe = two_model_recipe(models["a"], models["b"], redense="sometimes")
    path = write_recipe(tmp_path / "bad.yml", recipe)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(path), str(out), "--quiet"])
    assert result.exit_code == 1 and result.output.startswith("error: recipe parameters")
    assert "unknown redense 'sometimes'" in result.output
    assert sorted(os.listdir(tmp_path)) == ["bad.yml"]


def test_recipe_check_covers_slices_and_suggests_names():
    from mergekit_sae.merging.run_guard import check_recipe_parameters

    register_all()
    source = {"model": "/m/a", "layer_range": [0, 2]}
    recipe = MergeConfiguration.model_validate(
        {
            "merge_method": "sae_evolve",
            "slices": [
                {
                    "sources": [
                        {**source, "parameters": {"scores": 0.5}},
                        {**source, "model": "/m/b", "parameters": {"renormalize": False}},
                    ],
                    "parameters": {"density": 0.5, "redense": "parents"},
                }
            ],
        }
    )
    with pytest.raises(ValueError) as error:
        check_recipe_parameters(recipe)
    message = str(error.value)
    assert (
        "slices[0].sources[0] (/m/a): unknown parameter `scores` (did you mean `score`?)" in message
    )
    assert "slices[0].sources[1] (/m/b): `renormalize` is shared by all models" in message
    assert "slices[0].parameters" not in message

    with_base = two_model_recipe(Path("/m/a"), Path("/m/b"))
    with_base["base_model"] = "/m/a"
    with pytest.raises(ValueError, match=r"models\[0\] \(/m/a\): this is the base_model"):
        check_recipe_parameters(MergeConfiguration.model_validate(with_base))
