"""One-shot merges as a search of one step: the baselines a search has to beat.

Each is one MergeKit stage over the recipe's dense models (``linear``, ``task_arithmetic``,
``ties``, ``dare_ties``, ``sce`` with MergeKit's usual settings, and ``scf_rkl`` with the first
model as its anchor and the package's defaults, see :data:`STATIC_MERGES`),
or ``sae_oneshot``: one ``sae_evolve`` merge of the dense experts weighted by their measured
training scores, pruned at the middle of the sparsity schedule. A one-shot merge costs the
evaluations it needs: none, or one per expert score for ``sae_oneshot``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field, field_validator

from mergekit_sae.evolve.population import Member, MergeInput, MergeRecord
from mergekit_sae.search.base import Driver, Proposal, Search, SearchSettings


@dataclass(frozen=True)
class StaticMerge:
    """A MergeKit stage over the dense experts: method, per-expert and shared parameters."""

    method: str
    per_model: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    with_base: bool = True
    anchor_first: bool = False  # the first expert is the method's base (SCF-RKL's anchor)


STATIC_MERGES: dict[str, StaticMerge] = {
    "linear": StaticMerge("linear", {"weight": 1.0}, {"normalize": True}, with_base=False),
    "task_arithmetic": StaticMerge("task_arithmetic", {"weight": 1.0}),
    "ties": StaticMerge("ties", {"weight": 1.0, "density": 0.5}),
    "dare_ties": StaticMerge("dare_ties", {"weight": 1.0, "density": 0.5}),
    "sce": StaticMerge("sce", {}, {"select_topk": 0.1}),
    "scf_rkl": StaticMerge("scf_rkl", with_base=False, anchor_first=True),
}
SAE_ONESHOT = "sae_oneshot"


def static_record(
    merge: StaticMerge, parents: list[str], base_model: str | None, dtype: str
) -> MergeRecord:
    """The MergeKit stage of a static merge over the parents (and the recipe's base)."""
    if merge.with_base and base_model is None:
        raise ValueError(f"{merge.method} merges task vectors: the recipe needs a base_model")
    anchor, donors = (parents[0], parents[1:]) if merge.anchor_first else (None, parents)
    return MergeRecord(
        method=merge.method,
        inputs=[MergeInput(member=p, parameters=dict(merge.per_model)) for p in donors],
        base_model=base_model if merge.with_base else None,
        base_member=anchor,
        parameters=dict(merge.shared),
        dtype=dtype,
    )


def sae_oneshot_record(recipe: Any, parents: list[Member], dtype: str) -> MergeRecord:
    """``sae_evolve`` of the dense experts with their scores, at the schedule's middle rate."""
    settings = recipe.merge
    rate = (recipe.schedule.s_min + recipe.schedule.s_max) / 2
    inputs = []
    for parent in parents:
        per_model: dict[str, Any] = {"score": max(float(parent.performance), 1e-6)}
        if settings.sparsity_scope == "global":
            per_model["global_sparsity"] = parent.sparsity
        inputs.append(MergeInput(member=parent.id, parameters=per_model))
    return MergeRecord(
        method="sae_evolve",
        inputs=inputs,
        base_model=recipe.base_model if settings.prune_target == "delta" else None,
        parameters={
            "sparsity_weight": settings.sparsity_weight,
            "sparsity_measure": settings.sparsity_measure,
            "sparsity_scope": settings.sparsity_scope,
            "renormalize": settings.renormalize,
            "prune_target": settings.prune_target,
            "offspring_density": 1.0 - rate,
        },
        dtype=dtype,
    )


class OneShotSettings(SearchSettings):
    """The ``oneshot:`` block: which merge."""

    method: str = Field("linear", description=f"{', '.join([*STATIC_MERGES, SAE_ONESHOT])}")
    resample: bool = False

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        """Only the listed merges."""
        known = [*STATIC_MERGES, SAE_ONESHOT]
        if value not in known:
            raise ValueError(f"unknown one-shot merge {value!r}; choose one of {', '.join(known)}")
        return value


class OneShotState(BaseModel):
    """The merged model, once made."""

    member: str | None = None


class OneShotSearch(Search):
    """One merge in step 1; scored only on the test split by the final report."""

    name = "oneshot"
    title = "a one-shot MergeKit merge"
    settings_model = OneShotSettings
    state_model = OneShotState
    settings: OneShotSettings
    state: OneShotState

    @classmethod
    def natural_budget(cls, recipe: Any, settings: SearchSettings) -> int | None:
        """One evaluation per expert score for ``sae_oneshot``, none otherwise."""
        return len(recipe.models) if getattr(settings, "method", "") == SAE_ONESHOT else 0

    @classmethod
    def check_recipe(cls, recipe: Any, settings: SearchSettings) -> None:
        """Task-vector merges need the base."""
        method = getattr(settings, "method", "linear")
        if method in STATIC_MERGES and STATIC_MERGES[method].with_base and not recipe.base_model:
            raise ValueError(f"oneshot.method {method!r} merges task vectors: set base_model")

    def start(self, driver: Driver) -> None:
        """Nothing is stored before the merge."""

    def step(self, driver: Driver, step: int) -> None:
        """Score the experts when the merge needs their scores, then make the merge."""
        if self.state.member is not None:
            return
        method = self.settings.method
        if method == SAE_ONESHOT:
            scored = driver.rescore(driver.parents)
            if len(scored) < len(driver.parents):
                return
            parents = [driver.members[i] for i in driver.parents]
            record = sae_oneshot_record(self.recipe, parents, driver.dtype)
        else:
            record = static_record(
                STATIC_MERGES[method], driver.parents, self.recipe.base_model, driver.dtype
            )
        # MergeKit's DARE draws its masks from torch's global generator: seed it per run.
        torch.manual_seed(driver.rng(step, "oneshot").randrange(2**63))
        inputs = tuple(driver.parents)
        (made,) = driver.make([Proposal(record, "candidate", inputs, method)], score=False)
        self.state.member = made.member.id

    @property
    def result_label(self) -> str:
        """The merge's name."""
        return f"{self.settings.method} (one-shot)"

    def keep(self) -> list[str]:
        """The merged model."""
        return [self.state.member] if self.state.member else []

    def best(self, members: Mapping[str, Member]) -> str:
        """The merged model (before it is made: the first parent)."""
        if self.state.member:
            return self.state.member
        return next(m.id for m in members.values() if m.origin == "parent")
