"""SAE's operators as MergeKit stages: the initial archive, pruning, and the offspring merges.

Each function returns the :class:`MergeRecord` of one stage, so every model SAE makes rebuilds
with ``mergekit-yaml`` (a chain of stages with ``mergekit-multi``):

- :func:`initial_layout`: each dense parent, then sparse variants at rates spread over
  [s_min, s_max] (paper section 2.1), :func:`initial_size` of them in all;
  :func:`prune_record` makes one variant (``sae_prune``), :func:`make_initial_archive` all;
- :func:`offspring_record`: the ``sae_evolve`` merge of a pair (eq. 5 with attraction), the
  parents pruned at ``parent_density`` inside the merge and the child at ``child_density``;
- :func:`scf_rkl_offspring_record`: the ``scf_rkl`` merge, the fitter parent as anchor.

- :func:`slerp_offspring`: M2N2's split-point SLERP (:func:`~.niches.crossover_record`) of the
  pair, pruned before (``sae_prune`` stages of the parents) and after (one of the blend).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_sae.records import Member, MergeInput, MergeRecord, lineage
from mergekit_sae.search.base import Driver, Proposal
from mergekit_sae.search.niches import crossover_record, draw_crossover
from mergekit_sae.search.sae_settings import SaeMergeSettings, SaeSettings

# Smallest score handed to the merge: eq. 5 is undefined when every parent scores zero.
SCORE_FLOOR = 1e-6


def pruning_rates(count: int, s_min: float, s_max: float) -> list[float]:
    """``count`` rates spread evenly over [s_min, s_max] (the midpoint when count is 1)."""
    if count == 1:
        return [(s_min + s_max) / 2]
    return [s_min + (s_max - s_min) * j / (count - 1) for j in range(count)]


def initial_layout(
    n_parents: int, size: int, s_min: float, s_max: float
) -> list[tuple[int, float | None]]:
    """The initial archive as (parent index, pruning rate or None for the dense parent).

    Each dense parent comes first; the remaining ``size - n_parents`` slots are sparse
    variants dealt round-robin over the parents, each parent's variants at rates spread
    evenly over [s_min, s_max].
    """
    if size < n_parents:
        raise ValueError(f"archive size {size} is smaller than the {n_parents} parents")
    counts = [len(range(k, size - n_parents, n_parents)) for k in range(n_parents)]
    layout: list[tuple[int, float | None]] = [(k, None) for k in range(n_parents)]
    rates = [pruning_rates(c, s_min, s_max) if c else [] for c in counts]
    for j in range(size - n_parents):
        k = j % n_parents
        layout.append((k, rates[k][j // n_parents]))
    return layout


def initial_size(settings: SaeSettings, n_parents: int) -> int:
    """Members of the initial archive: ``archive_size`` (dense parents and pruned variants), or
    the dense parents alone without ``initial_variants``."""
    return settings.archive_size if settings.initial_variants else n_parents


def make_initial_archive(recipe: Any, settings: SaeSettings, driver: Driver) -> list[str]:
    """Each dense parent, then ``sae_prune`` variants dealt round-robin at spread rates (not
    scored yet)."""
    parents = [driver.members[i] for i in driver.parents]
    schedule = settings.schedule
    layout = initial_layout(
        len(parents), initial_size(settings, len(parents)), schedule.s_min, schedule.s_max
    )
    archive = []
    for index, rate in layout:
        if rate is None:
            archive.append(parents[index].id)
            continue
        record = prune_record(parents[index].id, rate, recipe, driver.dtype)
        proposal = Proposal(merge=record, origin="pruned", inputs=(parents[index].id,))
        (made,) = driver.make([proposal], score=False)
        archive.append(made.member.id)
    return archive


def prune_record(member: str, rate: float, recipe: Any, dtype: str) -> MergeRecord:
    """The ``sae_prune`` stage that prunes a member's weights (or, with the recipe's
    ``prune_target: delta``, its task vector) at a rate."""
    delta = recipe.prune_target == "delta"
    return MergeRecord(
        method="sae_prune",
        inputs=[MergeInput(member=member, parameters={"density": 1.0 - rate})],
        base_model=recipe.base_model if delta else None,
        parameters={"prune_target": recipe.prune_target},
        dtype=dtype,
    )


def parent_inputs(
    settings: SaeMergeSettings, parents: Sequence[Member], density: float | None = None
) -> list[MergeInput]:
    """Per-model ``sae_evolve`` inputs: score = performance (at least SCORE_FLOOR), the
    density when given, and the global sparsity under the global scope."""
    inputs = []
    for parent in parents:
        per_model: dict[str, Any] = {"score": max(float(parent.performance), SCORE_FLOOR)}
        if density is not None:
            per_model["density"] = density
        if settings.sparsity_scope == "global":
            per_model["global_sparsity"] = parent.sparsity
        inputs.append(MergeInput(member=parent.id, parameters=per_model))
    return inputs


def merge_parameters(
    settings: SaeMergeSettings, recipe: Any, offspring_density: float
) -> dict[str, Any]:
    """The shared ``sae_evolve`` parameters of an offspring merge (the recipe gives the
    run-wide ``sparsity_measure`` and ``prune_target``)."""
    return {
        "sparsity_weight": settings.sparsity_weight,
        "sparsity_measure": recipe.sparsity_measure,
        "sparsity_scope": settings.sparsity_scope,
        "renormalize": settings.renormalize,
        "prune_target": recipe.prune_target,
        "offspring_density": offspring_density,
    }


def offspring_record(
    settings: SaeMergeSettings,
    recipe: Any,
    parents: Sequence[Member],
    originals: Sequence[Member],
    *,
    parent_density: float,
    child_density: float,
    dtype: str,
) -> MergeRecord:
    """The ``sae_evolve`` stage that makes one offspring of a pair.

    The recipe gives the run-wide ``prune_target``, ``sparsity_measure`` and ``base_model``.
    Per-model: ``score`` = the parent's performance (at least SCORE_FLOOR, so a
    pair that scores zero everywhere still merges, with equal weights), ``density`` = the
    parents' pruning before the merge, ``global_sparsity`` under the global scope. With
    ``redense: original`` the dense originals the pair descends from follow as
    ``dense_reference`` inputs, except an original that is itself one of the pair (MergeKit
    cannot take one model twice, and a dense parent already holds every slot); when that leaves
    no reference the merge is recorded as ``redense: parents``.
    """
    inputs = parent_inputs(settings, parents, density=parent_density)
    references = [
        original
        for original in dict.fromkeys(m.id for m in originals)
        if original not in {parent.id for parent in parents}
    ]
    redense = settings.redense if references else "parents"
    if redense == "original":
        for original in references:
            inputs.append(MergeInput(member=original, parameters={"dense_reference": True}))
    delta = recipe.prune_target == "delta"
    return MergeRecord(
        method="sae_evolve",
        inputs=inputs,
        base_model=recipe.base_model if delta else None,
        parameters={**merge_parameters(settings, recipe, child_density), "redense": redense},
        dtype=dtype,
    )


def scf_rkl_offspring_record(
    pair: Sequence[Member], fitness: Sequence[float], rate: float, dtype: str
) -> MergeRecord:
    """The ``scf_rkl`` stage of one offspring: the fitter member anchors, the other donates.

    ``fitness`` is the pair's fitness in order (ties: the first of the pair anchors); the fused
    density is the schedule's rate, so the offspring keeps 1 - rate of the anchor's coordinates.
    """
    first, second = pair
    anchor, donor = (second, first) if fitness[1] > fitness[0] else (first, second)
    return MergeRecord(
        method="scf_rkl",
        inputs=[MergeInput(member=donor.id)],
        base_member=anchor.id,
        parameters={"density": rate},
        dtype=dtype,
    )


def original_parents(members: Mapping[str, Member], pair: Sequence[Member]) -> list[Member]:
    """The dense parents the members of a pair descend from, in order of creation."""
    found = {
        ancestor.id: ancestor
        for member in pair
        for ancestor in lineage(members, member.id)
        if ancestor.origin == "parent"
    }
    return [found[identifier] for identifier in sorted(found)]


def slerp_offspring(
    driver: Driver,
    recipe: Any,
    pair: Sequence[str],
    units: Sequence[Sequence[str]],
    rng: random.Random,
    *,
    parent_density: float,
    child_density: float,
) -> Proposal:
    """The proposal that scores one SLERP child, its intermediate stages made (not scored).

    Parents are pruned first (``sae_prune`` at ``parent_density``, when below 1), then blended
    by a ``slerp`` stage split at a layer boundary drawn from ``rng``; the proposal is that
    blend, or the ``sae_prune`` of it at ``child_density`` when below 1.
    """
    dtype = driver.dtype
    ends = list(pair)
    if parent_density < 1.0:
        stages = [
            Proposal(prune_record(i, 1.0 - parent_density, recipe, dtype), "pruned", (i,))
            for i in pair
        ]
        ends = [made.member.id for made in driver.make(stages, score=False)]
    split, w = draw_crossover(units, rng)
    record = crossover_record(ends[0], ends[1], units, split, w, dtype)
    label = f"slerp w={w:.4f}"
    if child_density >= 1.0:
        return Proposal(record, "offspring", tuple(ends), label)
    (blend,) = driver.make([Proposal(record, "crossover", tuple(ends), label)], score=False)
    pruned = prune_record(blend.member.id, 1.0 - child_density, recipe, dtype)
    return Proposal(pruned, "offspring", (blend.member.id,), label)


def offspring_proposal(
    driver: Driver,
    recipe: Any,
    settings: SaeSettings,
    ids: tuple[str, str],
    units: Sequence[Sequence[str]],
    rng: random.Random,
    *,
    parent_density: float,
    child_density: float,
    rate: float,
    fitness: Sequence[float],
    label: str | None = None,
) -> Proposal:
    """The pair's child by ``settings.crossover``: split-point SLERP (its blend made now),
    SCF-RKL into the fitter by ``fitness`` at fused density ``rate``, or eq. 5's merge."""
    if settings.crossover == "slerp":
        return slerp_offspring(
            driver,
            recipe,
            ids,
            units,
            rng,
            parent_density=parent_density,
            child_density=child_density,
        )
    parents = [driver.members[i] for i in ids]
    if settings.crossover == "scf_rkl":
        record = scf_rkl_offspring_record(parents, list(fitness), rate, driver.dtype)
    else:
        record = offspring_record(
            settings.merge,
            recipe,
            parents,
            original_parents(driver.members, parents),
            parent_density=parent_density,
            child_density=child_density,
            dtype=driver.dtype,
        )
    return Proposal(record, "offspring", ids, label)
