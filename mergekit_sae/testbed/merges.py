"""Static merges of the testbed experts (the baselines a search has to beat), done by MergeKit.

They are the one-shot merges of :mod:`mergekit_sae.search.oneshot`, under the labels the
testbed report uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from mergekit_sae.search.oneshot import STATIC_MERGES as ONE_SHOT_MERGES
from mergekit_sae.search.oneshot import StaticMerge

# testbed report label -> the one-shot merge it runs
STATIC_MERGES: dict[str, StaticMerge] = {
    "linear_50_50": ONE_SHOT_MERGES["linear"],
    "task_arithmetic_1.0": ONE_SHOT_MERGES["task_arithmetic"],
    "ties_1.0_d0.5": ONE_SHOT_MERGES["ties"],
}


@torch.no_grad()
def static_merge(
    name: str, base, experts: Mapping[str, torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """Merge the experts' state dicts with the named static merge (see `STATIC_MERGES`)."""
    from mergekit.merge_methods import merge_state_dicts

    if name not in STATIC_MERGES:
        raise ValueError(f"unknown static merge {name!r}; choose one of {sorted(STATIC_MERGES)}")
    merge = STATIC_MERGES[name]
    models = {key: model.state_dict() for key, model in experts.items()}
    if merge.with_base:
        models = {"base": base.state_dict(), **models}
    return merge_state_dicts(
        models,
        merge.method,
        base="base" if merge.with_base else None,
        parameters={**merge.per_model, **merge.shared},
    )


def static_merge_records(names: Iterable[str] | None = None) -> dict[str, dict]:
    """How each named static merge (default: all) was made: method, parameters, whether it
    uses the base."""
    return {
        name: {
            "method": merge.method,
            "parameters": {**merge.per_model, **merge.shared},
            "uses_base": merge.with_base,
        }
        for name, merge in STATIC_MERGES.items()
        if names is None or name in names
    }
