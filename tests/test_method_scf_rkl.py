"""`scf_rkl` (data-free): importance against direct computations, selection, roles, errors, and
plain `mergekit-yaml` in a fresh process against the method applied in-process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import get, merge_tensors
from method_fixtures import build_tiny_llama, load_weights, run_cli, write_recipe
from safetensors.torch import save_file

from mergekit_sae.cli.scf_rkl import scf_rkl as scf_rkl_command
from mergekit_sae.methods import METHOD_NAMES, register_all
from mergekit_sae.methods.scf_rkl import (
    row_distribution,
    scf_rkl_tensor,
    top_fraction_mask,
    weight_importance,
)

MATRIX = "model.layers.0.mlp.up_proj.weight"


def merge(anchor, *donors, name=MATRIX, **parameters):
    """The registered MergeKit method on one tensor (anchor is the base, index 0)."""
    register_all()
    return merge_tensors(
        [anchor, *donors], "scf_rkl", base_index=0, name=name, parameters=parameters
    )


def direct_reverse_kl_terms(donor, anchor, eps, distribution="abs", temperature=1.0):
    """Row by row in float64 with Python loops over rows (an independent formula)."""
    d2 = donor.double().reshape(donor.shape[0], -1) if donor.dim() > 1 else donor.double()[None]
    a2 = anchor.double().reshape(d2.shape)
    out = torch.empty_like(d2)
    for row in range(d2.shape[0]):
        if distribution == "abs":
            q = d2[row].abs() / d2[row].abs().sum()
            p = a2[row].abs() / a2[row].abs().sum()
        else:
            q = torch.exp(d2[row].abs() / temperature)
            q = q / q.sum()
            p = torch.exp(a2[row].abs() / temperature)
            p = p / p.sum()
        q, p = q + eps, p + eps
        out[row] = torch.xlogy(q, q) - q * torch.log(p)
    return out.reshape(donor.shape)


@pytest.mark.parametrize("distribution", ["abs", "softmax"])
@pytest.mark.parametrize("shape", [(5, 7), (3, 2, 4), (9,)])
def test_row_reverse_kl_importance_matches_direct_computation(distribution, shape):
    gen = torch.Generator().manual_seed(0)
    anchor = torch.randn(shape, generator=gen, dtype=torch.float64)
    donor = anchor + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    ours = weight_importance(
        donor, anchor, distribution=distribution, temperature=0.7, epsilon=1e-9
    )
    expected = direct_reverse_kl_terms(donor, anchor, 1e-9, distribution, 0.7)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)


def test_row_terms_sum_to_the_reverse_kl_of_each_row():
    gen = torch.Generator().manual_seed(1)
    anchor = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    donor = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    terms = weight_importance(donor, anchor, epsilon=1e-300)
    q = torch.distributions.Categorical(probs=donor.abs())
    p = torch.distributions.Categorical(probs=anchor.abs())
    torch.testing.assert_close(terms.sum(dim=1), torch.distributions.kl_divergence(q, p))
    assert torch.allclose(row_distribution(donor).sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_all_zero_row_becomes_uniform():
    tensor = torch.zeros(2, 4)
    tensor[1] = torch.tensor([1.0, 0.0, 3.0, 0.0])
    dist = row_distribution(tensor)
    assert torch.equal(dist[0], torch.full((4,), 0.25))
    assert torch.equal(dist[1], torch.tensor([0.25, 0.0, 0.75, 0.0]))


def donor_with_known_changes(anchor: torch.Tensor, positions, factor=4.0) -> torch.Tensor:
    """The anchor with a few coordinates grown (mass the anchor lacks there)."""
    donor = anchor.clone()
    flat = donor.view(-1)
    flat[positions] *= factor
    return donor


def test_changed_positions_carry_the_top_scores_and_are_the_ones_selected():
    gen = torch.Generator().manual_seed(2)
    anchor = torch.rand(8, 16, generator=gen) + 0.5
    positions = torch.tensor([3, 17, 40, 41, 100, 127])
    donor = donor_with_known_changes(anchor, positions)
    scores = weight_importance(donor, anchor).view(-1)
    assert set(scores.topk(len(positions)).indices.tolist()) == set(positions.tolist())
    merged = merge(anchor, donor, density=len(positions) / anchor.numel())
    changed = (merged != anchor).view(-1).nonzero().flatten()
    assert changed.tolist() == sorted(positions.tolist())
    assert torch.equal(merged.view(-1)[positions], donor.view(-1)[positions])


def test_density_zero_returns_the_anchor_bit_for_bit_in_any_dtype():
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        anchor = torch.randn(6, 10, generator=gen).to(dtype)
        donor = torch.randn(6, 10, generator=gen).to(dtype)
        merged = merge(anchor, donor, density=0.0)
        assert merged.dtype == dtype
        assert torch.equal(merged.view(torch.uint8), anchor.view(torch.uint8))


def test_density_one_returns_the_donor_at_every_position(tmp_path):
    gen = torch.Generator().manual_seed(4)
    anchor = torch.randn(6, 10, generator=gen).to(torch.bfloat16)
    donor = torch.randn(6, 10, generator=gen).to(torch.bfloat16)
    # row terms of two distributions cannot all be positive, so positive scores come from a file
    path = tmp_path / "positive.safetensors"
    save_file({MATRIX: torch.rand(6, 10, generator=gen) + 0.1}, path)
    assert torch.equal(merge(anchor, donor, density=1.0, importance=str(path)), donor)
    assert torch.equal(merge(anchor, donor, density=1.0), donor)


def test_scale_multiplies_the_selected_delta_only():
    gen = torch.Generator().manual_seed(5)
    anchor = torch.randn(5, 8, generator=gen)
    donor = torch.randn(5, 8, generator=gen)
    keep = top_fraction_mask(weight_importance(donor, anchor), 0.25)
    merged = merge(anchor, donor, density=0.25, scale=0.5)
    torch.testing.assert_close(merged, anchor + 0.5 * keep * (donor - anchor))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    density=st.floats(0.0, 1.0),
    levels=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_kept_count_is_round_density_times_numel_even_with_ties(rows, cols, density, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-levels, levels + 1, (rows, cols), generator=gen).float() / 7
    mask = top_fraction_mask(scores, density)
    k = round(density * rows * cols)
    assert int(mask.sum()) == k
    if 0 < k < scores.numel():  # every kept score is >= every dropped one
        assert float(scores[mask].min()) >= float(scores[~mask].max())


def test_each_coordinate_takes_the_donor_with_the_highest_importance():
    gen = torch.Generator().manual_seed(6)
    anchor = torch.randn(6, 9, generator=gen)
    donors = [anchor + torch.randn(6, 9, generator=gen) for _ in range(3)]
    density = 0.4
    merged = merge(anchor, *donors, density=density)

    stacked = torch.stack([weight_importance(d, anchor) for d in donors])
    best, choice = stacked.max(dim=0)
    k = round(density * anchor.numel())
    keep = torch.zeros(anchor.numel(), dtype=torch.bool)
    keep[best.flatten().topk(k).indices] = True
    keep = keep.view(anchor.shape)
    expected = torch.where(keep, torch.stack(donors).gather(0, choice[None])[0], anchor)
    assert torch.equal(merged, expected)


@pytest.mark.parametrize(
    ("name", "shape", "flag"),
    [
        ("model.embed_tokens.weight", (10, 4), "merge_embeddings"),
        ("lm_head.weight", (10, 4), "merge_embeddings"),
        ("transformer.wte.weight", (10, 4), "merge_embeddings"),
        ("model.layers.0.input_layernorm.weight", (4,), "merge_norms"),
        ("model.layers.0.self_attn.q_proj.bias", (4,), "merge_norms"),
    ],
)
def test_embeddings_and_vectors_are_kept_from_the_anchor_unless_asked(name, shape, flag):
    gen = torch.Generator().manual_seed(7)
    anchor = torch.rand(shape, generator=gen) + 0.5
    donor = anchor * 2
    assert torch.equal(merge(anchor, donor, name=name, density=1.0), anchor)
    assert torch.equal(merge(anchor, donor, name=name, density=1.0, **{flag: True}), donor)


def test_importance_file_replaces_the_weight_importance(tmp_path):
    gen = torch.Generator().manual_seed(8)
    anchor, donor = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    scores = torch.zeros(4, 5)
    scores[2, 3], scores[0, 1] = 5.0, 4.0
    path = tmp_path / "donor_0.safetensors"
    save_file({MATRIX: scores}, path)
    merged = merge(anchor, donor, density=2 / 20, importance=str(path))
    expected = anchor.clone()
    expected[2, 3], expected[0, 1] = donor[2, 3], donor[0, 1]
    assert torch.equal(merged, expected)


def error_of(anchor, *donors, **parameters) -> str:
    with pytest.raises(Exception) as caught:  # noqa: PT011 - pydantic or ValueError
        merge(anchor, *donors, **parameters)
    return str(caught.value)


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"density": 1.5}, "parameter `density`"),
        ({"density": -0.1}, "parameter `density`"),
        ({"distribution": "entropy"}, "parameter `distribution`: Input should be 'abs' or"),
        ({"temperature": 0.0}, "parameter `temperature`"),
        ({"selection": "everywhere"}, "parameter `selection`"),
        ({"selection": "global"}, "selection 'global' needs the model-wide `threshold`"),
        ({"threshold": 0.1}, "`threshold` is used only with `selection: global`"),
        ({"importance": "/no/such/file.safetensors"}, "/no/such/file.safetensors does not exist"),
    ],
)
def test_bad_parameters_name_the_parameter(parameters, expected):
    anchor = torch.ones(3, 4)
    message = error_of(anchor, anchor * 2, **parameters)
    assert expected in message


def test_bad_importance_files_name_the_file_and_tensor(tmp_path):
    anchor = torch.ones(3, 4)
    wrong_shape = tmp_path / "shape.safetensors"
    save_file({MATRIX: torch.ones(4, 3)}, wrong_shape)
    message = error_of(anchor, anchor * 2, importance=str(wrong_shape))
    assert MATRIX in message and str(wrong_shape) in message and "(4, 3)" in message
    missing = tmp_path / "missing.safetensors"
    save_file({"other.weight": torch.ones(3, 4)}, missing)
    message = error_of(anchor, anchor * 2, importance=str(missing))
    assert MATRIX in message and str(missing) in message and "has no tensor" in message


def test_mixed_importance_kinds_are_rejected(tmp_path):
    anchor = torch.ones(3, 4)
    path = tmp_path / "d.safetensors"
    save_file({MATRIX: torch.ones(3, 4)}, path)
    message = error_of(anchor, anchor * 2, anchor * 3, importance=[str(path), "weights"])
    assert "same kind of `importance`" in message


def test_direct_calls_check_density_and_shapes():
    with pytest.raises(ValueError, match="`density` must be in \\[0, 1\\]"):
        scf_rkl_tensor(torch.ones(2), [torch.ones(2)], density=2.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        scf_rkl_tensor(torch.ones(2), [torch.ones(3)])


def test_registered_with_declared_domains():
    spec = get("scf_rkl").spec
    assert "scf_rkl" in METHOD_NAMES
    defaults = {p.name: p.default for p in spec.parameters}
    assert defaults == {
        "importance": "weights",
        "density": 0.1,
        "scale": 1.0,
        "distribution": "abs",
        "temperature": 1.0,
        "epsilon": 1e-12,
        "selection": "local",
        "threshold": None,
        "merge_embeddings": False,
        "merge_norms": False,
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scf_models")
    return {
        "anchor": build_tiny_llama(root / "anchor", 0),
        "donor": build_tiny_llama(root / "donor", 1),
        "donor2": build_tiny_llama(root / "donor2", 2),
    }


def recipe_for(models, density, **shared) -> dict:
    return {
        "merge_method": "scf_rkl",
        "base_model": str(models["anchor"]),
        "models": [{"model": str(models["donor"])}, {"model": str(models["donor2"])}],
        "parameters": {"density": density, **shared},
        "dtype": "float32",
    }


def test_plain_mergekit_yaml_in_a_fresh_process_equals_the_method_in_process(models, tmp_path):
    recipe = recipe_for(
        models,
        [0.1, 0.3],  # a gradient over layers
        distribution="softmax",
        temperature=0.05,
        merge_norms=True,
    )
    path = write_recipe(tmp_path / "recipe.yml", recipe)
    out = tmp_path / "merged"
    result = run_cli("mergekit-yaml", str(path), str(out), "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr[-3000:]

    merged = load_weights(out)
    anchor, d1, d2 = (load_weights(models[k]) for k in ("anchor", "donor", "donor2"))
    assert set(merged) == set(anchor)
    for name, tensor in merged.items():
        t = int(name.split(".layers.")[1].split(".")[0]) / 2 if ".layers." in name else 0.0
        expected = merge(
            anchor[name],
            d1[name],
            d2[name],
            name=name,
            density=0.1 + 0.2 * t,
            distribution="softmax",
            temperature=0.05,
            merge_norms=True,
        )
        assert torch.equal(tensor, expected), name
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(tensor, anchor[name]), name
        elif "mlp" in name:
            changed = int((tensor != anchor[name]).sum())
            assert 0 < changed <= round((0.1 + 0.2 * t) * tensor.numel()), name


def test_global_threshold_command_writes_a_recipe_that_keeps_the_density(models, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    source = write_recipe(tmp_path / "recipe.yml", recipe_for(models, 0.2))
    target = tmp_path / "global.yml"
    result = CliRunner().invoke(scf_rkl_command, ["threshold", str(source), str(target)])
    assert result.exit_code == 0, result.output

    import yaml

    recipe = yaml.safe_load(target.read_text())
    assert recipe["parameters"]["selection"] == "global"
    threshold = recipe["parameters"]["threshold"]
    register_all()
    run_merge(
        MergeConfiguration.model_validate(recipe),
        str(tmp_path / "out"),
        MergeOptions(copy_tokenizer=False, quiet=True),
    )
    merged = load_weights(tmp_path / "out")
    anchor, d1, d2 = (load_weights(models[k]) for k in ("anchor", "donor", "donor2"))
    fused = [
        n for n, t in anchor.items() if t.dim() == 2 and "embed" not in n and "lm_head" not in n
    ]
    selected = 0
    total = 0
    for name in fused:
        best = torch.maximum(
            weight_importance(d1[name], anchor[name]), weight_importance(d2[name], anchor[name])
        )
        keep = best >= threshold
        selected += int(keep.sum())
        total += keep.numel()
        assert torch.equal(merged[name] != anchor[name], keep), name
    assert abs(selected - round(0.2 * total)) <= 1
    assert not math.isnan(threshold)
