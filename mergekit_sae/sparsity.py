"""Magnitude pruning, sparsity measures and the cyclic sparsity schedule (pure tensor math).

Pruning selects the k-th largest magnitude with a radix select over the bit patterns of |x|
(non-negative IEEE floats order like their bits): one histogram pass per 16-bit digit (one
for float16/bfloat16, two for float32), with no sort. Each pass runs over blocks of the
tensor on the kernel's worker threads (``mergekit_sae.parallel``); histograms are integer
counts, so the selection is the same whatever the thread count. The final digit's histogram
of every block is kept, so each block knows how many of the threshold's ties it holds and
ties are kept by position (earlier first) without another pass. It works above
``torch.quantile``'s 2**24-element limit, in float16/bfloat16/float32/float64, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mergekit_sae.domains import SparsityMeasure, check_schedule, choices
from mergekit_sae.parallel import CHUNK, block_size, blocks, kernel_scope, run_pass, spans

SPARSITY_MEASURES: tuple[str, ...] = choices(SparsityMeasure)

CHUNK_ELEMENTS = 1 << 22  # elements per partial sum of the sparsity statistics
DIGIT_BITS = 16
DIGITS = 1 << DIGIT_BITS
# dtype -> (signed integer view, mask clearing the sign bit); the masked bits order like |x|
_KEY_VIEW = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFF_FFFF),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF),
}
# dtype -> the key of +inf: a key at or above it is an Inf or a NaN
_INF_KEY = {
    dtype: int(torch.tensor(math.inf, dtype=dtype).view(view))
    for dtype, (view, _) in _KEY_VIEW.items()
}


def magnitude_keys(chunk: Tensor) -> Tensor:
    """Non-negative integer keys that order like |x| (the float's bits without the sign)."""
    if chunk.dtype not in _KEY_VIEW:
        raise TypeError(f"magnitude pruning needs a floating-point tensor, got {chunk.dtype}")
    view, mask = _KEY_VIEW[chunk.dtype]
    return chunk.view(view) & mask


def key_bits(dtype: torch.dtype) -> int:
    """Bits of a dtype's magnitude keys (its width)."""
    return torch.empty((), dtype=dtype).element_size() * 8


def inf_key(dtype: torch.dtype) -> int:
    """The magnitude key of +inf in ``dtype``: a key at or above it is an Inf or a NaN."""
    return _INF_KEY[dtype]


def finite_keys(keys: Tensor, dtype: torch.dtype) -> bool:
    """Whether magnitude keys of ``dtype`` values hold no Inf or NaN (every key below +inf's)."""
    return keys.numel() == 0 or int(keys.max()) < inf_key(dtype)


def _check_density(density: float, what: str = "density") -> None:
    """Reject densities outside (0, 1] with an actionable message."""
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"{what} must be in (0, 1], got {density!r}")


class Threshold(NamedTuple):
    """A magnitude threshold: keep keys above ``key`` and the first ``equal`` keys equal to it."""

    key: int
    equal: int


class Radix(NamedTuple):
    """A radix select in progress: the digits of the k-th largest key fixed so far.

    ``remaining`` keys are still to take among those whose higher digits are ``prefix``;
    the next histogram counts the 16-bit digit at bit ``shift`` of ``bits``-bit keys.
    """

    remaining: int
    prefix: int
    shift: int
    bits: int


def radix_start(k: int, bits: int) -> Radix:
    """The selection of the k-th largest of ``bits``-bit keys, before any digit is known."""
    return Radix(k, 0, bits - DIGIT_BITS, bits)


def radix_histogram(keys: Tensor, radix: Radix) -> Tensor:
    """Counts of the next digit among the keys in the prefix's range (all keys at the top
    level). Keys outside the range are clamped into two overflow bins and dropped:
    arithmetic and one bincount, no boolean indexing."""
    if radix.shift == radix.bits - DIGIT_BITS:
        digits = keys >> radix.shift if radix.shift else keys
        return torch.bincount(digits, minlength=DIGITS)
    # bin = floor((key - prefix's first key) / 2**shift) + 1, the +1 folded into the offset
    # (an arithmetic right shift is a floor division by a power of two)
    bins = keys - ((radix.prefix << (radix.shift + DIGIT_BITS)) - (1 << radix.shift))
    if radix.shift:
        bins.bitwise_right_shift_(radix.shift)
    return torch.bincount(bins.clamp_(0, DIGITS + 1), minlength=DIGITS + 2)[1 : DIGITS + 1]


