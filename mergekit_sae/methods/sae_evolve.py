"""The SAE per-tensor merge (paper eq. 5 with sparsity-aware weights) and its MergeKit wrapper.

For parents k = 1..K of one tensor, with scores s_k and sparsity rho_k:

    lambda_k = (s_k + beta * rho_k) / sum_j (s_j + beta * rho_j)
    merged   = sum_k lambda_k * theta_k / sum_k lambda_k * [theta_k != 0]   (renormalize=True)
    merged   = sum_k lambda_k * theta_k                                     (renormalize=False)

With ``prune_target="delta"`` every step (pruning, rho, attraction, re-densing) works on the
task vectors theta_k - base and the base is added back at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from mergekit.merge_methods import PerNonBase, TensorGroup, merge_method
from mergekit.merge_methods.base import BasePolicy, InputContract
from torch import Tensor

from mergekit_sae import parallel
from mergekit_sae.domains import (
    Density,
    Fraction,
    NonNegative,
    PruneTarget,
    Redense,
    Score,
    SparsityMeasure,
    SparsityScope,
    check_domain,
    choices,
)
from mergekit_sae.methods.kernel import (
    check_layout,
    compute_dtype,
    input_label,
    non_finite_error,
    promoted_dtype,
)
from mergekit_sae.parallel import block_size, blocks, kernel_scope, run_pass, spans
from mergekit_sae.sparsity import (
    CHUNK_ELEMENTS,
    DIGIT_BITS,
    EMPTY_STATS,
    BlockCut,
    Radix,
    Selection,
    SparsityStats,
    block_cuts,
    finish_selections,
    finite_keys,
    inf_key,
    key_bits,
    magnitude_keys,
    radix_histogram,
    radix_start,
    sparsity_from_stats,
    sparsity_stats,
)

# Largest size in bytes of the task vectors a delta merge of parents stored in another dtype
# (bfloat16, float16) keeps in the compute dtype between its passes: the scan converts and
# subtracts once, the selection and the mix reuse them (6% of a pruned bf16 merge); a larger
# tensor converts again in each pass. The same operations fill it, so it changes no bits.
PART_CACHE_BYTES = 1 << 30

SPARSITY_SCOPES = choices(SparsityScope)
PRUNE_TARGETS = choices(PruneTarget)
REDENSE_MODES = choices(Redense)


def sae_mixing_weights(
    scores: Sequence[float],
    rhos: Sequence[float],
    sparsity_weight: float,
    *,
    labels: Sequence[str] | None = None,
) -> list[float]:
    """Eq. 5 for K models: lambda_k = (s_k + beta*rho_k) / sum_j (s_j + beta*rho_j)."""
    if len(scores) != len(rhos):
        raise ValueError(f"got {len(scores)} scores but {len(rhos)} sparsity values")
    labels = list(labels) if labels is not None else [f"input {i}" for i in range(len(scores))]
    if not math.isfinite(sparsity_weight) or sparsity_weight < 0:
        raise ValueError(f"sparsity_weight must be a finite number >= 0, got {sparsity_weight}")
    for label, score, rho in zip(labels, scores, rhos, strict=True):
        if score is None:
            raise ValueError(f"{label} has no score; set its `score` parameter")
        if not math.isfinite(score) or score < 0:
            raise ValueError(f"score of {label} must be a finite number >= 0, got {score}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"sparsity of {label} must be in [0, 1], got {rho}")
    if not any(score > 0 for score in scores):
        raise ValueError("all scores are zero; at least one model needs a positive score")
    raw = [score + sparsity_weight * rho for score, rho in zip(scores, rhos, strict=True)]
    total = sum(raw)
    return [value / total for value in raw]


def _per_model(values: Sequence | None, count: int, field: str, name: str) -> list | None:
    """Check that a per-model parameter has one value per model."""
    if values is None:
        return None
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name}: {field} has {len(values)} values for {count} models")
    return values


def _validate_options(
    *,
    sparsity_measure: str,
    sparsity_scope: str,
    prune_target: str,
    redense: str,
    offspring_density: float,
    densities: Sequence[float],
    labels: Sequence[str],
    name: str,
) -> None:
    """Check the options and densities against their declared domains before any tensor work."""
    for alias, value, field in (
        (SparsityMeasure, sparsity_measure, "sparsity_measure"),
        (SparsityScope, sparsity_scope, "sparsity_scope"),
        (PruneTarget, prune_target, "prune_target"),
        (Redense, redense, "redense"),
        (Density, offspring_density, "offspring_density"),
    ):
        check_domain(alias, value, field, name)
    for label, density in zip(labels, densities, strict=True):
        check_domain(Density, density, f"density of {label}", name)


def _check_needs(
    prune_target: str, base: Tensor | None, redense: str, reference: Tensor | None, name: str
) -> None:
    """Delta pruning needs a base; re-densing from the original needs a dense reference."""
    if prune_target == "delta" and base is None:
        raise ValueError(f"{name}: prune_target 'delta' needs a base_model")
    if redense == "original" and reference is None:
        raise ValueError(
            f"{name}: redense 'original' needs a dense reference; "
            "mark a model with `dense_reference: true`"
        )


def _global_rhos(
    scope: str, values: Sequence[float | None] | None, labels: Sequence[str], name: str
) -> list[float] | None:
    """The given per-model global sparsity for scope 'global' (None for scope 'local')."""
    if scope != "global":
        return None
    rhos = _per_model(values, len(labels), "global_sparsity", name) or [None] * len(labels)
    missing = [label for label, rho in zip(labels, rhos, strict=True) if rho is None]
    if missing:
        raise ValueError(
            f"{name}: sparsity_scope 'global' needs each model's `global_sparsity` "
            f"(missing for {', '.join(missing)}); pass it per model, or run the recipe with "
            "`mergekit-sae merge`, which computes it"
        )
    for label, rho in zip(labels, rhos, strict=True):
        check_domain(Fraction, rho, f"global_sparsity of {label}", name)
    return rhos


def _mixing_weights(
    scores: Sequence[float],
    rhos: Sequence[float],
    sparsity_weight: float,
    labels: Sequence[str],
    name: str,
) -> list[float]:
    """Eq. 5 weights, with the tensor's name in front of any error."""
    try:
        return sae_mixing_weights(scores, rhos, sparsity_weight, labels=labels)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error


