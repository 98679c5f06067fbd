"""Device and dtype choice, and batched execution that halves the batch on out-of-memory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from mergekit_sae.dtypes import torch_dtype

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Pick the device and the dtype to score on: CUDA with bf16 when present, else CPU fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available")
        bf16 = torch.cuda.is_bf16_supported()
        return dev, torch.bfloat16 if bf16 else torch.float16
    return dev, torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """Turn a dtype name ("float32", "bfloat16", "float16") or None into a torch dtype."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(dtype)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA (or other accelerator) out-of-memory errors."""
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if t
    )
    return isinstance(error, oom_types)


def map_batches(
    fn: Callable[[list[T]], list[R]],
    items: Sequence[T],
    batch_size: int,
    *,
    on_oom: Callable[[], None] | None = None,
) -> list[R]:
    """Apply fn to consecutive batches of items and concatenate its outputs.

    When fn raises an out-of-memory error the batch size is halved (and stays halved for the
    remaining batches) and the failed batch is retried; at batch size 1 the error propagates.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[R] = []
    while len(results) < len(items):
        start = len(results)
        out, batch_size = _with_backoff(
            lambda size, start=start: fn(list(items[start : start + size])), batch_size, on_oom
        )
        expected = min(batch_size, len(items) - start)
        if len(out) != expected:
            raise RuntimeError(f"batch function returned {len(out)} results for {expected} items")
        results.extend(out)
    return results


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _with_backoff(
    fn: Callable[[int], R], batch_size: int, on_oom: Callable[[], None] | None = None
) -> tuple[R, int]:
    """fn(batch_size) and the batch size it succeeded with, halving it after each OOM."""
    while True:
        try:
            return fn(batch_size), batch_size
        except Exception as e:
            if not is_out_of_memory(e) or batch_size == 1:
                raise
        batch_size = max(1, batch_size // 2)
        logger.warning("out of memory; retrying with batch size %d", batch_size)
        (on_oom or _empty_cache)()


def call_with_oom_backoff(fn: Callable[[int], R], batch_size: int) -> R:
    """Call fn(batch_size), halving the batch size after each out-of-memory error."""
    return _with_backoff(fn, batch_size)[0]
