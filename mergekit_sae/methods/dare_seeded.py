"""`dare_seeded`: DARE (drop and rescale) of one model's delta, with a reproducible mask.

MergeKit's ``dare_*`` methods draw a fresh random mask on every run, so a model made with them
cannot be rebuilt bit for bit from its recipe. This method draws the mask of each tensor from a
``torch.Generator`` seeded by (``seed``, tensor name) only: the same recipe gives the same
tensors in every process, in any order of merging, on any device (the mask is drawn on the CPU
and moved to the tensor's device).

For one model M and the base B, per tensor: delta = M - B; each element is kept with
probability 1 - p (p = ``drop_rate``); the result is B + mask * delta / (1 - p) with
``rescale`` (the DARE paper's rescaling, which keeps the delta's expectation), else
B + mask * delta. ``drop_rate`` 0 returns M unchanged, bit for bit. PSO-Merging
(``mergekit_sae.search.pso``) makes its sparsified expert particles with it.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import torch
from mergekit.merge_methods import TensorGroup, merge_method
from mergekit.merge_methods.base import BasePolicy, InputContract
from pydantic import Field
from torch import Tensor

from mergekit_sae.domains import Rate, check_domain
from mergekit_sae.methods.kernel import check_tensors, compute_dtype

Seed = Annotated[int, Field(ge=0)]


def mask_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed determined by the method's seed and the tensor name only.

    Hashing (rather than adding a counter) makes each tensor's mask independent of which
    other tensors are merged and in what order.
    """
    digest = hashlib.sha256(f"dare_seeded:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def keep_mask(
    shape: torch.Size | tuple[int, ...], drop_rate: float, seed: int, name: str
) -> Tensor:
    """Boolean mask of ``shape``: each element True (kept) with probability 1 - drop_rate.

    Drawn on the CPU from uniform numbers u in [0, 1) (kept when u >= drop_rate), so the
    mask is the same whatever device the tensors live on.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mask_seed(seed, name))
    uniform = torch.rand(tuple(shape), generator=generator, dtype=torch.float32)
    return uniform >= drop_rate


def dare_seeded_tensor(
    tensor: Tensor,
    base: Tensor,
    drop_rate: float,
    seed: int,
    *,
    rescale: bool = True,
    name: str,
) -> Tensor:
    """DARE of one tensor's delta from ``base`` with the (seed, name) mask, in the input dtype.

    Computes in float32 (float64 when an input is float64) and returns the model's dtype.
    """
    check_domain(Rate, drop_rate, "drop_rate", name)
    check_domain(Seed, seed, "seed", name)
    check_tensors([tensor, base], ["model", "base_model"], name)
    if drop_rate == 0.0:
        return tensor
    dtype = compute_dtype([tensor, base])
    origin = base.to(dtype)
    delta = tensor.to(dtype) - origin
    mask = keep_mask(tensor.shape, drop_rate, seed, name).to(tensor.device)
    if rescale:
        delta = delta / (1.0 - drop_rate)
    return torch.where(mask, origin + delta, origin).to(tensor.dtype)


@merge_method(
    name="dare_seeded",
    pretty_name="DARE with a seeded mask",
    reference_url="https://arxiv.org/abs/2311.03099",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1, max_non_base=1),
)
def dare_seeded_merge(
    group: TensorGroup,
    drop_rate: Rate,
    seed: Seed,
    rescale: bool = True,
) -> Tensor:
    """MergeKit adapter: drop-and-rescale the single non-base model's delta from the base."""
    (entry,) = group.non_base
    name = group.metadata.name
    if not name:
        raise ValueError("dare_seeded seeds each mask by the tensor name, and got none")
    return dare_seeded_tensor(
        entry.tensor, group.base.tensor, drop_rate, seed, rescale=rescale, name=name
    )