@kernel_scope()
def sae_merge(
    tensors: Sequence[Tensor],
    scores: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    sparsity_weight: float = 0.0,
    sparsity_measure: str = "zero_count",
    sparsity_scope: str = "local",
    global_sparsity: Sequence[float] | None = None,
    renormalize: bool = True,
    prune_target: str = "weights",
    base: Tensor | None = None,
    offspring_density: float = 1.0,
    redense: str = "parents",
    dense_reference: Tensor | None = None,
    name: str = "tensor",
    labels: Sequence[str] | None = None,
) -> Tensor:
    """Merge K >= 2 parents of one tensor with sparsity-aware weights (paper eq. 5, docs/method.md).

    Steps: prune each parent to its density -> rho of each (pruned) parent, or the given
    global sparsity -> eq. 5 weights -> re-dense from `dense_reference` when redense is
    "original" -> attraction mix -> prune the result to `offspring_density`. Computes in
    float32 (float64 for float64 inputs) and returns the inputs' promoted dtype.
    """
    count = len(tensors)
    labels = list(labels) if labels is not None else [f"input {i}" for i in range(count)]
    if count < 2:
        raise ValueError(f"{name}: sae_evolve needs at least 2 models to mix, got {count}")
    scores = _per_model(scores, count, "score", name)
    densities = _per_model(densities, count, "density", name) or [1.0] * count
    _validate_options(
        sparsity_measure=sparsity_measure,
        sparsity_scope=sparsity_scope,
        prune_target=prune_target,
        redense=redense,
        offspring_density=offspring_density,
        densities=densities,
        labels=labels,
        name=name,
    )
    _mixing_weights(scores, [0.0] * count, sparsity_weight, labels, name)  # before tensor work
    _check_needs(prune_target, base, redense, dense_reference, name)
    rhos = _global_rhos(sparsity_scope, global_sparsity, labels, name)
    extras = {"base_model": base, "dense reference": dense_reference}
    extras = {label: tensor for label, tensor in extras.items() if tensor is not None}
    inputs = [*tensors, *extras.values()]
    names = [*labels, *extras]
    check_layout(inputs, names, name)

    plan = _MixPlan(tensors, compute_dtype(inputs), base, dense_reference, prune_target == "delta")
    counts = [round(density * plan.numel) for density in densities]
    local_rhos = rhos is None and sparsity_weight > 0
    if rhos is None and not local_rhos:
        rhos = [0.0] * count
    if rhos is not None and plan.one_pass(counts, offspring_density):
        weights = _mixing_weights(scores, rhos, sparsity_weight, labels, name)
        result, finite = plan.mix_whole(weights, renormalize, promoted_dtype(tensors))
        _check_finite(finite, inputs, names, name)
        return result
    scan = plan.scan(counts, count_nonzero=local_rhos and sparsity_measure == "zero_count")
    _check_finite(scan.finite, inputs, names, name)
    cuts = plan.parent_selections(counts, scan)
    if rhos is None:
        rhos = [
            plan.parent_sparsity(i, cuts[i], counts[i], sparsity_measure, scan)
            for i in range(count)
        ]
    weights = _mixing_weights(scores, rhos, sparsity_weight, labels, name)
    return plan.mix(cuts, weights, renormalize, offspring_density, promoted_dtype(tensors), scan)


