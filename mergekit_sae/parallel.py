"""Chunk-parallel passes over flat tensors whose results do not depend on the thread count.

A pass cuts a tensor's elements into blocks whose bounds depend only on the tensor's size, runs
one function per block on a pool of worker threads, and returns the results in block order.
While a pass runs, every torch operation uses one intra-op thread, so what a block computes
(a float sum included) is the same whichever worker runs it and however many there are; the
caller combines block results in block order. Elementwise work is bit-identical by nature;
reductions are per block, then combined in order, so they are too.

On CPU the workers are ``threads()`` Python threads (torch releases the GIL inside its
operations); on other devices a pass runs its blocks in order on the calling thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# Elements per chunk of a block's elementwise work: a few float32 buffers of this size stay in
# the CPU's cache. Block sizes are multiples of it, so chunk bounds are multiples of it too.
CHUNK = 1 << 18
MAX_BLOCK = 1 << 22
TARGET_BLOCKS = 64

# Worker threads of a CPU pass; None: torch's intra-op thread count when the pass starts (so
# OMP_NUM_THREADS, torch.set_num_threads and a recipe's `threads` apply).
KERNEL_THREADS: int | None = None

_local = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
# A forked child has none of the pools' threads: it starts its own pools.
os.register_at_fork(after_in_child=_pools.clear)


def spans(start: int, stop: int, size: int = CHUNK) -> Iterator[slice]:
    """Consecutive slices of ``size`` elements covering [start, stop) (the last may be shorter)."""
    for first in range(start, stop, size):
        yield slice(first, min(first + size, stop))


def block_size(numel: int, chunk: int = CHUNK) -> int:
    """Elements per block of a pass over ``numel`` elements: about TARGET_BLOCKS blocks, a
    power-of-two multiple of ``chunk`` up to MAX_BLOCK (a function of the size, never of the
    thread count)."""
    wanted = -(-numel // TARGET_BLOCKS)
    size = chunk
    while size < wanted and size < MAX_BLOCK:
        size *= 2
    return size


def blocks(numel: int, size: int) -> list[slice]:
    """The blocks of a pass over ``numel`` elements, ``size`` elements each."""
    return list(spans(0, numel, size))


def threads() -> int:
    """Worker threads of the next CPU pass: KERNEL_THREADS, else torch's thread count."""
    if KERNEL_THREADS is not None:
        return max(1, KERNEL_THREADS)
    return max(1, torch.get_num_threads())


@contextlib.contextmanager
def kernel_threads(count: int | None) -> Iterator[None]:
    """Run the passes inside on ``count`` worker threads (None: the default), then restore."""
    global KERNEL_THREADS
    previous = KERNEL_THREADS
    KERNEL_THREADS = count
    try:
        yield
    finally:
        KERNEL_THREADS = previous


def _pool(workers: int) -> ThreadPoolExecutor:
    """The shared pool with ``workers`` threads (created once, each thread on one torch thread)."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(
                max_workers=workers,
                thread_name_prefix="mergekit-sae-kernel",
                initializer=_init_worker,
            )
        return _pools[workers]


def _init_worker() -> None:
    """A worker's torch operations run on one intra-op thread, and its passes run inline."""
    torch.set_num_threads(1)
    _local.workers = 1


@contextlib.contextmanager
def kernel_scope() -> Iterator[None]:
    """Run a kernel: torch on one intra-op thread in the calling thread (small operations
    between passes do not wait on a parallel region), its passes on ``threads()`` workers
    counted when the outermost scope starts. Re-entrant; torch's count is restored after."""
    if getattr(_local, "workers", None) is not None:
        yield
        return
    _local.workers = threads()
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        _local.workers = None
        if previous != 1:
            torch.set_num_threads(previous)


@kernel_scope()
def run_pass(work: Callable[[T], R], items: Sequence[T], device: torch.device) -> list[R]:
    """``work`` of every item (a block, or a block's index), in order; on CPU spread over the
    kernel's workers, on other devices run in order on the calling thread."""
    if device.type != "cpu" or _local.workers == 1 or len(items) <= 1:
        return [work(item) for item in items]
    return list(_pool(_local.workers).map(work, items))