def radix_step(radix: Radix, hist: Tensor) -> Radix | Threshold:
    """Fix the next digit from its histogram: the next Radix, or the Threshold after the last."""
    at_or_above = hist.flip(0).cumsum(0)
    index = int(torch.searchsorted(at_or_above, radix.remaining))
    digit = DIGITS - 1 - index
    remaining = radix.remaining - (int(at_or_above[index]) - int(hist[digit]))
    prefix = (radix.prefix << DIGIT_BITS) | digit
    if radix.shift == 0:
        return Threshold(prefix, remaining)
    return radix._replace(remaining=remaining, prefix=prefix, shift=radix.shift - DIGIT_BITS)


def block_histograms(chunks: Iterable[Sequence[Tensor]], radixes: Sequence[Radix]) -> list:
    """Each selection's next-digit counts over one block (``chunks`` yields, per chunk, the
    keys of each selection in order); int32, as a block holds fewer than 2**31 keys."""
    totals: list[Tensor | None] = [None] * len(radixes)
    for keys in chunks:
        for index, (chunk, radix) in enumerate(zip(keys, radixes, strict=True)):
            hist = radix_histogram(chunk, radix)
            totals[index] = hist if totals[index] is None else totals[index].add_(hist)
    return [total.to(torch.int32) for total in totals]


class Selection(NamedTuple):
    """A finished selection: the threshold and how many keys equal to it each block holds."""

    threshold: Threshold
    ties: list[int]


# (block, indices of the open selections) -> per chunk of the block, their keys in order
ChunkKeys = Callable[[slice, Sequence[int]], Iterable[Sequence[Tensor]]]


def _summed(hists: Sequence[Tensor], numel: int) -> Tensor:
    """The sum of per-block int32 histograms over ``numel`` keys (int64 only when it must be:
    adding int32 into int64 is several times slower)."""
    total = hists[0].to(torch.int32 if numel < 2**31 else torch.int64, copy=True)
    for hist in hists[1:]:
        total += hist
    return total


def finish_selections(
    radixes: Sequence[Radix],
    hists: Sequence[Sequence[Tensor]],
    chunk_keys: ChunkKeys,
    parts: Sequence[slice],
    device,
) -> list[Selection]:
    """Complete selections over the same blocks whose current digit's per-block histograms
    are ``hists``: the next digit of every selection still open is one shared pass."""
    radixes, hists = list(radixes), [list(h) for h in hists]
    done: dict[int, Selection] = {}
    while len(done) < len(radixes):
        pending = []
        for index, radix in enumerate(radixes):
            if index in done:
                continue
            step = radix_step(radix, _summed(hists[index], parts[-1].stop))
            if isinstance(step, Threshold):
                digit = step.key & (DIGITS - 1)
                done[index] = Selection(step, [int(hist[digit]) for hist in hists[index]])
            else:
                radixes[index] = step
                pending.append(index)
        if pending:
            wanted = [radixes[index] for index in pending]
            results = run_pass(
                lambda part, o=pending, w=wanted: block_histograms(chunk_keys(part, o), w),
                parts,
                device,
            )
            for position, index in enumerate(pending):
                hists[index] = [result[position] for result in results]
    return [done[index] for index in range(len(radixes))]


BlockKeys = Callable[[slice], Iterable[Tensor]]


def select(k: int, bits: int, block_keys: BlockKeys, parts: Sequence[slice], device) -> Selection:
    """The k-th largest key over the blocks ``parts`` (one histogram pass per digit)."""
    radix = radix_start(k, bits)

    def chunks(part: slice, _open: Sequence[int]) -> Iterable[Sequence[Tensor]]:
        return ([keys] for keys in block_keys(part))

    hists = run_pass(lambda part: block_histograms(chunks(part, [0]), [radix])[0], parts, device)
    return finish_selections([radix], [hists], chunks, parts, device)[0]


def key_value(key: int, dtype: torch.dtype) -> float:
    """The magnitude whose ``dtype`` key is ``key``."""
    view, _ = _KEY_VIEW[dtype]
    return float(torch.tensor(key, dtype=view).view(dtype))


