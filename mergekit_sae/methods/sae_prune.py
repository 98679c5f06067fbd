"""`sae_prune`: magnitude pruning of one model, so pruned population members have a recipe."""

from __future__ import annotations

from mergekit.merge_methods import PerNonBase, TensorGroup, merge_method
from mergekit.merge_methods.base import BasePolicy, InputContract
from torch import Tensor

from mergekit_sae.domains import Density, PruneTarget, check_domain
from mergekit_sae.methods.kernel import check_tensors, compute_dtype
from mergekit_sae.sparsity import prune


def sae_prune_tensor(
    tensor: Tensor,
    density: float,
    *,
    prune_target: str = "weights",
    base: Tensor | None = None,
    name: str = "tensor",
) -> Tensor:
    """Prune one tensor's weights, or its delta from `base`, in float32 (float64 stays float64)."""
    check_domain(PruneTarget, prune_target, "prune_target", name)
    check_domain(Density, density, "density", name)
    if prune_target == "delta" and base is None:
        raise ValueError(f"{name}: prune_target 'delta' needs a base_model")
    inputs = [tensor] if prune_target == "weights" else [tensor, base]
    check_tensors(inputs, ["model", "base_model"][: len(inputs)], name)
    dtype = compute_dtype(inputs)
    origin = base.to(dtype) if prune_target == "delta" else None
    return prune(tensor.to(dtype), density, base=origin).to(tensor.dtype)


@merge_method(
    name="sae_prune",
    pretty_name="SAE magnitude pruning",
    reference_url="https://arxiv.org/abs/2602.08218",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_non_base=1, max_non_base=1),
)
def sae_prune_merge(
    group: TensorGroup,
    density: PerNonBase[Density] = 1.0,
    prune_target: PruneTarget = "weights",
) -> Tensor:
    """MergeKit adapter: prune the single non-base model at its density."""
    (entry,) = group.non_base
    return sae_prune_tensor(
        entry.tensor,
        density[entry.id],
        prune_target=prune_target,
        base=group.base.tensor if group.base is not None else None,
        name=group.metadata.name or "tensor",
    )
