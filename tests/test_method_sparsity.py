"""Magnitude pruning, sparsity measures and the cyclic schedule against plain-torch references."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_sae import parallel
from mergekit_sae.sparsity import (
    CHUNK_ELEMENTS,
    cyclic_rate,
    magnitude_keys,
    magnitude_prune,
    model_sparsity,
    prune,
    select,
    sparsity,
    sparsity_schedule,
    sparsity_stats,
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


def reference_prune(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k entries first in (larger |x|, then earlier position) order: a stable sort."""
    flat = tensor.flatten()
    order = torch.sort(flat.abs().double(), descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view(tensor.shape)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a floating-point tensor (so -0 and +0 differ)."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(view)


def few_values(shape, dtype, seed: int, zero_fraction: float = 0.2) -> torch.Tensor:
    """Random values on a coarse grid (many exact ties) with a fraction of exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.randn(shape, generator=generator) * 8).round() / 8
    values *= torch.rand(shape, generator=generator) >= zero_fraction
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0004, 0.013, 0.5, 0.81, 0.9999])
def test_selection_matches_a_stable_sort_with_ties_across_blocks(monkeypatch, dtype, density):
    monkeypatch.setattr(parallel, "TARGET_BLOCKS", 16)
    tensor = few_values((97, 103), dtype, seed=int(density * 1e4))
    k = round(density * tensor.numel())
    expected = reference_prune(tensor, k)
    for threads in (1, 2, 3):
        with parallel.kernel_threads(threads):
            pruned = magnitude_prune(tensor, density, chunk=64)
        assert torch.equal(bits(pruned), bits(expected)), threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_magnitude_tied_keeps_the_first_k_positions(dtype):
    tensor = torch.full((5000,), -0.375, dtype=dtype)
    tensor[::7] = 0.375
    k = round(0.3 * 5000)
    pruned = magnitude_prune(tensor, 0.3, chunk=64)
    assert torch.equal(bits(pruned[:k]), bits(tensor[:k]))
    assert torch.equal(bits(pruned[k:]), bits(torch.zeros(5000 - k, dtype=dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_finds_the_kth_largest_key_and_its_kept_ties(dtype):
    tensor = few_values((4096,), dtype, seed=11).flatten()
    keys = magnitude_keys(tensor).long()
    parts = parallel.blocks(tensor.numel(), parallel.block_size(tensor.numel(), 64))
    for k in (1, 7, 1000, 4095, 4096):
        selection = select(
            k,
            tensor.element_size() * 8,
            lambda part: [magnitude_keys(tensor[part])],
            parts,
            tensor.device,
        )
        key = int(torch.sort(keys, descending=True).values[k - 1])
        assert selection.threshold.key == key
        assert selection.threshold.equal == k - int((keys > key).sum())
        assert selection.ties == [int((keys[part] == key).sum()) for part in parts]


def test_tiny_density_keeps_nothing_and_density_one_everything():
    tensor = torch.randn(300)
    assert torch.equal(magnitude_prune(tensor, 1e-4), torch.zeros(300))
    assert magnitude_prune(tensor, 1.0) is tensor


def test_pruned_entries_are_positive_zeros():
    tensor = -torch.arange(1.0, 9.0)
    pruned = magnitude_prune(tensor, 0.5)
    assert torch.equal(bits(pruned[:4]), bits(torch.zeros(4)))


@pytest.mark.usefixtures("one_thread")  # the reference's sums, like the kernel's, on one thread
def test_sparsity_stats_sum_each_chunk_in_float64_and_add_in_order():
    tensor = torch.randn((1 << 22) + 3000, generator=torch.Generator().manual_seed(6))
    tensor[::5] = 0
    l1 = l2 = 0.0
    for start in range(0, tensor.numel(), CHUNK_ELEMENTS):
        wide = tensor[start : start + CHUNK_ELEMENTS].double()
        l1 += float(wide.abs().sum())
        l2 += float(wide.square().sum())
    for threads in (1, 2):
        with parallel.kernel_threads(threads):
            stats = sparsity_stats(tensor)
        assert (stats.zeros, stats.l1, stats.l2_squared) == (int((tensor == 0).sum()), l1, l2)


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


def test_statistics_summed_on_one_thread_stay_within_float64_rounding_of_any_thread_count():
    tensor = torch.randn((1 << 22) + 100, generator=torch.Generator().manual_seed(9)) * 0.02
    stats = sparsity_stats(tensor)
    bound = CHUNK_ELEMENTS * 2.0**-53  # relative error bound of a float64 sum of a chunk
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)  # how a driver with `threads` summed before
            l1 = l2 = 0.0
            for start in range(0, tensor.numel(), CHUNK_ELEMENTS):
                wide = tensor[start : start + CHUNK_ELEMENTS].double()
                l1 += float(wide.abs().sum())
                l2 += float(wide.square().sum())
            assert abs(stats.l1 - l1) <= bound * l1
            assert abs(stats.l2_squared - l2) <= bound * l2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_prunes_on_its_own_workers():
    import multiprocessing

    tensor = torch.randn(1 << 20, generator=torch.Generator().manual_seed(2))
    with parallel.kernel_threads(2):
        expected = _pruned_digest(tensor)  # the parent's pool now has threads
        with multiprocessing.get_context("fork").Pool(1) as pool:
            digest = pool.apply_async(_pruned_digest, (tensor.numpy(),)).get(timeout=120)
    assert digest == expected


def _pruned_digest(tensor) -> str:
    """SHA-256 of magnitude_prune(tensor, 0.3) on two kernel threads (plain bytes, so a
    forked child returns no tensor)."""
    import hashlib

    with parallel.kernel_threads(2):
        pruned = magnitude_prune(torch.as_tensor(tensor), 0.3)
    return hashlib.sha256(pruned.numpy().tobytes()).hexdigest()