def value_below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` magnitude below a positive ``dtype`` magnitude."""
    view, _ = _KEY_VIEW[dtype]
    return float((torch.tensor(value, dtype=dtype).view(view) - 1).view(dtype))


class BlockCut:
    """A threshold applied to one block's chunks in order, zeroing what it drops (to +0).

    Whole-block cases are one ``hardshrink`` per chunk (which keeps |x| > lambda): lambda is
    the threshold's magnitude when the block keeps none of its ties, the next magnitude below
    it when it keeps them all (a zero threshold then keeps the chunk as it is). Only in the
    block where the kept ties run out are the ties found (by key) and the first put back.
    Kept entries are the input's own values, zeros of either sign included.
    """

    def __init__(self, threshold: Threshold, left: int, ties: int, key_dtype, value_dtype):
        self.key = threshold.key
        self.left = left
        self.magnitude = key_value(threshold.key, key_dtype)
        self.every_tie = left >= ties
        self.below = value_below(self.magnitude, value_dtype) if self.magnitude > 0 else 0.0

    def __call__(self, values: Tensor, keys: Callable[[], Tensor]) -> Tensor:
        """The pruned chunk (``keys()`` gives its keys when needed); ``values`` itself when
        everything is kept."""
        if self.left == 0:
            return torch.nn.functional.hardshrink(values, self.magnitude)
        if self.every_tie:
            if self.magnitude == 0.0:
                return values
            return torch.nn.functional.hardshrink(values, self.below)
        kept = torch.nn.functional.hardshrink(values, self.magnitude)
        ties = torch.nonzero(keys() == self.key).squeeze(1)[: self.left]
        kept[ties] = values[ties]
        self.left -= ties.numel()
        return kept


def block_cuts(selection: Selection, key_dtype, value_dtype) -> list[BlockCut]:
    """One BlockCut per block: the ties still to keep when each block starts, in order."""
    cuts, left = [], selection.threshold.equal
    for ties in selection.ties:
        cuts.append(BlockCut(selection.threshold, left, ties, key_dtype, value_dtype))
        left -= min(ties, left)
    return cuts


@kernel_scope()
def magnitude_prune(tensor: Tensor, density: float, *, chunk: int = CHUNK) -> Tensor:
    """Keep the round(density * numel) largest-|x| entries and zero the rest.

    Ties at the threshold are broken by position (earlier entries kept), so exactly that many
    entries survive. Density 1.0 returns `tensor` itself.
    """
    _check_density(density)
    if tensor.dtype not in _KEY_VIEW:
        raise TypeError(f"magnitude pruning needs a floating-point tensor, got {tensor.dtype}")
    n = tensor.numel()
    k = round(density * n)
    if density == 1.0 or k >= n:
        return tensor
    if k == 0:
        return torch.zeros_like(tensor)
    flat = tensor.contiguous().view(-1)
    parts = blocks(n, block_size(n, chunk))

    def block_keys(part: slice) -> Iterable[Tensor]:
        return (magnitude_keys(flat[span]) for span in spans(part.start, part.stop, chunk))

    selection = select(k, key_bits(flat.dtype), block_keys, parts, flat.device)
    out = torch.empty_like(flat)

    def write(item: tuple[slice, BlockCut]) -> None:
        part, cut = item
        for span in spans(part.start, part.stop, chunk):
            out[span] = cut(flat[span], lambda s=span: magnitude_keys(flat[s]))

    cuts = block_cuts(selection, flat.dtype, flat.dtype)
    run_pass(write, list(zip(parts, cuts, strict=True)), flat.device)
    return out.view(tensor.shape)


def prune(tensor: Tensor, density: float, *, base: Tensor | None = None) -> Tensor:
    """Magnitude-prune the weights, or with `base` the delta tensor - base (base is added back)."""
    if base is None:
        return magnitude_prune(tensor, density)
    _check_density(density)
    if density == 1.0:
        return tensor
    if base.shape != tensor.shape:
        raise ValueError(f"base shape {tuple(base.shape)} != tensor shape {tuple(tensor.shape)}")
    return magnitude_prune(tensor - base, density).add_(base)


class SparsityStats(NamedTuple):
    """Additive summary of a tensor (or a whole model) from which every measure follows."""

    numel: int
    zeros: int
    l1: float
    l2_squared: float

    def merged(self, other: SparsityStats) -> SparsityStats:
        """Combine the statistics of two disjoint sets of parameters."""
        return SparsityStats(*(a + b for a, b in zip(self, other, strict=True)))


EMPTY_STATS = SparsityStats(0, 0, 0.0, 0.0)


def count_nonzero(chunk: Tensor) -> int:
    """Non-zero entries of a floating-point chunk: its non-zero magnitude keys (an exact
    integer count; -0 is zero and a NaN is not)."""
    keys = magnitude_keys(chunk) if chunk.is_floating_point() else chunk
    return int(torch.count_nonzero(keys))


def _block_stats(part: Tensor, norms: bool) -> SparsityStats:
    """Zeros and (with ``norms``) the float64 L1 and squared L2 norms of one block."""
    zeros = part.numel() - count_nonzero(part)
    if not norms:
        return SparsityStats(part.numel(), zeros, 0.0, 0.0)
    # |x| in the stored dtype (exact, and narrower than float64), widened once; then |x|^2
    wide = part.abs().to(torch.float64)
    return SparsityStats(part.numel(), zeros, float(wide.sum()), float(wide.square_().sum()))


@kernel_scope()
def sparsity_stats(
    tensor: Tensor, *, norms: bool = True, chunk: int = CHUNK_ELEMENTS
) -> SparsityStats:
    """Count zeros and (with `norms`) accumulate L1 and squared L2 norms in float64: one
    partial sum per `chunk` elements (on the kernel's workers), added in order."""
    flat = tensor.reshape(-1)
    parts = blocks(flat.numel(), chunk)
    stats = EMPTY_STATS
    for part in run_pass(lambda span: _block_stats(flat[span], norms), parts, flat.device):
        stats = stats.merged(part)
    return stats


def sparsity_from_stats(stats: SparsityStats, measure: str) -> float:
    """rho in [0, 1] for a measure.

    zero_count: the fraction of exactly-zero entries (paper section 3.5).
    magnitude: Hoyer's sparsity (sqrt(n) - L1/L2) / (sqrt(n) - 1), a magnitude-based measure
    that is 0 when all |x| are equal, 1 with a single non-zero entry, invariant to the
    tensor's scale, rises as small entries shrink towards zero, and needs only two norms.
    An all-zero (or empty) tensor has sparsity 1.
    """
    if measure == "zero_count":
        return stats.zeros / stats.numel if stats.numel else 1.0
    if measure == "magnitude":
        if stats.l2_squared == 0.0:
            return 1.0
        if stats.numel == 1:
            return 0.0
        root_n = math.sqrt(stats.numel)
        hoyer = (root_n - stats.l1 / math.sqrt(stats.l2_squared)) / (root_n - 1.0)
        return min(1.0, max(0.0, hoyer))
    raise ValueError(
        f"unknown sparsity measure {measure!r}; expected one of {', '.join(SPARSITY_MEASURES)}"
    )


def sparsity(tensor: Tensor, measure: SparsityMeasure) -> float:
    """Sparsity rho in [0, 1] of one tensor (see `sparsity_from_stats` for the measures)."""
    if measure not in SPARSITY_MEASURES:
        sparsity_from_stats(EMPTY_STATS, measure)
    return sparsity_from_stats(sparsity_stats(tensor, norms=measure == "magnitude"), measure)


def model_sparsity(tensors: Iterable[Tensor], measure: SparsityMeasure) -> float:
    """Global sparsity of a model: the measure over all its tensors taken as one vector."""
    if measure not in SPARSITY_MEASURES:
        sparsity_from_stats(EMPTY_STATS, measure)
    stats = EMPTY_STATS
    for tensor in tensors:
        stats = stats.merged(sparsity_stats(tensor, norms=measure == "magnitude"))
    return sparsity_from_stats(stats, measure)


def cyclic_rate(
    step: int, *, s_min: float = 0.1, s_max: float = 0.6, t0: int = 3, t_mult: int = 2
) -> float:
    """Pruning rate at a 0-based step: cosine rise from s_min to s_max in cycles T0, T0*Tm, ..."""
    check_schedule(s_min, s_max, t0, t_mult)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    length, position = int(t0), int(step)
    while position >= length:
        position -= length
        length *= int(t_mult)
    if length == 1:
        return s_min
    return s_min + (s_max - s_min) * (1.0 - math.cos(math.pi * position / (length - 1))) / 2.0


def sparsity_schedule(
    n_steps: int, *, s_min: float = 0.1, s_max: float = 0.6, t0: int = 3, t_mult: int = 2
) -> list[float]:
    """The pruning rate of each of `n_steps` steps under the cyclic schedule."""
    return [
        cyclic_rate(step, s_min=s_min, s_max=s_max, t0=t0, t_mult=t_mult) for step in range(n_steps)
    ]
