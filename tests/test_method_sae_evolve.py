"""The SAE per-tensor merge against plain-torch references, properties, registered method."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import get, merge_tensors, registered_methods

from mergekit_sae import parallel
from mergekit_sae.methods import register_all, sae_evolve
from mergekit_sae.methods.sae_evolve import sae_merge, sae_mixing_weights


def eq5(scores, rhos, beta):
    """Paper eq. 5, written out independently."""
    raw = [s + beta * r for s, r in zip(scores, rhos, strict=True)]
    return [v / sum(raw) for v in raw]


def sparse_tensors(count, shape=(16, 12), zero_fractions=(0.0, 0.3, 0.6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for index in range(count):
        tensor = torch.randn(*shape, generator=generator)
        mask = torch.rand(*shape, generator=generator) >= zero_fractions[index]
        tensors.append(tensor * mask)
    return tensors


def reference_merge(tensors, weights, renormalize):
    """sum_k w_k x_k, divided per position by the weight of non-zero entries when renormalizing."""
    stacked = torch.stack([t.double() for t in tensors])
    w = torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    total = (w * stacked).sum(0)
    if not renormalize:
        return total
    present = (w * (stacked != 0)).sum(0)
    return torch.where(present > 0, total / present.clamp_min(1e-300), torch.zeros_like(total))


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("measure", ["zero_count", "magnitude"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_local_scope_matches_eq5_reference(count, measure, renormalize):
    tensors = sparse_tensors(count)
    scores = [0.7, 0.2, 0.45][:count]
    beta = 0.8
    if measure == "zero_count":
        rhos = [float((t == 0).double().mean()) for t in tensors]
    else:
        rhos = []
        for t in tensors:
            x = t.double().flatten()
            n = x.numel()
            rhos.append(float((n**0.5 - x.abs().sum() / x.norm()) / (n**0.5 - 1)))
    weights = eq5(scores, rhos, beta)
    merged = sae_merge(
        tensors, scores, sparsity_weight=beta, sparsity_measure=measure, renormalize=renormalize
    )
    expected = reference_merge(tensors, weights, renormalize)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-6)


def test_global_scope_uses_the_given_model_sparsity_for_every_tensor():
    tensors = sparse_tensors(2)
    scores, globals_, beta = [0.5, 0.4], [0.9, 0.05], 2.0
    merged = sae_merge(
        tensors, scores, sparsity_weight=beta, sparsity_scope="global", global_sparsity=globals_
    )
    expected = reference_merge(tensors, eq5(scores, globals_, beta), True)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-6)
    local = sae_merge(tensors, scores, sparsity_weight=beta)
    assert not torch.allclose(local, merged)


def test_attraction_lone_survivor_keeps_full_value_only_with_renormalize():
    a = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    on = sae_merge([a, b], [0.75, 0.25])
    off = sae_merge([a, b], [0.75, 0.25], renormalize=False)
    assert on[0, 0] == 3.0 and on[1, 0] == 1.0 and on[1, 1] == 0.0
    assert off[0, 0] == pytest.approx(0.75)
    assert on[0, 1] == pytest.approx(0.75 * 2 + 0.25 * 4)


def test_density_prunes_each_parent_before_mixing():
    tensors = sparse_tensors(2, zero_fractions=(0.0, 0.0))
    merged = sae_merge(tensors, [0.5, 0.5], densities=[0.25, 1.0], sparsity_weight=1.0)
    pruned_a = tensors[0] * (tensors[0].abs() >= tensors[0].abs().flatten().kthvalue(145).values)
    assert int((pruned_a != 0).sum()) == round(0.25 * 192)
    rhos = [0.75, 0.0]
    expected = reference_merge([pruned_a, tensors[1]], eq5([0.5, 0.5], rhos, 1.0), True)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-6)


def test_delta_target_prunes_and_mixes_task_vectors():
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(10, 10, generator=generator)
    deltas = [torch.randn(10, 10, generator=generator) for _ in range(2)]
    tensors = [base + d for d in deltas]
    merged = sae_merge(tensors, [0.6, 0.3], densities=[0.4, 0.4], prune_target="delta", base=base)
    kept = [d.abs() >= d.abs().flatten().kthvalue(61).values for d in deltas]
    pruned = [(t - base) * m for t, m in zip(tensors, kept, strict=True)]
    expected = base.double() + reference_merge(pruned, [2 / 3, 1 / 3], True)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)
    both_pruned = ~kept[0] & ~kept[1]
    assert bool(both_pruned.any())
    assert torch.equal(merged[both_pruned], base[both_pruned])


def test_offspring_density_prunes_the_result():
    tensors = sparse_tensors(2, zero_fractions=(0.0, 0.0))
    dense = sae_merge(tensors, [1.0, 1.0])
    sparse = sae_merge(tensors, [1.0, 1.0], offspring_density=0.3)
    kept = sparse != 0
    assert int(kept.sum()) == round(0.3 * dense.numel())
    assert torch.equal(sparse[kept], dense[kept])


def test_redense_original_fills_zeros_from_the_dense_reference():
    a = torch.tensor([0.0, 1.0, 0.0, 2.0])
    b = torch.tensor([4.0, 0.0, 0.0, 2.0])
    reference = torch.tensor([10.0, 20.0, 30.0, 40.0])
    merged = sae_merge([a, b], [0.5, 0.5], redense="original", dense_reference=reference)
    filled_a = torch.tensor([10.0, 1.0, 30.0, 2.0])
    filled_b = torch.tensor([4.0, 20.0, 30.0, 2.0])
    torch.testing.assert_close(merged, (filled_a + filled_b) / 2)
    parents = sae_merge([a, b], [0.5, 0.5])
    torch.testing.assert_close(parents, torch.tensor([4.0, 1.0, 0.0, 2.0]))


def test_registered_method_matches_sae_merge_with_base_and_dense_reference():
    register_all()
    register_all()  # idempotent
    assert [m.spec.name for m in registered_methods()].count("sae_evolve") == 1
    generator = torch.Generator().manual_seed(9)
    base, a, b, ref1, ref2 = (torch.randn(8, 6, generator=generator) for _ in range(5))
    a[a.abs() < 0.4] = 0
    parameters = {
        "score": [0.6, 0.3, None, None],
        "density": [0.5, 0.8, 1.0, 1.0],
        "dense_reference": [False, False, True, True],
        "sparsity_weight": 0.5,
        "redense": "original",
        "prune_target": "delta",
    }
    via_mergekit = merge_tensors(
        [base, a, b, ref1, ref2], "sae_evolve", parameters=parameters, base_index=0, name="w"
    )
    direct = sae_merge(
        [a, b],
        [0.6, 0.3],
        densities=[0.5, 0.8],
        sparsity_weight=0.5,
        redense="original",
        dense_reference=(ref1 + ref2) / 2,
        prune_target="delta",
        base=base,
    )
    torch.testing.assert_close(via_mergekit, direct)
    assert get("sae_prune").spec.name == "sae_prune"
    parameters["redense"] = "parents"
    with pytest.raises(ValueError, match="w: models marked `dense_reference: true` are used only"):
        merge_tensors(
            [base, a, b, ref1, ref2], "sae_evolve", parameters=parameters, base_index=0, name="w"
        )


def test_bf16_inputs_are_computed_in_float32_and_returned_as_bf16():
    tensors = [t.to(torch.bfloat16) for t in sparse_tensors(2)]
    merged = merge_tensors(tensors, "sae_evolve", parameters={"score": [0.3, 0.6]})
    expected = sae_merge([t.float() for t in tensors], [0.3, 0.6]).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": [-0.1, 0.5]}, "score of input 0 must be a finite number >= 0"),
        ({"scores": [0.0, 0.0]}, "all scores are zero"),
        ({"densities": [0.0, 1.0]}, r"density of input 0 must be in \(0, 1\]"),
        ({"densities": [1.0, 1.2]}, r"density of input 1 must be in \(0, 1\]"),
        ({"offspring_density": 0.0}, r"offspring_density must be in \(0, 1\]"),
        ({"sparsity_measure": "l1"}, "unknown sparsity_measure 'l1'"),
        ({"sparsity_scope": "layer"}, "unknown sparsity_scope 'layer'"),
        ({"sparsity_scope": "global"}, "needs each model's `global_sparsity`"),
        ({"prune_target": "delta"}, "prune_target 'delta' needs a base_model"),
        ({"redense": "original"}, "needs a dense reference"),
    ],
)
def test_bad_options_name_the_tensor_and_cause(kwargs, message):
    tensors = sparse_tensors(2)
    arguments = {"scores": [0.5, 0.5], **kwargs}
    with pytest.raises(ValueError, match=message) as error:
        sae_merge(tensors, arguments.pop("scores"), name="model.norm.weight", **arguments)
    assert str(error.value).startswith("model.norm.weight: ")


def test_bad_tensors_name_the_tensor_and_cause():
    a, b = sparse_tensors(2)
    with pytest.raises(ValueError, match=r"embed: shape mismatch .*\(16, 12\).*\(15, 12\)"):
        sae_merge([a, b[:15]], [0.5, 0.5], name="embed")
    b[3, 3] = float("nan")
    b[0, 0] = float("inf")
    with pytest.raises(ValueError, match="embed: input 1 contains 1 NaN and 1 Inf values"):
        sae_merge([a, b], [0.5, 0.5], name="embed")
    with pytest.raises(ValueError, match="at least 2 models"):
        sae_merge([a], [0.5], name="embed")


scores_strategy = st.lists(st.floats(0.0, 1.0), min_size=2, max_size=5).filter(
    lambda s: sum(s) > 1e-6
)


@given(scores=scores_strategy, data=st.data(), beta=st.floats(0.0, 5.0))
def test_weights_sum_to_one_and_lie_in_unit_interval(scores, data, beta):
    rhos = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(scores), max_size=len(scores)))
    weights = sae_mixing_weights(scores, rhos, beta)
    assert sum(weights) == pytest.approx(1.0)
    assert all(0.0 <= w <= 1.0 for w in weights)


@given(scores=scores_strategy, data=st.data(), beta=st.floats(0.0, 5.0), raise_by=st.floats(0, 2))
def test_raising_a_score_never_lowers_its_weight(scores, data, beta, raise_by):
    rhos = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(scores), max_size=len(scores)))
    index = data.draw(st.integers(0, len(scores) - 1))
    before = sae_mixing_weights(scores, rhos, beta)[index]
    higher = list(scores)
    higher[index] += raise_by
    assert sae_mixing_weights(higher, rhos, beta)[index] >= before - 1e-12


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    count=st.integers(2, 4),
    zero_fraction=st.floats(0.0, 0.9),
    measure=st.sampled_from(["zero_count", "magnitude"]),
    renormalize=st.booleans(),
    beta=st.floats(0.0, 3.0),
)
def test_merging_identical_models_returns_that_model(
    seed, count, zero_fraction, measure, renormalize, beta
):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(9, 7, generator=generator)
    tensor = tensor * (torch.rand(9, 7, generator=generator) >= zero_fraction)
    scores = [0.1 + i / 10 for i in range(count)]
    merged = sae_merge(
        [tensor.clone() for _ in range(count)],
        scores,
        sparsity_weight=beta,
        sparsity_measure=measure,
        renormalize=renormalize,
    )
    torch.testing.assert_close(merged, tensor, rtol=1e-6, atol=1e-7)


def stable_keep(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask of the k entries first in (larger magnitude, then earlier position) order."""
    order = torch.sort(magnitudes.double(), descending=True, stable=True).indices
    keep = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def whole_tensor_sae(
    tensors,
    scores,
    *,
    densities,
    sparsity_weight=0.0,
    sparsity_measure="zero_count",
    renormalize=True,
    base=None,
    offspring_density=1.0,
    dense_reference=None,
):
    """sae_merge written as whole-tensor passes: stable-sort selections, x * keep pruning,
    eq. 5, where-based re-densing, the attraction mix and offspring pruning, in float32 (a
    parent pruned to no entry is +0, as in the kernel)."""
    flats = [t.flatten().float() for t in tensors]
    origin = base.flatten().float() if base is not None else None
    parts = [f - origin if origin is not None else f for f in flats]
    pruned = []
    for tensor, part, density in zip(tensors, parts, densities, strict=True):
        magnitudes = (tensor.flatten() if origin is None else part).abs()
        k = round(density * part.numel())
        pruned.append(part * stable_keep(magnitudes, k) if k else torch.zeros_like(part))
    rhos = []
    for part in pruned:
        n = part.numel()
        if sparsity_measure == "zero_count":
            rhos.append(int((part == 0).sum()) / n)
        else:  # Hoyer from float64 L1 and squared L2
            l1, l2 = float(part.double().abs().sum()), float(part.double().square().sum())
            rhos.append(min(1.0, max(0.0, (n**0.5 - l1 / l2**0.5) / (n**0.5 - 1.0))))
    weights = eq5(scores, rhos, sparsity_weight)
    if dense_reference is not None:
        redense = dense_reference.flatten().float()
        redense = redense - origin if origin is not None else redense
        pruned = [torch.where(part == 0, redense, part) for part in pruned]
    total = torch.zeros_like(pruned[0])
    present = torch.zeros_like(pruned[0])
    for part, weight in zip(pruned, weights, strict=True):
        total.add_(part, alpha=weight)
        present.add_(part.abs().sign_(), alpha=weight)
    merged = (
        total.div_(present.clamp_min_(torch.finfo(torch.float32).tiny)) if renormalize else total
    )
    k = round(offspring_density * merged.numel())
    if k < merged.numel():
        merged = (merged * stable_keep(merged.abs(), k)).add_(0.0)
    if origin is not None:
        merged = merged.add_(origin)
    return merged.to(tensors[0].dtype).view(tensors[0].shape)


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so -0 and +0 differ)."""
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


KERNEL_CASES = [
    dict(densities=[1.0, 1.0], beta=0.5, measure="zero_count", renormalize=True),
    dict(densities=[0.5, 0.3], beta=0.5, measure="zero_count", renormalize=True),
    dict(densities=[0.9, 0.6], beta=0.7, measure="magnitude", renormalize=True),
    dict(densities=[0.5, 1.0], beta=0.5, measure="zero_count", renormalize=False),
    dict(densities=[0.4, 0.7], beta=1.0, measure="zero_count", renormalize=True, delta=True),
    dict(densities=[1.0, 1.0], beta=1.0, measure="zero_count", renormalize=True, offspring=0.45),
    dict(
        densities=[0.6, 0.5],
        beta=2.0,
        measure="magnitude",
        renormalize=True,
        delta=True,
        offspring=0.7,
    ),
    dict(densities=[0.6, 0.9], beta=0.5, measure="zero_count", renormalize=True, reference=True),
]


@pytest.mark.usefixtures("one_thread")  # the reference's float64 norms on one thread too
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_whole_tensor_passes_bit_for_bit_at_any_thread_count(
    monkeypatch, dtype, case
):
    monkeypatch.setattr(parallel, "CHUNK", 64)  # many chunks and blocks in a small tensor
    generator = torch.Generator().manual_seed(21)
    base = ((torch.randn(61, 53, generator=generator) * 8).round() / 8).to(dtype)
    tensors = []
    for zero_fraction in (0.1, 0.5):
        noise = (torch.randn(61, 53, generator=generator) * 4).round() / 8
        noise *= torch.rand(61, 53, generator=generator) >= zero_fraction
        tensors.append((base.float() + noise).to(dtype) if case.get("delta") else noise.to(dtype))
    reference = torch.randn(61, 53, generator=generator) if case.get("reference") else None
    delta = base if case.get("delta") else None
    options = dict(
        densities=case["densities"],
        sparsity_weight=case["beta"],
        sparsity_measure=case["measure"],
        renormalize=case["renormalize"],
        base=delta,
        offspring_density=case.get("offspring", 1.0),
        dense_reference=reference,
    )
    expected = whole_tensor_sae(tensors, [0.6, 0.3], **options)
    target = dict(
        prune_target="delta" if delta is not None else "weights",
        redense="original" if reference is not None else "parents",
    )
    # under delta, with the task vectors kept between passes and recomputed in each
    budgets = (sae_evolve.PART_CACHE_BYTES, 0) if delta is not None else (0,)
    for budget in budgets:
        monkeypatch.setattr(sae_evolve, "PART_CACHE_BYTES", budget)
        for threads in (1, 2, 3):
            with parallel.kernel_threads(threads):
                merged = sae_merge(tensors, [0.6, 0.3], **target, **options)
            assert torch.equal(raw_bits(merged), raw_bits(expected)), (budget, threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_whole_parents_merge_in_one_pass_with_the_bits_of_the_two_pass_merge(
    monkeypatch, dtype, renormalize
):
    # zeros in some 64-element chunks only: both the zero-free and the divisor path are taken
    monkeypatch.setattr(parallel, "CHUNK", 64)
    generator = torch.Generator().manual_seed(5)
    tensors = [torch.randn(40, 48, generator=generator).to(dtype) for _ in range(3)]
    tensors[0].view(-1)[100:140] = 0.0
    tensors[2].view(-1)[1000:1010] = -0.0
    base = torch.randn(40, 48, generator=generator).to(dtype)  # read, never mixed (weights)
    options = dict(
        renormalize=renormalize,
        base=base,
        sparsity_weight=0.5,
        sparsity_scope="global",
        global_sparsity=[0.1, 0.4, 0.0],
    )

    def merged(**changed) -> list[torch.Tensor]:
        results = []
        for threads in (1, 2, 3):
            with parallel.kernel_threads(threads):
                results.append(sae_merge(tensors, [0.6, 0.3, 0.5], **{**options, **changed}))
        return [raw_bits(result) for result in results]

    broken = base.clone()
    broken.view(-1)[7] = float("inf")
    with monkeypatch.context() as patch:
        patch.setattr(sae_evolve._MixPlan, "scan", _no_scan)
        one = merged()
        with pytest.raises(ValueError, match="base_model contains 0 NaN and 1 Inf values"):
            merged(base=broken)
    with monkeypatch.context() as patch:
        patch.setattr(sae_evolve._MixPlan, "one_pass", lambda *_: False)
        two = merged()
    assert all(torch.equal(bits, two[0]) for bits in one + two)


def _no_scan(*_args, **_kwargs):
    raise AssertionError("a merge of whole parents made a separate scan")


def test_a_pruned_entry_keeps_its_sign_of_zero_through_an_underflow():
    # 0.3 * -1e-45 underflows to -0; b's pruned -0.5 then adds -0, so the result is -0
    a = torch.tensor([-1e-45, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    b = torch.tensor([-0.5, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    merged = sae_merge([a, b], [0.3, 0.7], densities=[1.0, 0.5])
    assert raw_bits(merged)[0] == raw_bits(torch.tensor(-0.0))


def test_pruned_merge_above_two_to_the_24_is_the_same_at_one_and_two_threads():
    generator = torch.Generator().manual_seed(5)
    n = (1 << 24) + 333
    tensors = [torch.randn(n, generator=generator).to(torch.bfloat16) for _ in range(2)]
    merged = {}
    for threads in (1, 2):
        with parallel.kernel_threads(threads):
            merged[threads] = sae_merge(
                tensors, [0.5, 0.4], densities=[0.5, 0.3], offspring_density=0.25
            )
    assert torch.equal(raw_bits(merged[1]), raw_bits(merged[2]))
    assert int((merged[1] != 0).sum()) == round(0.25 * n)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.float16),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float64),
    ],
)
def test_the_result_has_the_dtype_the_inputs_promote_to(dtypes):
    tensors = [t.to(dtype) for t, dtype in zip(sparse_tensors(len(dtypes)), dtypes, strict=True)]
    expected = dtypes[0]
    for dtype in dtypes[1:]:
        expected = torch.promote_types(expected, dtype)
    assert sae_merge(tensors, [0.5] * len(tensors)).dtype == expected


@pytest.mark.parametrize(
    ("densities", "negative_zeros"),
    [([1.0, 0.5], True), ([1.0, 0.3, 0.4], True), ([1.0, 1e-9], False)],
)
def test_underflowing_entries_mix_like_x_times_zero_pruning(monkeypatch, densities, negative_zeros):
    monkeypatch.setattr(parallel, "CHUNK", 64)
    generator = torch.Generator().manual_seed(8)
    tensors = [torch.randn(4096, generator=generator) for _ in densities]
    tiny = torch.rand(4096, generator=generator) < 0.2
    tensors[0] = torch.where(tiny, torch.tensor(-1e-45), tensors[0])  # 0.3 * -1e-45 -> -0
    scores = [0.3, 0.7, 0.5][: len(densities)]
    expected = whole_tensor_sae(tensors, scores, densities=densities)
    assert bool((raw_bits(expected) == raw_bits(torch.tensor(-0.0))).any()) == negative_zeros
    for threads in (1, 2):
        with parallel.kernel_threads(threads):
            merged = sae_merge(tensors, scores, densities=densities)
        assert torch.equal(raw_bits(merged), raw_bits(expected)), threads


def test_non_finite_inputs_are_named_under_delta_and_an_overflowing_difference_is_not():
    generator = torch.Generator().manual_seed(4)
    base, a, b, reference = (torch.randn(40, 30, generator=generator) for _ in range(4))
    options = dict(densities=[0.5, 0.5], prune_target="delta", name="w")
    bad_base = base.clone()
    bad_base[7, 3] = float("nan")
    with pytest.raises(ValueError, match="w: base_model contains 1 NaN and 0 Inf values"):
        sae_merge([a, b], [0.5, 0.5], base=bad_base, **options)
    bad_b = b.clone()
    bad_b[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="w: input 1 contains 0 NaN and 1 Inf values"):
        sae_merge([a, bad_b], [0.5, 0.5], base=base, **options)
    bad_reference = reference.clone()
    bad_reference[1, 1] = float("inf")
    with pytest.raises(ValueError, match="w: dense reference contains 0 NaN and 1 Inf values"):
        sae_merge(
            [a, b],
            [0.5, 0.5],
            base=base,
            redense="original",
            dense_reference=bad_reference,
            **options,
        )
    a[0, 0], base[0, 0] = 3e38, -3e38  # finite inputs whose task vector overflows to +inf
    merged = sae_merge([a, b], [0.5, 0.5], base=base, **options)
    assert merged[0, 0] == float("inf")  # mixed as the whole-tensor passes mix it
