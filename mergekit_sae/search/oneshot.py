"""One-shot merges as a search of one step: the baselines a search has to beat.

Each is one MergeKit stage over the recipe's dense models (``linear``, ``task_arithmetic``,
``ties``, ``dare_ties``, ``sce`` with MergeKit's usual settings, and ``scf_rkl`` with the first
model as its anchor and the package's defaults, see :data:`STATIC_MERGES`),
or ``sae_oneshot``: one ``sae_evolve`` merge of the dense experts weighted by their measured
training scores, pruned at the middle of the sparsity schedule. A one-shot merge costs the
evaluations it needs: none, or one per expert score for ``sae_oneshot``.

``scf_rkl_functional`` is ``scf_rkl`` with functional importance: before the merge it runs the
calibration pass of :func:`~mergekit_sae.calibration.scf_rkl.compute_importance` on the
first task's training items of step 1 (their ``prompt``), writes the scores to
OUT/scf_rkl_importance/ (the written recipe points at them) and notes the pass in the step's
``info["calibration"]``. Its forward and backward passes are calibration, not fitness
evaluations: the run's evaluation count stays 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field, field_validator

from mergekit_sae.errors import RecipeError
from mergekit_sae.records import Member, MergeInput, MergeRecord
from mergekit_sae.search.base import Driver, Proposal, Search, SearchSettings
from mergekit_sae.search.sae_operators import merge_parameters, parent_inputs
from mergekit_sae.search.sae_settings import SaeSettings


@dataclass(frozen=True)
class StaticMerge:
    """A MergeKit stage over the dense experts: method, per-expert and shared parameters."""

    method: str
    per_model: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    with_base: bool = True
    anchor_first: bool = False  # the first expert is the method's base (SCF-RKL's anchor)
    functional: bool = False  # scf_rkl: compute the donors' importance from calibration first


STATIC_MERGES: dict[str, StaticMerge] = {
    "linear": StaticMerge("linear", {"weight": 1.0}, {"normalize": True}, with_base=False),
    "task_arithmetic": StaticMerge("task_arithmetic", {"weight": 1.0}),
    "ties": StaticMerge("ties", {"weight": 1.0, "density": 0.5}),
    "dare_ties": StaticMerge("dare_ties", {"weight": 1.0, "density": 0.5}),
    "sce": StaticMerge("sce", {}, {"select_topk": 0.1}),
    "scf_rkl": StaticMerge("scf_rkl", with_base=False, anchor_first=True),
    "scf_rkl_functional": StaticMerge(
        "scf_rkl", with_base=False, anchor_first=True, functional=True
    ),
}
SAE_ONESHOT = "sae_oneshot"
IMPORTANCE_DIR = "scf_rkl_importance"
CALIBRATION_BATCH = 8
CALIBRATION_MAX_LENGTH = 256


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


def calibration_prompts(recipe: Any, driver: Driver) -> list[str]:
    """The ``prompt`` of each of the first task's training items of this step."""
    task = recipe.tasks[0].name
    items = driver.items.get(task, [])
    prompts = [item.get("prompt") if isinstance(item, dict) else None for item in items]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RecipeError(
            f"oneshot.method scf_rkl_functional calibrates on the first task's training items "
            f"(tasks[0] {task!r}): each needs a string 'prompt'"
        )
    return prompts


def functional_importance(recipe: Any, driver: Driver, parents: list[str]) -> dict[str, Any]:
    """Run the calibration pass (first parent = anchor) into OUT/scf_rkl_importance/.

    Returns the pass's report (files per donor, tokens, forward/backward passes, seconds,
    peak memory).
    """
    from mergekit_sae.calibration.scf_rkl import compute_importance  # transformers: only to run
    from mergekit_sae.evaluate.device import resolve_device, resolve_dtype

    out = driver.run_dir
    paths = [str(driver.model_dir(i).absolute()) for i in parents]
    device, default_dtype = resolve_device(recipe.device)
    return compute_importance(
        paths[0],
        paths[1:],
        calibration_prompts(recipe, driver),
        (out / IMPORTANCE_DIR).absolute(),
        device=device,
        dtype=resolve_dtype(recipe.eval_dtype, default_dtype),
        batch_size=recipe.eval_batch_size or CALIBRATION_BATCH,
        max_length=CALIBRATION_MAX_LENGTH,
        granularity="layer",
    )


def with_density(record: MergeRecord, density: float | None) -> MergeRecord:
    """A static merge's record at another density (see ``OneShotSettings.density``)."""
    if density is None or record.method in ("linear", "task_arithmetic"):
        return record
    if record.method == "sce":
        return record.model_copy(
            update={"parameters": {**record.parameters, "select_topk": density}}
        )
    if record.method == "scf_rkl":
        return record.model_copy(update={"parameters": {**record.parameters, "density": density}})
    inputs = [
        item.model_copy(update={"parameters": {**item.parameters, "density": density}})
        for item in record.inputs
    ]
    return record.model_copy(update={"inputs": inputs})


def with_importance(record: MergeRecord, report: Mapping[str, Any]) -> MergeRecord:
    """The record with each donor's ``importance`` set to its scores file."""
    inputs = [
        item.model_copy(update={"parameters": {**item.parameters, "importance": donor["file"]}})
        for item, donor in zip(record.inputs, report["donors"], strict=True)
    ]
    return record.model_copy(update={"inputs": inputs})


def sae_oneshot_record(
    recipe: Any, sae: SaeSettings, parents: list[Member], dtype: str
) -> MergeRecord:
    """``sae_evolve`` of the dense experts with their scores (merge settings of the recipe's
    ``sae:`` block), the child pruned at the schedule's middle rate."""
    rate = (sae.schedule.s_min + sae.schedule.s_max) / 2
    return MergeRecord(
        method="sae_evolve",
        inputs=parent_inputs(sae.merge, parents),
        base_model=recipe.base_model if recipe.prune_target == "delta" else None,
        parameters=merge_parameters(sae.merge, recipe, 1.0 - rate),
        dtype=dtype,
    )


class OneShotSettings(SearchSettings):
    """The ``oneshot:`` block: which merge."""

    method: str = Field("linear", description=f"{', '.join([*STATIC_MERGES, SAE_ONESHOT])}")
    density: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="overrides the merge's density: ties/dare_ties `density`, sce "
        "`select_topk`, scf_rkl `density`, sae_oneshot `offspring_density` (1 - rate); "
        "linear and task_arithmetic are dense and ignore it (None: the defaults)",
    )
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
            record = sae_oneshot_record(
                self.recipe, self.recipe.settings_for("sae"), parents, driver.dtype
            )
            if self.settings.density is not None:
                shared = {**record.parameters, "offspring_density": self.settings.density}
                record = record.model_copy(update={"parameters": shared})
        else:
            merge = STATIC_MERGES[method]
            record = static_record(merge, driver.parents, self.recipe.base_model, driver.dtype)
            record = with_density(record, self.settings.density)
            if merge.functional:
                report = functional_importance(self.recipe, driver, driver.parents)
                driver.note(calibration=report)
                record = with_importance(record, report)
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
