"""Device choice and the out-of-memory batch halving."""

from __future__ import annotations

import pytest
import torch

from mergekit_sae.evaluate import map_batches, resolve_device
from mergekit_sae.evaluate.device import call_with_oom_backoff, is_out_of_memory

OOM_TYPES = [torch.cuda.OutOfMemoryError] + (
    [torch.OutOfMemoryError] if hasattr(torch, "OutOfMemoryError") else []
)


def test_resolve_device_auto_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_device("auto") == (torch.device("cuda"), torch.bfloat16)


class FakeModelRun:
    """Raises out-of-memory for batches larger than `capacity`; records every batch tried."""

    def __init__(self, capacity: int, error: type[BaseException]):
        self.capacity, self.error, self.tried = capacity, error, []

    def __call__(self, batch: list[int]) -> list[int]:
        self.tried.append(len(batch))
        if len(batch) > self.capacity:
            raise self.error("CUDA out of memory")
        return [x * 10 for x in batch]


@pytest.mark.parametrize("error", OOM_TYPES)
def test_map_batches_halves_on_oom_and_keeps_the_smaller_size(error):
    run = FakeModelRun(capacity=3, error=error)
    freed = []
    out = map_batches(run, list(range(10)), 16, on_oom=lambda: freed.append(1))
    assert out == [x * 10 for x in range(10)]
    # 10 items in a batch of 16 -> OOM; 8 -> OOM; 4 -> OOM; then batches of 2 (never grows back).
    assert run.tried == [10, 8, 4, 2, 2, 2, 2, 2]
    assert len(freed) == 3


def test_map_batches_gives_up_at_batch_size_one():
    run = FakeModelRun(capacity=0, error=torch.cuda.OutOfMemoryError)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        map_batches(run, [1, 2, 3], 4, on_oom=lambda: None)
    assert run.tried == [3, 2, 1]


def test_map_batches_does_not_swallow_other_errors():
    def broken(batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        map_batches(broken, [1, 2], 2)
    assert not is_out_of_memory(RuntimeError("out of memory"))


def test_call_with_oom_backoff_halves_until_it_fits():
    sizes = []

    def run(batch_size: int) -> int:
        sizes.append(batch_size)
        if batch_size > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return batch_size

    assert call_with_oom_backoff(run, 32) == 4
    assert sizes == [32, 16, 8, 4]
