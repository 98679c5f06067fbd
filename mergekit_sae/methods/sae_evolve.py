"""The SAE per-tensor merge (paper eq. 5 with sparsity-aware weights) and its MergeKit wrapper.

For parents k = 1..K of one tensor, with scores s_k and sparsity rho_k:

    lambda_k = (s_k + beta * rho_k) / sum_j (s_j + beta * rho_j)
    merged   = sum_k lambda_k * theta_k / sum_k lambda_k * [theta_k != 0]   (renormalize=True)
    merged   = sum_k lambda_k * theta_k                                     (renormalize=False)

With ``prune_target="delta"`` every step (pruning, rho, attraction, re-densing) works on the
task vectors theta_k - base and the base is added back at the end.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from mergekit.merge_methods import PerNonBase, TensorGroup, merge_method
from mergekit.merge_methods.base import BasePolicy, InputContract
from torch import Tensor

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
    check_tensors,
    compute_dtype,
    input_label,
    promoted_dtype,
)
from mergekit_sae.sparsity import (
    CHUNK_ELEMENTS,
    EMPTY_STATS,
    KeepMask,
    SparsityStats,
    Threshold,
    count_nonzero,
    magnitude_keys,
    select_threshold,
    sparsity_from_stats,
    sparsity_stats,
)

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


def _task_part(tensor: Tensor, dtype: torch.dtype, origin: Tensor | None) -> Tensor:
    """A parent in the compute dtype, as a task vector (minus ``origin``) when one is given."""
    part = tensor.to(dtype)
    return part - origin if origin is not None else part


def _attraction_mix(parts: Sequence[Tensor], weights: Sequence[float], renormalize: bool) -> Tensor:
    """Weighted sum; with renormalize, divide each position by the weight of its non-zeros.

    Where no weighted non-zero contributes, the sum is +0 and so is +0 / tiny: no select is
    needed. ``|x|.sign()`` is the non-zero indicator (inputs are finite), without bool masks.
    """
    total = torch.zeros_like(parts[0])
    present = torch.zeros_like(parts[0]) if renormalize else None
    for part, weight in zip(parts, weights, strict=True):
        total.add_(part, alpha=weight)
        if present is not None:
            present.add_(part.abs().sign_(), alpha=weight)
    if present is None:
        return total
    return total.div_(present.clamp_min_(torch.finfo(present.dtype).tiny))


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
    check_tensors([*tensors, *extras.values()], [*labels, *extras], name)

    dtype = compute_dtype([*tensors, *extras.values()])
    plan = _MixPlan(tensors, dtype, base if prune_target == "delta" else None, dense_reference)
    with _kernel_threads(tensors[0].device):
        masks = [plan.parent_mask(i, d) for i, d in enumerate(densities)]
        if rhos is None:
            rhos = [
                plan.parent_sparsity(i, mask, sparsity_measure, density)
                for i, (mask, density) in enumerate(zip(masks, densities, strict=True))
            ]
        weights = _mixing_weights(scores, rhos, sparsity_weight, labels, name)
        return plan.mix(masks, weights, renormalize, offspring_density, promoted_dtype(tensors))


# CPU threads for the chunked passes. Each chunk is small and memory-bound, so a parallel
# region per operation gains little and stalls whenever another process holds a core
# (measured: 5-20x slower on a busy 2-core machine); None keeps torch's setting.
KERNEL_THREADS: int | None = 1


@contextlib.contextmanager
def _kernel_threads(device: torch.device) -> Iterator[None]:
    """Run the kernel's CPU passes on KERNEL_THREADS threads, restoring torch's count after."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or KERNEL_THREADS is None or previous == KERNEL_THREADS:
        yield
        return
    torch.set_num_threads(KERNEL_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# Elements per chunk of the fused passes: a few float32 buffers of this size stay in cache.
MIX_CHUNK = 1 << 18
_KEEP_ALL = None


class _ZeroMask:
    """The mask of a parent pruned to zero entries (density rounds to k = 0)."""


_KEEP_NONE = _ZeroMask()


class _MixPlan:
    """The fused, chunked passes of sae_merge over flat views of the inputs.

    Every step (task vector, pruning mask, re-densing, attraction mix, offspring pruning,
    base added back, cast) is elementwise, so computing it chunk by chunk in cache-sized
    pieces gives the same bits as whole-tensor passes; only the selections (k-th largest
    magnitude) and the sparsity counts see the whole tensor, through extra chunked passes.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        dtype: torch.dtype,
        origin: Tensor | None,
        reference: Tensor | None,
    ):
        self.flats = [t.reshape(-1) for t in tensors]
        self.dtype = dtype
        self.origin = origin.reshape(-1) if origin is not None else None
        self.reference = reference.reshape(-1) if reference is not None else None
        self.shape = tensors[0].shape
        self.numel = tensors[0].numel()

    def _spans(self, size: int = MIX_CHUNK) -> Iterator[slice]:
        for start in range(0, self.numel, size):
            yield slice(start, min(start + size, self.numel))

    def _origin(self, span: slice) -> Tensor | None:
        return self.origin[span].to(self.dtype) if self.origin is not None else None

    def _part(self, index: int, span: slice, origin: Tensor | None) -> Tensor:
        """Parent ``index`` on a span in the compute dtype, as a task vector under delta."""
        return _task_part(self.flats[index][span], self.dtype, origin)

    def _keys(self, index: int, span: slice, part: Tensor) -> Tensor:
        """Magnitude keys of a parent's part: of the stored tensor itself when it is the
        weights (widening to the compute dtype is exact and keeps the order of |x|)."""
        return magnitude_keys(self.flats[index][span] if self.origin is None else part)

    def parent_mask(self, index: int, density: float) -> Threshold | _ZeroMask | None:
        """The threshold that prunes parent ``index`` to ``density`` (None: keep everything)."""
        n = self.numel
        k = round(density * n)
        if density == 1.0 or k >= n:
            return _KEEP_ALL
        if k == 0:
            return _KEEP_NONE

        def key_chunks() -> Iterator[Tensor]:
            for span in self._spans():
                origin = self._origin(span) if self.origin is not None else None
                part = self._part(index, span, origin) if origin is not None else None
                yield self._keys(index, span, part)

        bits = self.flats[index].element_size() if self.origin is None else _width(self.dtype)
        return select_threshold(key_chunks, k, key_bits=bits * 8, device=self.flats[0].device)

    def _pruned(self, index: int, span: slice, mask: object, keep: KeepMask | None, origin):
        """Parent ``index`` on a span, pruned (``keep`` is the running mask of the pass)."""
        part = self._part(index, span, origin)
        if mask is _KEEP_ALL:
            return part
        if mask is _KEEP_NONE:
            return torch.zeros_like(part)
        return part * keep(self._keys(index, span, part))  # a pruned -0 mixes like +0

    def _nonzero(self, index: int, span: slice) -> int:
        """Non-zeros of parent ``index``'s part on a span (of the stored values: weights)."""
        if self.origin is None:
            return count_nonzero(self.flats[index][span])
        return count_nonzero(self._part(index, span, self._origin(span)))

    def _pruned_chunks(self, index: int, mask: object, size: int) -> Iterator[Tensor]:
        keep = KeepMask(mask) if isinstance(mask, Threshold) else None
        for span in self._spans(size):
            yield self._pruned(index, span, mask, keep, self._origin(span))

    def parent_sparsity(self, index: int, mask: object, measure: str, density: float) -> float:
        """rho of the pruned parent, summed over CHUNK_ELEMENTS chunks as sparsity() does.

        zero_count needs no pruned copy: pruning to k entries keeps the k largest magnitudes,
        so it leaves min(k, non-zeros) non-zeros (zeros have the smallest key)."""
        if measure == "zero_count" and mask is not _KEEP_NONE:
            nonzero = sum(self._nonzero(index, span) for span in self._spans())
            if isinstance(mask, Threshold):
                nonzero = min(nonzero, round(density * self.numel))
            return sparsity_from_stats(
                SparsityStats(self.numel, self.numel - nonzero, 0, 0), measure
            )
        norms = measure == "magnitude"
        size = CHUNK_ELEMENTS if norms else MIX_CHUNK
        stats = EMPTY_STATS
        for part in self._pruned_chunks(index, mask, size):
            stats = stats.merged(sparsity_stats(part, norms=norms))
        return sparsity_from_stats(stats, measure)

    def mix(
        self,
        masks: Sequence[object],
        weights: Sequence[float],
        renormalize: bool,
        offspring_density: float,
        out_dtype: torch.dtype,
    ) -> Tensor:
        """Attraction mix of the pruned parents, pruned to offspring_density, base added back."""
        device = self.flats[0].device
        out = torch.empty(self.numel, dtype=out_dtype, device=device)
        k = round(offspring_density * self.numel)
        prune_offspring = not (offspring_density == 1.0 or k >= self.numel)
        merged = None
        if prune_offspring:
            merged = torch.empty(self.numel, dtype=self.dtype, device=device)
        keeps = [KeepMask(m) if isinstance(m, Threshold) else None for m in masks]
        for span in self._spans():
            origin = self._origin(span)
            parts = [
                self._pruned(i, span, mask, keep, origin)
                for i, (mask, keep) in enumerate(zip(masks, keeps, strict=True))
            ]
            if self.reference is not None:
                reference = _task_part(self.reference[span], self.dtype, origin)
                parts = [torch.where(part == 0, reference, part) for part in parts]
            mixed = _attraction_mix(parts, weights, renormalize)
            if merged is not None:
                merged[span] = mixed
            else:
                out[span] = mixed.add_(origin) if origin is not None else mixed
        if merged is not None:
            self._prune_offspring(merged, k, out)
        return out.view(self.shape)

    def _prune_offspring(self, merged: Tensor, k: int, out: Tensor) -> None:
        """Write merged pruned to its k largest magnitudes (plus the base) into ``out``."""
        keep = None
        if k > 0:
            threshold = select_threshold(
                lambda: (magnitude_keys(merged[span]) for span in self._spans()),
                k,
                key_bits=_width(self.dtype) * 8,
                device=merged.device,
            )
            keep = KeepMask(threshold)
        for span in self._spans():
            chunk = merged[span]
            if keep is None:
                pruned = torch.zeros_like(chunk)
            else:
                pruned = chunk.mul_(keep(magnitude_keys(chunk))).add_(0.0)  # -0 -> +0
            origin = self._origin(span)
            out[span] = pruned.add_(origin) if origin is not None else pruned


def _width(dtype: torch.dtype) -> int:
    """Bytes per element of a dtype."""
    return torch.empty((), dtype=dtype).element_size()


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
