"""The streaming safetensors writer against MergeKit's TensorWriter and safetensors' reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mergekit.io import TensorWriter
from safetensors.torch import load_file

from mergekit_sae.merging.shard_writer import MAX_DIMS, StreamingShardWriter
from mergekit_sae.weight_files import check_model_files


def sample_tensors() -> dict[str, torch.Tensor]:
    """Mixed dtypes and ranks, in writing order (a bf16 tensor of odd size before an f32)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(33, 8, generator=generator).bfloat16(),
        "model.layers.0.odd": torch.randn(7, generator=generator).bfloat16(),
        "model.layers.0.scale": torch.randn(5, 3, generator=generator),
        "model.layers.0.count": torch.tensor(3, dtype=torch.int64),
        "model.layers.1.mask": torch.rand(4, 4, generator=generator) > 0.5,
        "model.layers.1.empty": torch.zeros(0, 4),
        "model.norm.weight": torch.ones(8, dtype=torch.float16),
        "lm_head.weight": torch.randn(33, 8, generator=generator).bfloat16(),
    }


def write_both(tmp_path: Path, shard_size: int) -> tuple[Path, Path]:
    tensors = sample_tensors()
    ours, theirs = tmp_path / "ours", tmp_path / "mergekit"
    writer = StreamingShardWriter(ours, tensors, shard_size)
    reference = TensorWriter(str(theirs), max_shard_size=shard_size, safe_serialization=True)
    for name, tensor in tensors.items():
        writer.save_tensor(name, tensor)
        reference.save_tensor(name, tensor)
    writer.finalize()
    reference.finalize()
    return ours, theirs


@pytest.mark.parametrize("shard_size", [10**9, 300, 1])
def test_same_shards_and_tensors_as_mergekit(tmp_path: Path, shard_size: int) -> None:
    ours, theirs = write_both(tmp_path, shard_size)
    files = sorted(p.name for p in ours.iterdir())
    assert files == sorted(p.name for p in theirs.iterdir())
    for name in files:
        if name.endswith(".json"):
            mine, reference = (json.loads((d / name).read_text()) for d in (ours, theirs))
            assert mine["weight_map"] == reference["weight_map"]
            assert mine["metadata"]["total_size"] == reference["metadata"]["total_size"]
            continue
        mine, reference = load_file(ours / name), load_file(theirs / name)
        assert sorted(mine) == sorted(reference)
        for key, tensor in reference.items():
            assert mine[key].dtype == tensor.dtype and torch.equal(mine[key], tensor)
    check_model_files(ours)  # headers agree with the file sizes


def test_every_input_comes_back_bit_identical(tmp_path: Path) -> None:
    tensors = sample_tensors()
    writer = StreamingShardWriter(tmp_path, tensors, 10**9)
    for name, tensor in tensors.items():
        writer.save_tensor(name, tensor)
    writer.finalize()
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        as_bytes = [t.reshape(-1).view(torch.uint8) for t in (loaded[name], tensor)]
        assert torch.equal(*as_bytes)


def test_header_room_holds_the_widest_entries(tmp_path: Path) -> None:
    names = [f"w{i}" * 40 for i in range(3)]
    writer = StreamingShardWriter(tmp_path, names, 10**9)
    for name in names:  # many dimensions of a large size: the widest header entry
        writer.save_tensor(name, torch.zeros([1] * (MAX_DIMS - 1) + [12345], dtype=torch.float64))
    writer.finalize()
    assert set(load_file(tmp_path / "model.safetensors")) == set(names)


def test_refuses_unannounced_repeated_or_too_wide_tensors(tmp_path: Path) -> None:
    writer = StreamingShardWriter(tmp_path, ["a", "b"], 10**9)
    with pytest.raises(ValueError, match="'c' was not announced"):
        writer.save_tensor("c", torch.zeros(2))
    writer.save_tensor("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' was already written"):
        writer.save_tensor("a", torch.zeros(2))
    with pytest.raises(ValueError, match=f"'b': {MAX_DIMS + 1} dimensions"):
        writer.save_tensor("b", torch.zeros([1] * (MAX_DIMS + 1)))
