"""What every merge method of this package shares: input checks, dtypes and input labels.

The checks raise the errors users see, naming the tensor and the offending input; the dtype
rules are MergeKit's (inputs promote as ``mergekit.merge_methods.dtype`` promotes a group,
arithmetic runs in float32, or float64 when an input is float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mergekit.merge_methods import TensorGroup
from mergekit.merge_methods.dtype import promoted_dtype as group_promoted_dtype
from torch import Tensor

from mergekit_sae.errors import MergeInputError
from mergekit_sae.parallel import block_size, blocks, kernel_scope, run_pass, spans
from mergekit_sae.sparsity import finite_keys, magnitude_keys


def input_label(input_id: object) -> str:
    """How an input is named in error messages: its model path, or its position."""
    return f"input {input_id}" if isinstance(input_id, int) else f"model {input_id}"


def compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (like MergeKit's linear merge)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def promoted_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype the inputs promote to (the result's), by MergeKit's own rule for a group."""
    return group_promoted_dtype(TensorGroup.from_tensors(list(tensors)))


def check_layout(tensors: Sequence[Tensor], labels: Sequence[str], name: str) -> None:
    """Require equal shapes and floating point, naming the offending input."""
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) > 1:
        described = ", ".join(
            f"{label}: {shape}" for label, shape in zip(labels, shapes, strict=True)
        )
        raise MergeInputError(f"{name}: shape mismatch between models ({described})", tensor=name)
    for label, tensor in zip(labels, tensors, strict=True):
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: {label} is {tensor.dtype}, not a floating-point tensor")


def non_finite_error(tensor: Tensor, label: str, name: str) -> MergeInputError:
    """The error for an input holding NaN or Inf values, with how many of each."""
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int(torch.isinf(tensor).sum())
    return MergeInputError(
        f"{name}: {label} contains {n_nan} NaN and {n_inf} Inf values", tensor=name
    )


@kernel_scope()
def all_finite(tensor: Tensor) -> bool:
    """Whether every element is finite: each magnitude key below +inf's (one integer max per
    chunk, on the kernel's workers)."""
    flat = tensor.reshape(-1)

    def finite(part: slice) -> bool:
        return all(
            finite_keys(magnitude_keys(flat[span]), flat.dtype)
            for span in spans(part.start, part.stop)
        )

    return all(run_pass(finite, blocks(flat.numel(), block_size(flat.numel())), flat.device))


def check_tensors(tensors: Sequence[Tensor], labels: Sequence[str], name: str) -> None:
    """Require equal shapes, floating point and finite values, naming the offending input."""
    check_layout(tensors, labels, name)
    for label, tensor in zip(labels, tensors, strict=True):
        if not all_finite(tensor):
            raise non_finite_error(tensor, label, name)
