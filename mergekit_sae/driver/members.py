"""Members on disk: recording the recipe's models and new members, streaming a member's merge
into its folder (and the scoring model), and recording its sparsity and scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_sae.driver.checkpoint import RunState
from mergekit_sae.driver.context import RunContext, task_weights
from mergekit_sae.merging.stream import (
    MergeOutcome,
    model_stats,
    stage_inputs,
    stats_reference,
    stream_merge,
)
from mergekit_sae.recipe.schema import Recipe
from mergekit_sae.records import Member, member_dir, member_id, performance
from mergekit_sae.sparsity import SparsityStats, sparsity_from_stats


def apply_stats(member: Member, stats: SparsityStats, measure: str) -> None:
    """Record a member's global sparsity (recipe measure) and zero fraction."""
    member.sparsity = sparsity_from_stats(stats, measure)
    member.zero_fraction = sparsity_from_stats(stats, "zero_count")


def apply_scores(member: Member, scores: Mapping[str, float], step: int, recipe: Recipe) -> None:
    """Record a member's task scores on a step's items and its performance (= fitness until
    the search sets its own)."""
    member.scores = dict(scores)
    member.scored_at = step
    member.performance = performance(scores, task_weights(recipe))
    member.fitness = member.performance


def mean_scores(item_scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each task's score: the mean of its item scores."""
    return {task: float(sum(values) / len(values)) for task, values in item_scores.items()}


def merge_member(
    ctx: RunContext, state: RunState, member: Member, *, sink: bool, receive: Any = None
) -> MergeOutcome:
    """Stream the merge a member's record describes into its directory (and, with ``sink``,
    into the evaluator: through ``receive`` when given, else ``ctx.evaluator.receive``)."""
    assert member.merge is not None
    inputs, base = stage_inputs(
        member.merge, lambda i: member_dir(state.members[i], ctx.out), ctx.base
    )
    outcome = stream_merge(
        member.merge,
        inputs,
        base,
        member_dir(member, ctx.out),
        device=ctx.device,
        sink=(receive or ctx.evaluator.receive) if sink else None,
        shard_size=ctx.shard_size,
        stats_base=stats_reference(ctx.recipe.prune_target, ctx.base),
    )
    apply_stats(member, outcome.stats, ctx.recipe.sparsity_measure)
    return outcome


def new_member(state: RunState, **fields: Any) -> Member:
    """Create the next member (numbered in order of creation) and record it."""
    identifier = member_id(state.next_member)
    state.next_member += 1
    member = Member(id=identifier, path=f".work/population/{identifier}", **fields)
    state.members[identifier] = member
    return member


def original_member(ctx: RunContext, state: RunState, name: str, path: Path, origin: str) -> str:
    """Record one of the recipe's models (a dense parent or the base) as a member."""
    identifier = member_id(state.next_member)
    state.next_member += 1
    member = Member(id=identifier, path=str(path), origin=origin, source=name)  # type: ignore[arg-type]
    reference = stats_reference(ctx.recipe.prune_target, ctx.base)
    delta_base = reference if origin != "base" else None
    apply_stats(member, model_stats(path, delta_base), ctx.recipe.sparsity_measure)
    state.members[identifier] = member
    return identifier
