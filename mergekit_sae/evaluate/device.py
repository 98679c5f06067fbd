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


_said_cpu_fallback = False


def resolve_device(device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Pick the device and the dtype to score on: CUDA with bf16 when present, else CPU fp32.

    ``auto`` without a GPU says once per process (one warning line) that it uses the CPU;
    an explicit ``cuda`` without one is an error that says what torch sees.
    """
    global _said_cpu_fallback
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and not _said_cpu_fallback:
            _said_cpu_fallback = True
            logger.warning("device auto: no CUDA GPU found, merging and scoring on the CPU")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise ValueError(
                f"device {device!r} was requested but CUDA is not available (torch "
                f"{torch.__version__}: {build}); use device: auto or cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} was requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
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


def fitting_batch_size(
    model: torch.nn.Module, device: torch.device, *, seq_len: int = 512, cap: int = 256
) -> int | None:
    """Sequences per forward that fit in half the free memory of a CUDA device (None on CPU).

    The estimate per sequence is the logits (seq_len x vocab, fp32) plus the hidden states
    kept per layer (seq_len x hidden x layers, the model's dtype) times 4 for attention and
    MLP intermediates; :func:`map_batches` halves it further on an out-of-memory error.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 4096)
    layers = getattr(config, "num_hidden_layers", 32)
    vocab = getattr(config, "vocab_size", 32000)
    width = next(model.parameters()).element_size()
    per_sequence = seq_len * (vocab * 4 + 4 * hidden * layers * width)
    return max(1, min(cap, int(free * 0.5 // per_sequence)))


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
