"""Magnitude pruning, sparsity measures and the cyclic schedule against plain-torch references."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_sae.sparsity import (
    cyclic_rate,
    magnitude_prune,
    model_sparsity,
    prune,
    sparsity,
    sparsity_schedule,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def reference_threshold(tensor: torch.Tensor, k: int) -> float:
    """The k-th largest |x|, by a full sort in float64."""
    return float(tensor.abs().double().flatten().sort(descending=True).values[k - 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [64, 1 << 22])
@pytest.mark.parametrize("density", [0.013, 0.3, 0.5, 0.97])
def test_magnitude_prune_keeps_largest_entries(dtype, chunk, density):
    generator = torch.Generator().manual_seed(3)
    tensor = torch.randn(37, 29, generator=generator).to(dtype)
    tensor[::4, ::3] = 0  # zeros and many bf16/fp16 ties
    pruned = magnitude_prune(tensor, density, chunk=chunk)
    k = round(density * tensor.numel())
    threshold = reference_threshold(tensor, k)
    kept = pruned != 0
    magnitudes = tensor.abs().double()
    assert pruned.dtype == tensor.dtype and pruned.shape == tensor.shape
    assert torch.equal(pruned[kept], tensor[kept])  # survivors keep their exact values
    assert bool((magnitudes[kept] >= threshold).all())
    assert bool(kept[magnitudes > threshold].all())  # everything strictly above survives
    assert int(kept.sum()) == min(k, int((tensor != 0).sum()))


def test_ties_are_broken_by_position_to_keep_exactly_k():
    tensor = torch.tensor([1.0, -2.0, 2.0, 2.0, -2.0, 0.5])
    pruned = magnitude_prune(tensor, 0.5, chunk=2)
    assert torch.equal(pruned, torch.tensor([0.0, -2.0, 2.0, 2.0, 0.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_magnitude_prune_above_two_to_the_24(dtype):
    n = (1 << 24) + 1001
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(n, generator=generator).to(dtype)
    pruned = magnitude_prune(tensor, 0.25)
    k = round(0.25 * n)
    kept = pruned != 0
    assert int(kept.sum()) == k
    smallest_kept = tensor.abs()[kept].min()
    largest_dropped = tensor.abs()[~kept].max()
    assert smallest_kept >= largest_dropped


def test_density_one_returns_the_tensor_and_bad_density_is_rejected():
    tensor = torch.randn(5)
    assert magnitude_prune(tensor, 1.0) is tensor
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density must be in"):
            magnitude_prune(tensor, bad)


def test_delta_pruning_leaves_base_where_delta_is_pruned():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(40, 10, generator=generator)
    tensor = base + torch.randn(40, 10, generator=generator)
    pruned = prune(tensor, 0.3, base=base)
    delta = tensor - base
    kept = magnitude_prune(delta, 0.3) != 0
    assert torch.equal(pruned[~kept], base[~kept])
    torch.testing.assert_close(pruned[kept], tensor[kept])
    assert int(kept.sum()) == round(0.3 * 400)


def hoyer(tensor: torch.Tensor) -> float:
    """Hoyer sparsity computed directly from the definition."""
    x = tensor.double().flatten()
    n = x.numel()
    return (math.sqrt(n) - float(x.abs().sum() / x.norm())) / (math.sqrt(n) - 1)


def test_sparsity_measures_match_their_definitions():
    generator = torch.Generator().manual_seed(2)
    tensor = torch.randn(50, 8, generator=generator)
    tensor[tensor.abs() < 0.5] = 0
    assert sparsity(tensor, "zero_count") == pytest.approx(float((tensor == 0).double().mean()))
    assert sparsity(tensor, "magnitude") == pytest.approx(hoyer(tensor))
    assert sparsity(tensor * 1000, "magnitude") == pytest.approx(sparsity(tensor, "magnitude"))
    assert sparsity(torch.ones(9), "magnitude") == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.zeros(9)
    one_hot[4] = -3.0
    assert sparsity(one_hot, "magnitude") == pytest.approx(1.0)
    assert sparsity(torch.zeros(4), "magnitude") == 1.0
    with pytest.raises(ValueError, match="unknown sparsity measure 'l0'"):
        sparsity(tensor, "l0")


def test_magnitude_sparsity_rises_with_pruning():
    tensor = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    values = [sparsity(magnitude_prune(tensor, d), "magnitude") for d in (1.0, 0.7, 0.4, 0.1)]
    assert values == sorted(values) and values[0] < values[-1]


def test_model_sparsity_is_the_measure_of_all_tensors_together():
    generator = torch.Generator().manual_seed(4)
    tensors = [torch.randn(3, 4, generator=generator), torch.zeros(10), torch.randn(7)]
    tensors[0][0] = 0
    joined = torch.cat([t.flatten() for t in tensors])
    for measure in ("zero_count", "magnitude"):
        assert model_sparsity(tensors, measure) == pytest.approx(sparsity(joined, measure))


def test_cyclic_schedule_follows_the_cosine_restart_formula():
    def expected(step, s_min, s_max, t0, t_mult):
        lengths, start = [t0], 0
        while start + lengths[-1] <= step:
            start += lengths[-1]
            lengths.append(lengths[-1] * t_mult)
        length, t = lengths[-1], step - start
        if length == 1:
            return s_min
        return s_min + (s_max - s_min) * (1 - math.cos(math.pi * t / (length - 1))) / 2

    schedule = sparsity_schedule(12)
    assert schedule == pytest.approx([expected(i, 0.1, 0.6, 3, 2) for i in range(12)])
    assert schedule[0] == schedule[3] == schedule[9] == pytest.approx(0.1)
    assert schedule[2] == schedule[8] == pytest.approx(0.6)
    flat = sparsity_schedule(7, s_min=0.2, s_max=0.5, t0=2, t_mult=1)
    assert flat == pytest.approx([0.2, 0.5] * 3 + [0.2])
    assert cyclic_rate(4, t0=1, t_mult=1) == 0.1
    with pytest.raises(ValueError, match="s_min <= s_max"):
        cyclic_rate(0, s_min=0.7, s_max=0.6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_prune_on_cuda_allocates_one_copy_plus_chunk_scratch(dtype):
    from mergekit_sae.sparsity import CHUNK_ELEMENTS

    tensor = torch.randn((1 << 24) + 77, device="cuda").to(dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    pruned = magnitude_prune(tensor, 0.4)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    tensor_bytes = tensor.numel() * tensor.element_size()
    assert peak <= tensor_bytes + 32 * CHUNK_ELEMENTS
    kept = pruned != 0
    assert int(kept.sum()) == round(0.4 * tensor.numel())
    assert tensor.abs()[kept].min() >= tensor.abs()[~kept].max()
