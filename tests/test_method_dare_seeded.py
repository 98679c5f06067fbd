"""`dare_seeded`: DARE of one model's delta with a mask seeded by (seed, tensor name)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, files
from pathlib import Path

import pytest
import torch
from method_fixtures import build_tiny_llama, load_weights, run_cli, write_recipe

from mergekit_sae.merging.stream import stream_merge
from mergekit_sae.methods.dare_seeded import dare_seeded_tensor, keep_mask, mask_seed
from mergekit_sae.records import MergeInput, MergeRecord

pytestmark = pytest.mark.usefixtures("one_thread")


def installed_pth() -> bool:
    try:
        return any(f.name == "mergekit_sae_autoload.pth" for f in files("mergekit-sae") or [])
    except PackageNotFoundError:
        return False


def test_fraction_kept_and_rescaled_values() -> None:
    base = torch.zeros(200, 500)
    model = torch.full((200, 500), 0.5)
    out = dare_seeded_tensor(model, base, 0.8, seed=3, name="w")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.2) < 0.01  # 100k elements: std of the mean 0.0013
    assert torch.equal(out[kept], torch.full_like(out[kept], 0.5 / (1 - 0.8)))
    plain = dare_seeded_tensor(model, base, 0.8, seed=3, name="w", rescale=False)
    assert torch.equal(plain != 0, kept)
    assert torch.equal(plain[kept], torch.full_like(plain[kept], 0.5))


def test_dropped_elements_are_the_base_and_kept_ones_base_plus_scaled_delta() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 64, generator=generator)
    model = base + torch.randn(64, 64, generator=generator)
    out = dare_seeded_tensor(model, base, 0.5, seed=11, name="layer.weight")
    mask = keep_mask(model.shape, 0.5, 11, "layer.weight")
    assert torch.equal(out[~mask], base[~mask])
    expected = base + (model - base) / 0.5
    assert torch.equal(out[mask], expected[mask])


def test_mask_depends_on_seed_and_name_only() -> None:
    first = keep_mask((50, 40), 0.7, 5, "model.layers.0.mlp.up_proj.weight")
    keep_mask((10,), 0.7, 5, "other")  # drawing other masks in between changes nothing
    again = keep_mask((50, 40), 0.7, 5, "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(first, again)
    assert not torch.equal(first, keep_mask((50, 40), 0.7, 5, "model.layers.1.mlp.up_proj.weight"))
    assert not torch.equal(first, keep_mask((50, 40), 0.7, 6, "model.layers.0.mlp.up_proj.weight"))
    assert mask_seed(5, "a") != mask_seed(5, "b") and 0 <= mask_seed(5, "a") < 2**63


def test_zero_drop_rate_returns_the_model_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(30, 30, generator=generator).to(torch.bfloat16)
    model = torch.randn(30, 30, generator=generator).to(torch.bfloat16)
    out = dare_seeded_tensor(model, base, 0.0, seed=0, name="x")
    assert out.dtype == torch.bfloat16 and torch.equal(out, model)


def test_dtype_is_kept_and_domains_are_checked() -> None:
    base = torch.zeros(8, 8, dtype=torch.bfloat16)
    model = torch.ones(8, 8, dtype=torch.bfloat16)
    assert dare_seeded_tensor(model, base, 0.3, seed=1, name="t").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="t: drop_rate must be in \\[0, 1\\), got 1.0"):
        dare_seeded_tensor(model, base, 1.0, seed=1, name="t")
    with pytest.raises(ValueError, match="seed must be >= 0"):
        dare_seeded_tensor(model, base, 0.3, seed=-1, name="t")


def test_mergekit_registry_runs_it_with_the_tensor_name() -> None:
    from mergekit.merge_methods import merge_tensors

    base, model = torch.zeros(20, 20), torch.ones(20, 20)
    merged = merge_tensors(
        [model, base],
        "dare_seeded",
        parameters={"drop_rate": 0.6, "seed": 9},
        base_index=1,
        name="blk.weight",
    )
    assert torch.equal(merged, dare_seeded_tensor(model, base, 0.6, seed=9, name="blk.weight"))
    with pytest.raises(ValueError, match="tensor name"):
        merge_tensors(
            [model, base], "dare_seeded", parameters={"drop_rate": 0.6, "seed": 9}, base_index=1
        )


@pytest.mark.skipif(not installed_pth(), reason="needs `pip install .` or `pip install -e .`")
def test_plain_mergekit_yaml_in_a_fresh_process_matches_in_process(tmp_path: Path) -> None:
    base = build_tiny_llama(tmp_path / "base", 0)
    expert = build_tiny_llama(tmp_path / "expert", 1)
    record = MergeRecord(
        method="dare_seeded",
        inputs=[MergeInput(member="expert")],
        base_model=str(base),
        parameters={"drop_rate": 0.8, "seed": 1234, "rescale": True},
        dtype="float32",
    )
    stream_merge(record, [expert], base, tmp_path / "in_process")
    config = {
        "merge_method": "dare_seeded",
        "models": [{"model": str(expert)}],
        "base_model": str(base),
        "parameters": {"drop_rate": 0.8, "seed": 1234, "rescale": True},
        "out_dtype": "float32",
    }
    recipe = write_recipe(tmp_path / "dare.yml", config)
    result = run_cli("mergekit-yaml", str(recipe), str(tmp_path / "cli"))
    assert result.returncode == 0, result.stderr[-2000:]
    expected, actual = load_weights(tmp_path / "in_process"), load_weights(tmp_path / "cli")
    assert set(expected) <= set(actual)
    base_weights = load_weights(base)
    unchanged = total = 0
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name
        unchanged += int((tensor == base_weights[name]).sum())
        total += tensor.numel()
    assert 0.75 < unchanged / total < 0.85  # about p of the elements are the base's
