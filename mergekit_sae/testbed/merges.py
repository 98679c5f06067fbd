"""Static merges of the testbed experts (the baselines a search has to beat), done by MergeKit."""

from __future__ import annotations

from collections.abc import Mapping

import torch

# name -> (MergeKit method, parameters shared by every expert, whether the base takes part)
STATIC_MERGES: dict[str, tuple[str, dict[str, float], bool]] = {
    "linear_50_50": ("linear", {"weight": 0.5}, False),
    "task_arithmetic_1.0": ("task_arithmetic", {"weight": 1.0}, True),
    "ties_1.0_d0.5": ("ties", {"weight": 1.0, "density": 0.5}, True),
}


@torch.no_grad()
def static_merge(
    name: str, base, experts: Mapping[str, torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """Merge the experts' state dicts with the named static recipe (see `STATIC_MERGES`)."""
    from mergekit.merge_methods import merge_state_dicts

    if name not in STATIC_MERGES:
        raise ValueError(f"unknown static merge {name!r}; choose one of {sorted(STATIC_MERGES)}")
    method, parameters, with_base = STATIC_MERGES[name]
    models = {key: model.state_dict() for key, model in experts.items()}
    if with_base:
        models = {"base": base.state_dict(), **models}
    return merge_state_dicts(
        models, method, base="base" if with_base else None, parameters=parameters
    )
