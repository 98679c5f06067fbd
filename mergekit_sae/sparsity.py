"""Magnitude pruning, sparsity measures and the cyclic sparsity schedule (pure tensor math).

Pruning selects the k-th largest magnitude with a radix select over the bit patterns of |x|
(non-negative IEEE floats order like their bits), streamed in fixed-size chunks. It therefore
works above ``torch.quantile``'s 2**24-element limit, in float16/bfloat16/float32/float64, on
any device, and allocates only the output tensor plus chunk-sized scratch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from mergekit_sae.domains import SparsityMeasure, check_schedule, choices

SPARSITY_MEASURES: tuple[str, ...] = choices(SparsityMeasure)

CHUNK_ELEMENTS = 1 << 22
_DIGIT_BITS = 16
# dtype -> (signed integer view, mask clearing the sign bit); the masked bits order like |x|
_KEY_VIEW = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFF_FFFF),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF),
}


def _chunks(flat: Tensor, size: int) -> Iterator[Tensor]:
    """Yield consecutive views of a 1-d tensor, `size` elements each (the last may be shorter)."""
    for start in range(0, flat.numel(), size):
        yield flat[start : start + size]


def _magnitude_keys(chunk: Tensor) -> Tensor:
    """Non-negative integer keys that order like |x| (the float's bits without the sign)."""
    view, mask = _KEY_VIEW[chunk.dtype]
    keys = chunk.view(view) & mask
    return keys.to(torch.int32) if view == torch.int16 else keys


def _check_density(density: float, what: str = "density") -> None:
    """Reject densities outside (0, 1] with an actionable message."""
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"{what} must be in (0, 1], got {density!r}")


def _kth_largest_key(flat: Tensor, k: int, chunk: int) -> tuple[int, int]:
    """Radix-select the key of the k-th largest |x|; return it and how many equal keys to keep."""
    threshold = select_threshold(
        lambda: (_magnitude_keys(part) for part in _chunks(flat, chunk)),
        k,
        key_bits=flat.element_size() * 8,
        device=flat.device,
    )
    return threshold.key, threshold.equal


class Threshold(NamedTuple):
    """A magnitude threshold: keep keys above ``key`` and the first ``equal`` keys equal to it."""

    key: int
    equal: int


def select_threshold(
    key_chunks: Callable[[], Iterable[Tensor]], k: int, *, key_bits: int, device: torch.device
) -> Threshold:
    """Radix-select the k-th largest of the keys ``key_chunks()`` yields (in order, per pass).

    One pass per 16-bit digit (one for 16-bit floats, two for float32); each pass asks
    ``key_chunks`` for a fresh iterator, so the keys can be computed chunk by chunk.
    """
    prefix, remaining = 0, k
    for level, shift in enumerate(range(key_bits - _DIGIT_BITS, -1, -_DIGIT_BITS)):
        hist = torch.zeros(1 << _DIGIT_BITS, dtype=torch.int64, device=device)
        for keys in key_chunks():
            hist += _digit_histogram(keys, level, shift, prefix)
        at_or_above = hist.flip(0).cumsum(0)
        index = int(torch.searchsorted(at_or_above, remaining))
        digit = (1 << _DIGIT_BITS) - 1 - index
        remaining -= int(at_or_above[index]) - int(hist[digit])
        prefix = (prefix << _DIGIT_BITS) | digit
    return Threshold(prefix, remaining)


def _digit_histogram(keys: Tensor, level: int, shift: int, prefix: int) -> Tensor:
    """Counts of the 16-bit digit at ``shift`` among the keys whose higher digits are
    ``prefix`` (all keys at level 0). Keys outside the prefix's range are clamped into two
    overflow bins and dropped: arithmetic and one bincount, no boolean indexing."""
    size = 1 << _DIGIT_BITS
    if not level:
        digits = keys >> shift
        return torch.bincount(digits.to(torch.int32), minlength=size)
    low = prefix << (shift + _DIGIT_BITS)
    offsets = keys - low
    if shift:
        offsets = torch.div(offsets, 1 << shift, rounding_mode="floor")
    bins = offsets.clamp_(-1, size).add_(1).to(torch.int32)
    return torch.bincount(bins, minlength=size + 2)[1 : size + 1]


class KeepMask:
    """Which entries a threshold keeps, chunk by chunk in order (ties kept by position)."""

    def __init__(self, threshold: Threshold):
        self.key = threshold.key
        self.left = threshold.equal

    def __call__(self, keys: Tensor) -> Tensor:
        """The keep mask of the next chunk's keys."""
        keep = keys > self.key
        if self.left > 0:
            equal = keys == self.key
            n_equal = int(equal.sum())
            if n_equal > self.left:  # only part of this chunk's ties survive
                equal &= equal.cumsum(0) <= self.left
            keep |= equal
            self.left -= min(n_equal, self.left)
        return keep


def magnitude_keys(chunk: Tensor) -> Tensor:
    """Integer keys of a chunk that order like |x| (for selections over computed chunks)."""
    if chunk.dtype not in _KEY_VIEW:
        raise TypeError(f"magnitude pruning needs a floating-point tensor, got {chunk.dtype}")
    return _magnitude_keys(chunk)


def magnitude_prune(tensor: Tensor, density: float, *, chunk: int = CHUNK_ELEMENTS) -> Tensor:
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
    threshold, keep_equal = _kth_largest_key(flat, k, chunk)
    mask = KeepMask(Threshold(threshold, keep_equal))
    out = torch.empty_like(flat)
    zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
    for part, out_part in zip(_chunks(flat, chunk), _chunks(out, chunk), strict=True):
        torch.where(mask(_magnitude_keys(part)), part, zero, out=out_part)
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
    """Non-zero entries of a floating-point chunk: the sum of sign(|x|), exact in float32 up
    to 2**24 entries and several times faster than ``torch.count_nonzero`` on CPU. sign(NaN)
    is 0 here, so a chunk whose plain sum is not finite (a NaN or Inf in it), or a larger
    chunk, is counted by ``torch.count_nonzero``."""
    if not chunk.is_floating_point() or chunk.numel() > 1 << 24:
        return int(torch.count_nonzero(chunk))
    wide = torch.float64 if chunk.dtype == torch.float64 else torch.float32
    if not math.isfinite(float(chunk.sum(dtype=wide))):
        return int(torch.count_nonzero(chunk))
    return int(chunk.abs().sign_().sum(dtype=wide))


def sparsity_stats(
    tensor: Tensor, *, norms: bool = True, chunk: int = CHUNK_ELEMENTS
) -> SparsityStats:
    """Count zeros and (with `norms`) accumulate L1 and squared L2 norms in float64, by chunks."""
    zeros, l1, l2 = 0, 0.0, 0.0
    for part in _chunks(tensor.reshape(-1), chunk):
        zeros += part.numel() - count_nonzero(part)
        if norms:
            wide = part.to(torch.float64, copy=True)  # one copy, in place: |x|, then |x|^2
            l1 += float(wide.abs_().sum())
            l2 += float(wide.square_().sum())
    return SparsityStats(tensor.numel(), zeros, l1, l2)


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