def _check_finite(
    finite: Sequence[bool], inputs: Sequence[Tensor], labels: Sequence[str], name: str
) -> None:
    """Raise the error naming the first input that holds an Inf or a NaN."""
    for index, ok in enumerate(finite):
        if not ok:
            raise non_finite_error(inputs[index], labels[index], name)


# How a parent enters the mix: every entry (a density-1 parent), no entry (density rounds to
# k = 0), or the entries a selection keeps.
_KEEP_ALL = None


class _ZeroMask:
    """The mask of a parent pruned to zero entries (density rounds to k = 0)."""


_KEEP_NONE = _ZeroMask()
Mask = Selection | _ZeroMask | None


class _Scan(NamedTuple):
    """What the first pass learned: finiteness of every input, non-zeros of each parent, the
    blocks' first-digit histograms of the parents being pruned, and the chunks where no
    parent holds a zero."""

    finite: list[bool]
    nonzero: list[int]
    hists: list[list[Tensor] | None]
    zero_free: list[list[bool]]


class _BlockScan(NamedTuple):
    """One block's share of a _Scan."""

    finite: list[bool]
    nonzero: list[int]
    hists: list[Tensor | None]
    zero_free: list[bool]


class _MixPlan:
    """The passes of sae_merge over flat views of the inputs, block by block on the kernel's
    workers (``mergekit_sae.parallel``).

    1. scan: finiteness of every input, non-zeros of each parent, the first digit of each
       pruned parent's magnitude selection, and which chunks hold no zero in any parent;
    2. one more pass per remaining digit of a selection (task vectors and float32 keys);
    3. mix: the pruned parts, re-densing, the attraction mix, the base added back and the
       cast, chunk by chunk (with offspring pruning: the merged task vector kept in float32
       and the first digit of its selection, then one pass per remaining digit and a last
       pass that prunes, adds the base and casts).
    With every parent whole on its stored values and the child not pruned, 1 and 3 are one
    pass (:meth:`mix_whole`). Every step is elementwise or an integer count, so the results are
    the same bits as whole-tensor passes, whatever the chunk size or thread count. Under delta
    the scan keeps the parents' task vectors (``parts``, within PART_CACHE_BYTES) for the later
    passes.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        dtype: torch.dtype,
        base: Tensor | None,
        reference: Tensor | None,
        delta: bool,
    ):
        self.flats = [t.reshape(-1) for t in tensors]
        self.base = base.reshape(-1) if base is not None else None
        self.reference = reference.reshape(-1) if reference is not None else None
        self.dtype = dtype
        self.origin = self.base if delta else None
        self.shape = tensors[0].shape
        self.numel = tensors[0].numel()
        self.device = tensors[0].device
        self.chunk = parallel.CHUNK
        self.blocks = blocks(self.numel, block_size(self.numel, self.chunk))
        self.parts: list[Tensor] | None = None  # the task vectors, once the scan kept them

    def _chunks(self, block: slice) -> Iterator[slice]:
        return spans(block.start, block.stop, self.chunk)

    def _origin(self, span: slice) -> Tensor | None:
        return self.origin[span].to(self.dtype) if self.origin is not None else None

    def _part(
        self, index: int, span: slice, origin: Tensor | None, out: Tensor | None = None
    ) -> Tensor:
        """Parent ``index`` on a span in the compute dtype, as a task vector under delta (in
        place on the converted copy, or in ``out``: the scan filling the kept task vectors; an
        input already in the compute dtype is not written). Once the scan kept the task
        vectors, their slice (``origin`` is then not needed)."""
        if self.parts is not None:
            return self.parts[index][span]
        stored = self.flats[index][span]
        if origin is None:
            return stored.to(self.dtype)
        if out is not None:
            return out.copy_(stored).sub_(origin)
        if stored.dtype == self.dtype:
            return stored - origin
        return stored.to(self.dtype).sub_(origin)

    def _span_origin(self, span: slice) -> Tensor | None:
        """The base on a span when the parents' parts need it (under delta, before the scan
        kept them), else None."""
        return self._origin(span) if self.parts is None else None

    def _part_cache(self) -> list[Tensor] | None:
        """Empty task vectors for the scan to fill: under delta, within PART_CACHE_BYTES, for
        parents stored in another dtype (whose parts each pass would convert again)."""
        size = torch.empty((), dtype=self.dtype).element_size() * self.numel * len(self.flats)
        converted = any(flat.dtype != self.dtype for flat in self.flats)
        if self.origin is None or not converted or size > PART_CACHE_BYTES:
            return None
        return [torch.empty(self.numel, dtype=self.dtype, device=self.device) for _ in self.flats]

    def _key_dtype(self, index: int) -> torch.dtype:
        """The dtype a parent's magnitudes are keyed in: stored weights (widening to the
        compute dtype is exact and keeps the order of |x|), or computed task vectors."""
        return self.flats[index].dtype if self.origin is None else self.dtype

    def _keys(self, index: int, span: slice, part: Tensor) -> Tensor:
        """Magnitude keys of a parent's part on a span (of the stored values for weights)."""
        return magnitude_keys(self.flats[index][span] if self.origin is None else part)

    def scan(self, counts: Sequence[int], *, count_nonzero: bool) -> _Scan:
        """Pass 1 over every block (see the class docstring). Non-zeros are counted for the
        parents kept whole (pruned ones get theirs from the first digit's histogram)."""
        radixes = [
            radix_start(k, key_bits(self._key_dtype(i))) if 0 < k < self.numel else None
            for i, k in enumerate(counts)
        ]
        whole = [k >= self.numel for k in counts]

        extras = [t for t in (self.base, self.reference) if t is not None]
        inputs = [*self.flats, *extras]
        cache = self._part_cache()

        def finite(index: int, span: slice) -> bool:
            return finite_keys(magnitude_keys(inputs[index][span]), inputs[index].dtype)

        def block(part: slice) -> _BlockScan:
            checked = [True] * len(inputs)
            nonzero = [0] * len(self.flats)
            hists: list[Tensor | None] = [None] * len(self.flats)
            zero_free = []
            for span in self._chunks(part):
                origin = self._origin(span)
                free = True
                for index in range(len(self.flats)):
                    kept = cache[index][span] if cache is not None else None
                    part_ = self._part(index, span, origin, kept) if origin is not None else None
                    keys = self._keys(index, span, part_)
                    low, high = torch.aminmax(keys) if whole[index] else (None, keys.max())
                    if int(high) >= inf_key(self._key_dtype(index)):
                        # an Inf or NaN in this parent (or, under delta, in the base), or
                        # a difference that overflowed: check the stored values themselves
                        checked[index] &= finite(index, span)
                        if self.origin is not None:
                            checked[len(self.flats)] &= finite(len(self.flats), span)
                    if whole[index]:
                        free &= int(low) > 0
                        nonzero[index] += _chunk_nonzero(keys, int(low)) if count_nonzero else 0
                    else:
                        free = False
                    if radixes[index] is not None:
                        hist = radix_histogram(keys, radixes[index])
                        hists[index] = hist if hists[index] is None else hists[index].add_(hist)
                for index in range(len(self.flats), len(inputs)):
                    if self.origin is None or inputs[index] is not self.base:
                        checked[index] &= finite(index, span)
                zero_free.append(free)
            hists = [h.to(torch.int32) if h is not None else None for h in hists]
            return _BlockScan(checked, nonzero, hists, zero_free)

        results = run_pass(block, self.blocks, self.device)
        self.parts = cache
        return _Scan(
            finite=[all(r.finite[i] for r in results) for i in range(len(results[0].finite))],
            nonzero=[sum(r.nonzero[i] for r in results) for i in range(len(self.flats))],
            hists=[
                [r.hists[i] for r in results] if radix is not None else None
                for i, radix in enumerate(radixes)
            ],
            zero_free=[r.zero_free for r in results],
        )

    def _nonzero(self, index: int) -> int:
        """Non-zeros of parent ``index``'s part (stored values, or the task vector), exactly."""

        def block(part: slice) -> int:
            total = 0
            for span in self._chunks(part):
                keys = self._keys(index, span, self._part(index, span, self._span_origin(span)))
                total += int(torch.count_nonzero(keys))
            return total

        return sum(run_pass(block, self.blocks, self.device))

    def _pruned_nonzero(self, index: int, k: int, scan: _Scan) -> int:
        """Non-zeros of a parent pruned to its k largest magnitudes: min(k, non-zeros). The
        first digit's bin 0 holds the zeros (and, for 32-bit keys, magnitudes below 2**-133),
        so its complement bounds the non-zeros from below; an exact count only when needed."""
        small = sum(int(hist[0]) for hist in scan.hists[index])
        if self.numel - small >= k:
            return k
        if key_bits(self._key_dtype(index)) == DIGIT_BITS:
            return self.numel - small
        return min(k, self._nonzero(index))

    def parent_selections(self, counts: Sequence[int], scan: _Scan) -> list[Mask]:
        """Each parent's mask: all entries, none, or the selection of its k largest
        magnitudes (finished together: one pass per remaining digit for all parents)."""
        pruned = [i for i, k in enumerate(counts) if 0 < k < self.numel]

        def chunk_keys(part: slice, wanted: Sequence[int]) -> Iterator[list[Tensor]]:
            for span in self._chunks(part):
                origin = self._span_origin(span)
                keys = []
                for index in (pruned[position] for position in wanted):
                    values = self._part(index, span, origin) if self.origin is not None else None
                    keys.append(self._keys(index, span, values))
                yield keys

        selections = finish_selections(
            [radix_start(counts[i], key_bits(self._key_dtype(i))) for i in pruned],
            [scan.hists[i] for i in pruned],
            chunk_keys,
            self.blocks,
            self.device,
        )
        masks: list[Mask] = [_KEEP_ALL if k >= self.numel else _KEEP_NONE for k in counts]
        for index, selection in zip(pruned, selections, strict=True):
            masks[index] = selection
        return masks

    def _cuts(self, index: int, mask: Mask) -> list[BlockCut | None]:
        """Fresh per-block cuts of a parent's selection (None per block for the other masks)."""
        if not isinstance(mask, Selection):
            return [None] * len(self.blocks)
        return block_cuts(mask, self._key_dtype(index), self.dtype)

    def _pruned(
        self, index: int, part: Tensor, span: slice, mask: Mask, cut: BlockCut | None
    ) -> Tensor:
        """Parent ``index``'s part on a span, pruned by its block's cut (dropped entries +0)."""
        if mask is _KEEP_ALL:
            return part
        if mask is _KEEP_NONE:
            return torch.zeros_like(part)
        return cut(part, lambda: self._keys(index, span, part))

    def parent_sparsity(self, index: int, mask: Mask, k: int, measure: str, scan: _Scan) -> float:
        """rho of the pruned parent, its norms summed over CHUNK_ELEMENTS blocks as sparsity()
        sums them.

        zero_count needs no pruned copy: pruning to k entries keeps the k largest magnitudes,
        so it leaves min(k, non-zeros) non-zeros (zeros have the smallest key)."""
        if measure == "zero_count" and mask is not _KEEP_NONE:
            nonzero = scan.nonzero[index]
            if isinstance(mask, Selection):
                nonzero = self._pruned_nonzero(index, k, scan)
            return sparsity_from_stats(
                SparsityStats(self.numel, self.numel - nonzero, 0, 0), measure
            )
        norms = measure == "magnitude"
        cuts = self._cuts(index, mask)
        per_block = blocks(self.numel, CHUNK_ELEMENTS)
        within = max(1, CHUNK_ELEMENTS // (self.blocks[0].stop - self.blocks[0].start))

        def block(number: int) -> SparsityStats:
            part = per_block[number]
            buffer = torch.empty(part.stop - part.start, dtype=self.dtype, device=self.device)
            first = number * within
            for cut, inner in zip(cuts[first:], self.blocks[first : first + within], strict=False):
                for span in self._chunks(inner):
                    part_ = self._part(index, span, self._span_origin(span))
                    chunk = self._pruned(index, part_, span, mask, cut)
                    buffer[span.start - part.start : span.stop - part.start] = chunk
            return sparsity_stats(buffer, norms=norms)

        stats = EMPTY_STATS
        for part in run_pass(block, range(len(per_block)), self.device):
            stats = stats.merged(part)
        return sparsity_from_stats(stats, measure)

    def one_pass(self, counts: Sequence[int], offspring_density: float) -> bool:
        """Whether :meth:`mix_whole` does this merge: every parent kept whole on its stored
        values (no task vectors, no dense reference) and the child not pruned."""
        k = round(offspring_density * self.numel)
        child_whole = offspring_density == 1.0 or k >= self.numel
        whole = all(count >= self.numel for count in counts)
        return whole and child_whole and self.origin is None and self.reference is None

    def mix_whole(
        self, weights: Sequence[float], renormalize: bool, out_dtype: torch.dtype
    ) -> tuple[Tensor, list[bool]]:
        """The scan and the mix in one pass, when :meth:`one_pass` holds: each chunk's keys
        tell its finiteness and whether a parent holds a zero there, then the chunk is mixed
        as :meth:`mix` mixes it (the same operations, so the same bits). Returns the result
        and, per input (the parents, then the base), whether it holds no Inf or NaN."""
        out = torch.empty(self.numel, dtype=out_dtype, device=self.device)
        present = _present(weights, self.dtype, self.device) if renormalize else None
        inputs = [*self.flats, *([self.base] if self.base is not None else [])]

        def block(part: slice) -> list[bool]:
            finite = [True] * len(inputs)
            for span in self._chunks(part):
                free = True
                for index, flat in enumerate(self.flats):
                    low, high = torch.aminmax(magnitude_keys(flat[span]))
                    finite[index] &= int(high) < inf_key(flat.dtype)
                    free &= int(low) > 0
                for index in range(len(self.flats), len(inputs)):
                    keys = magnitude_keys(inputs[index][span])
                    finite[index] &= finite_keys(keys, inputs[index].dtype)
                parts = [self._part(index, span, None) for index in range(len(self.flats))]
                dense = present if free else None
                out[span] = _attraction_mix(parts, weights, renormalize, dense, None)
            return finite

        results = run_pass(block, self.blocks, self.device)
        return out.view(self.shape), [all(r[i] for r in results) for i in range(len(inputs))]

    def mix(
        self,
        masks: Sequence[Mask],
        weights: Sequence[float],
        renormalize: bool,
        offspring_density: float,
        out_dtype: torch.dtype,
        scan: _Scan,
    ) -> Tensor:
        """Attraction mix of the pruned parents, pruned to offspring_density, base added back."""
        out = torch.empty(self.numel, dtype=out_dtype, device=self.device)
        k = round(offspring_density * self.numel)
        prune_offspring = not (offspring_density == 1.0 or k >= self.numel)
        merged = None
        if prune_offspring:
            merged = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        radix = radix_start(k, key_bits(self.dtype))
        cuts = [self._cuts(i, mask) for i, mask in enumerate(masks)]
        present = _present(weights, self.dtype, self.device) if renormalize else None
        checks = None
        if self.reference is None:  # re-densing replaces the pruned zeros, signs and all
            checks = [
                any(isinstance(m, Selection) for m in masks[i + 1 :]) for i in range(len(masks))
            ]

        def block(number: int) -> Tensor | None:
            hist = None
            for position, span in enumerate(self._chunks(self.blocks[number])):
                origin = self._origin(span)
                raw = [self._part(i, span, origin) for i in range(len(masks))]
                parts = [
                    self._pruned(i, part, span, mask, cuts[i][number])
                    for i, (part, mask) in enumerate(zip(raw, masks, strict=True))
                ]
                if self.reference is not None:
                    reference = self.reference[span].to(self.dtype)
                    reference = reference - origin if origin is not None else reference
                    parts = [torch.where(part == 0, reference, part) for part in parts]
                dense = present if scan.zero_free[number][position] else None
                mixed = _attraction_mix(parts, weights, renormalize, dense, checks)
                if mixed is None:  # a -0 sum met pruned entries: give them x * 0's sign
                    parts = [
                        p.copysign_(r) if isinstance(m, Selection) and p is not r else p
                        for p, r, m in zip(parts, raw, masks, strict=True)
                    ]
                    mixed = _attraction_mix(parts, weights, renormalize, dense, None)
                if merged is None:
                    out[span] = mixed.add_(origin) if origin is not None else mixed
                    continue
                merged[span] = mixed
                if k > 0:
                    counts = radix_histogram(magnitude_keys(mixed), radix)
                    hist = counts if hist is None else hist.add_(counts)
            return hist.to(torch.int32) if hist is not None else None

        hists = run_pass(block, range(len(self.blocks)), self.device)
        if merged is not None:
            self._prune_offspring(merged, k, radix, hists, out)
        return out.view(self.shape)

    def _prune_offspring(
        self, merged: Tensor, k: int, radix: Radix, hists: list, out: Tensor
    ) -> None:
        """Write merged pruned to its k largest magnitudes (plus the base) into ``out``."""
        cuts: list[BlockCut | None] = [None] * len(self.blocks)
        if k > 0:
            (selection,) = finish_selections(
                [radix],
                [hists],
                lambda part, _: ([magnitude_keys(merged[span])] for span in self._chunks(part)),
                self.blocks,
                self.device,
            )
            cuts = block_cuts(selection, self.dtype, self.dtype)

        def block(number: int) -> None:
            cut = cuts[number]
            for span in self._chunks(self.blocks[number]):
                chunk = merged[span]
                if cut is None:
                    pruned = torch.zeros_like(chunk)
                else:  # kept entries are its values; +0.0 makes a kept -0 +0
                    pruned = cut(chunk, lambda c=chunk: magnitude_keys(c))
                    pruned = pruned.add_(0.0) if cut.magnitude == 0.0 else pruned
                origin = self._origin(span)
                out[span] = pruned.add_(origin) if origin is not None else pruned

        run_pass(block, range(len(self.blocks)), self.device)


def _chunk_nonzero(keys: Tensor, low: int) -> int:
    """Non-zero keys of a chunk whose smallest key is ``low`` (all of them when it is not 0)."""
    return keys.numel() if low > 0 else int(torch.count_nonzero(keys))


def _present(weights: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The renormalizing divisor where every parent is non-zero: the weights summed from +0
    in order, in the compute dtype, as _attraction_mix sums them per position."""
    total = torch.zeros((), dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    for weight in weights:
        total.add_(one, alpha=weight)
    return total.clamp_min_(torch.finfo(dtype).tiny)


def _attraction_mix(
    parts: Sequence[Tensor],
    weights: Sequence[float],
    renormalize: bool,
    present: Tensor | None,
    checks: Sequence[bool] | None,
) -> Tensor | None:
    """Weighted sum; with renormalize, divide each position by the weight of its non-zeros.

    ``present`` is that divisor when no part holds a zero on this chunk (it is then the same
    at every position). Where no weighted non-zero contributes, the sum is +0 and so is
    +0 / tiny: no select is needed. ``|sign(x)|`` is the non-zero indicator (inputs are
    finite), without bool masks.

    Pruned entries here are +0, where pruning as ``x * 0`` gives a zero of x's sign. The two
    sum alike unless the running sum is -0 (a weighted entry that underflowed) when one is
    added: after each part flagged in ``checks`` a -0 in the sum returns None instead.
    """
    total = torch.zeros_like(parts[0])
    for index, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        total.add_(part, alpha=weight)
        if checks is not None and checks[index] and _has_negative_zero(total):
            return None
    if not renormalize:
        return total
    if present is not None:
        return total.div_(present)
    divisor = torch.zeros_like(parts[0])
    for part, weight in zip(parts, weights, strict=True):
        divisor.add_(torch.sign(part).abs_(), alpha=weight)
    return total.div_(divisor.clamp_min_(torch.finfo(divisor.dtype).tiny))


def _has_negative_zero(values: Tensor) -> bool:
    """Whether a float32/float64 tensor holds a -0: as signed integers, -0 is the minimum."""
    view = torch.int32 if values.dtype == torch.float32 else torch.int64
    return int(values.view(view).min()) == torch.iinfo(view).min


@merge_method(
    name="sae_evolve",
    pretty_name="Sparsity-Aware Evolution merge",
    reference_url="https://arxiv.org/abs/2602.08218",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_non_base=2),
)
def sae_evolve_merge(
    group: TensorGroup,
    score: PerNonBase[Score | None] = None,
    density: PerNonBase[Density] = 1.0,
    global_sparsity: PerNonBase[Fraction | None] = None,
    dense_reference: PerNonBase[bool] = False,
    sparsity_weight: NonNegative = 0.0,
    sparsity_measure: SparsityMeasure = "zero_count",
    sparsity_scope: SparsityScope = "local",
    renormalize: bool = True,
    prune_target: PruneTarget = "weights",
    offspring_density: Density = 1.0,
    redense: Redense = "parents",
) -> Tensor:
    """MergeKit adapter: split the group into parents, base and dense references for sae_merge."""
    name = group.metadata.name or "tensor"
    references = [e for e in group.non_base if dense_reference[e.id]]
    parents = [e for e in group.non_base if not dense_reference[e.id]]
    reference = None
    if references and redense != "original":
        raise ValueError(
            f"{name}: models marked `dense_reference: true` are used only with "
            f"`redense: original` (redense is {redense!r})"
        )
    if references:
        dtype = compute_dtype([e.tensor for e in references])
        reference = torch.stack([e.tensor.to(dtype) for e in references]).mean(dim=0)
    result = sae_merge(
        [e.tensor for e in parents],
        [score[e.id] for e in parents],
        densities=[density[e.id] for e in parents],
        sparsity_weight=sparsity_weight,
        sparsity_measure=sparsity_measure,
        sparsity_scope=sparsity_scope,
        global_sparsity=[global_sparsity[e.id] for e in parents],
        renormalize=renormalize,
        prune_target=prune_target,
        base=group.base.tensor if group.base is not None else None,
        offspring_density=offspring_density,
        redense=redense,
        dense_reference=reference,
        name=name,
        labels=[input_label(e.id) for e in parents],
    )
    return result.to(group.entries[0].tensor.dtype)
