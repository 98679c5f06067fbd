"""The generation loop of Sparsity-Aware Evolution (arXiv 2602.08218, section 2), resumable.

Step t (1-based), with pruning rate r_t = cyclic_rate(t - 1):

1. draw each task's training subsample afresh (seeded by the recipe seed, t and the task);
2. score the population on it (every member when ``rescore_population``, else only members
   never scored), so offspring and members are compared on the same items;
3. shuffle the population into floor(N/2) pairs;
4. for each pair, stream the ``sae_evolve`` merge of the two members (scores = their
   performance, densities 1.0 since members are already sparse, offspring density 1 - r_t)
   into the scoring model and to disk, score it, and let it replace the worst member when
   its fitness (performance + beta_fit * global sparsity) is strictly higher;
5. checkpoint.

All randomness of step t derives from (seed, t), so a run resumed from the checkpoint of
step k repeats steps k+1.. exactly as an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mergekit_sae.evaluate import subsample
from mergekit_sae.evolve.checkpoint import RunState, population_dir, save_state
from mergekit_sae.evolve.merging import DEFAULT_SHARD_SIZE, MergeOutcome, model_stats, stream_merge
from mergekit_sae.evolve.population import (
    Member,
    MergeInput,
    MergeRecord,
    OffspringRecord,
    StepRecord,
    best_index,
    fitness,
    initial_layout,
    lineage,
    member_dir,
    member_id,
    performance,
    random_pairs,
    replacement_slot,
)
from mergekit_sae.evolve.recipe import Recipe
from mergekit_sae.evolve.scoring import Evaluator
from mergekit_sae.sparsity import SparsityStats, cyclic_rate, sparsity_from_stats

# Smallest score handed to the merge: eq. 5 is undefined when every parent scores zero.
SCORE_FLOOR = 1e-6


@dataclass
class RunContext:
    """A run's fixed inputs: recipe, output folder, resolved models, evaluator, merge settings.

    ``models``/``base`` are the local directories of ``recipe.models``/``recipe.base_model``;
    ``device`` is where tensors are merged; ``dtype`` the dtype merged weights are written in.
    """

    recipe: Recipe
    out: Path
    models: list[Path]
    base: Path | None
    evaluator: Evaluator
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True
    shard_size: int = DEFAULT_SHARD_SIZE


def derive_seed(seed: int, *labels: object) -> int:
    """A 64-bit seed determined by the recipe seed and labels (step, task, purpose)."""
    text = ":".join(str(part) for part in (seed, *labels))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def rate_at(recipe: Recipe, step: int) -> float:
    """The schedule's pruning rate of a 1-based step."""
    schedule = recipe.schedule
    return cyclic_rate(
        step - 1, s_min=schedule.s_min, s_max=schedule.s_max, t0=schedule.t0, t_mult=schedule.t_mult
    )


def training_subsample(ctx: RunContext, step: int) -> dict[str, list[Any]]:
    """Each task's training items for a step, drawn afresh from (seed, step, task)."""
    draws = {}
    for task in ctx.recipe.tasks:
        items = ctx.evaluator.items(task.name, "train")
        draws[task.name] = subsample(
            items, task.subsample, derive_seed(ctx.recipe.seed, step, task.name)
        )
    return draws


def test_items(ctx: RunContext) -> dict[str, list[Any]]:
    """Each task's test items for the final report (a seeded subsample when one is asked)."""
    return {
        task.name: subsample(
            ctx.evaluator.items(task.name, "test"),
            task.test_subsample,
            derive_seed(ctx.recipe.seed, "test", task.name),
        )
        for task in ctx.recipe.tasks
    }


def task_weights(recipe: Recipe) -> dict[str, float]:
    """Weight of each task in the performance mean."""
    return {task.name: task.weight for task in recipe.tasks}


def apply_stats(member: Member, stats: SparsityStats, measure: str) -> None:
    """Record a member's global sparsity (recipe measure) and zero fraction."""
    member.sparsity = sparsity_from_stats(stats, measure)
    member.zero_fraction = sparsity_from_stats(stats, "zero_count")


def apply_scores(member: Member, scores: Mapping[str, float], step: int, recipe: Recipe) -> None:
    """Record a member's task scores on a step's subsample, its performance and fitness."""
    member.scores = dict(scores)
    member.scored_at = step
    member.performance = performance(scores, task_weights(recipe))
    member.fitness = fitness(member.performance, member.sparsity, recipe.fitness_sparsity_weight)


def prune_record(recipe: Recipe, parent: Member, rate: float, dtype: str) -> MergeRecord:
    """The ``sae_prune`` stage that makes a sparse variant of a parent at a pruning rate."""
    delta = recipe.merge.prune_target == "delta"
    return MergeRecord(
        method="sae_prune",
        inputs=[MergeInput(member=parent.id, parameters={"density": 1.0 - rate})],
        base_model=recipe.base_model if delta else None,
        parameters={"prune_target": recipe.merge.prune_target},
        dtype=dtype,
    )


def offspring_record(
    recipe: Recipe, parents: Sequence[Member], originals: Sequence[Member], rate: float, dtype: str
) -> MergeRecord:
    """The ``sae_evolve`` stage that makes one offspring of a pair at the step's rate.

    Per-model: ``score`` = the parent's performance (at least SCORE_FLOOR, so a pair that
    scores zero on every task still merges, with equal weights), ``density`` = 1.0 (members
    are already pruned), ``global_sparsity`` = its global sparsity (global scope). With ``redense:
    original`` the original dense parents the pair descends from follow as ``dense_reference``
    inputs (the method refills pruned slots from their mean), except an original that is itself
    one of the pair: MergeKit cannot take one model twice, and a dense parent in the pair already
    holds every slot. When that leaves no reference the merge is recorded as ``redense:
    parents`` (with ``renormalize``, the dense member's values then fill those slots alike).
    """
    settings = recipe.merge
    inputs = []
    for parent in parents:
        score = max(float(parent.performance), SCORE_FLOOR)
        per_model: dict[str, Any] = {"score": score, "density": 1.0}
        if settings.sparsity_scope == "global":
            per_model["global_sparsity"] = parent.sparsity
        inputs.append(MergeInput(member=parent.id, parameters=per_model))
    references = [
        original
        for original in dict.fromkeys(m.id for m in originals)
        if original not in {parent.id for parent in parents}
    ]
    redense = settings.redense if references else "parents"
    if redense == "original":
        for original in references:
            inputs.append(MergeInput(member=original, parameters={"dense_reference": True}))
    delta = settings.prune_target == "delta"
    return MergeRecord(
        method="sae_evolve",
        inputs=inputs,
        base_model=recipe.base_model if delta else None,
        parameters={
            "sparsity_weight": settings.sparsity_weight,
            "sparsity_measure": settings.sparsity_measure,
            "sparsity_scope": settings.sparsity_scope,
            "renormalize": settings.renormalize,
            "prune_target": settings.prune_target,
            "offspring_density": 1.0 - rate,
            "redense": redense,
        },
        dtype=dtype,
    )


def merge_member(ctx: RunContext, state: RunState, member: Member, *, sink: bool) -> MergeOutcome:
    """Stream the merge a member's record describes into its directory (and the evaluator)."""
    assert member.merge is not None
    inputs = []
    for item in member.merge.inputs:
        if item.member is not None:
            inputs.append(member_dir(state.members[item.member], ctx.out))
        else:
            inputs.append(Path(str(item.model)))
    base = ctx.base if member.merge.base_model is not None else None
    outcome = stream_merge(
        member.merge,
        inputs,
        base,
        member_dir(member, ctx.out),
        device=ctx.device,
        sink=ctx.evaluator.receive if sink else None,
        shard_size=ctx.shard_size,
        stats_on_delta=base is not None,
    )
    apply_stats(member, outcome.stats, ctx.recipe.merge.sparsity_measure)
    return outcome


def new_member(state: RunState, **fields: Any) -> Member:
    """Create the next member (numbered in order of creation) and record it."""
    identifier = member_id(state.next_member)
    state.next_member += 1
    member = Member(id=identifier, path=f".work/population/{identifier}", **fields)
    state.members[identifier] = member
    return member


def initial_population(ctx: RunContext) -> RunState:
    """Dense parents plus pruned variants at rates spread over [s_min, s_max]; step 0 state."""
    recipe = ctx.recipe
    state = RunState(recipe=recipe.digest_fields())
    start = time.perf_counter()
    delta = recipe.merge.prune_target == "delta"
    measure = recipe.merge.sparsity_measure
    parents = []
    for name, path in zip(recipe.models, ctx.models, strict=False):
        identifier = member_id(state.next_member)
        state.next_member += 1
        parent = Member(id=identifier, path=str(path), origin="parent", source=name)
        apply_stats(parent, model_stats(path, ctx.base if delta else None), measure)
        state.members[identifier] = parent
        parents.append(parent)
    layout = initial_layout(
        len(parents), recipe.population_size, recipe.schedule.s_min, recipe.schedule.s_max
    )
    population_dir(ctx.out).mkdir(parents=True, exist_ok=True)
    for index, rate in layout:
        if rate is None:
            state.population.append(parents[index].id)
            continue
        variant = new_member(
            state,
            origin="pruned",
            inputs=[parents[index].id],
            merge=prune_record(recipe, parents[index], rate, ctx.dtype),
        )
        merge_member(ctx, state, variant, sink=False)
        state.population.append(variant.id)
    state.seconds["initial"] = time.perf_counter() - start
    return state


def score_population(
    ctx: RunContext, state: RunState, items: Mapping[str, list[Any]], step: int, bar: Any
) -> float:
    """Score the members that need it on the step's items; return the seconds spent."""
    start = time.perf_counter()
    for identifier in state.population:
        member = state.members[identifier]
        if ctx.recipe.rescore_population or member.scored_at is None:
            ctx.evaluator.load(member_dir(member, ctx.out))
            apply_scores(member, ctx.evaluator.score(items), step, ctx.recipe)
            bar.update(1)
    return time.perf_counter() - start


def original_parents(state: RunState, pair: Sequence[Member]) -> list[Member]:
    """The dense parents the members of a pair descend from, in order of creation."""
    found = {
        ancestor.id: ancestor
        for member in pair
        for ancestor in lineage(state.members, member.id)
        if ancestor.origin == "parent"
    }
    return [found[identifier] for identifier in sorted(found)]


def run_step(ctx: RunContext, state: RunState, step: int) -> StepRecord:
    """Run one generation on the state (in place) and return its history record."""
    recipe = ctx.recipe
    rate = rate_at(recipe, step)
    items = training_subsample(ctx, step)
    pairs = random_pairs(state.population, random.Random(derive_seed(recipe.seed, step, "pairs")))
    to_score = sum(
        1
        for i in state.population
        if recipe.rescore_population or state.members[i].scored_at is None
    )
    bar = tqdm(
        total=to_score + len(pairs),
        desc=f"step {step} (rate {rate:.2f})",
        unit="model",
        leave=False,
        disable=not ctx.progress,
    )
    seconds = {"merge": 0.0, "write": 0.0, "score": 0.0}
    seconds["score"] += score_population(ctx, state, items, step, bar)
    before = list(state.population)
    fitness_before = {i: float(state.members[i].fitness) for i in before}
    offspring_records = []
    for first, second in pairs:
        pair = [state.members[first], state.members[second]]
        originals = original_parents(state, pair)
        child = new_member(
            state,
            origin="offspring",
            inputs=[first, second],
            merge=offspring_record(recipe, pair, originals, rate, ctx.dtype),
            born=step,
        )
        outcome = merge_member(ctx, state, child, sink=True)
        seconds["merge"] += outcome.seconds["merge"]
        seconds["write"] += outcome.seconds["write"]
        start = time.perf_counter()
        apply_scores(child, ctx.evaluator.score(items), step, recipe)
        seconds["score"] += time.perf_counter() - start
        current = [float(state.members[i].fitness) for i in state.population]
        slot = replacement_slot(current, float(child.fitness))
        replaced = None
        if slot is not None:
            replaced = state.population[slot]
            state.population[slot] = child.id
        offspring_records.append(
            OffspringRecord(
                id=child.id,
                parents=[first, second],
                parent_performance=[float(m.performance) for m in pair],
                scores=child.scores,
                performance=float(child.performance),
                sparsity=child.sparsity,
                zero_fraction=child.zero_fraction,
                fitness=float(child.fitness),
                replaced=replaced,
            )
        )
        bar.update(1)
    bar.close()
    return step_record(state, step, rate, items, before, fitness_before, offspring_records, seconds)


def step_record(
    state: RunState,
    step: int,
    rate: float,
    items: Mapping[str, list[Any]],
    before: list[str],
    fitness_before: dict[str, float],
    offspring: list[OffspringRecord],
    seconds: dict[str, float],
) -> StepRecord:
    """Summarise a finished step for the history."""
    living = [state.members[i] for i in state.population]
    values = [float(m.fitness) for m in living]
    best = living[best_index(values)]
    return StepRecord(
        step=step,
        rate=rate,
        offspring_density=1.0 - rate,
        subsample={name: len(task_items) for name, task_items in items.items()},
        population_before=before,
        fitness_before=fitness_before,
        offspring=offspring,
        population_after=list(state.population),
        best=best.id,
        best_fitness=float(best.fitness),
        best_performance=float(best.performance),
        mean_fitness=sum(values) / len(values),
        mean_sparsity=sum(m.sparsity for m in living) / len(living),
        seconds=seconds,
    )


def evolve(
    ctx: RunContext,
    state: RunState | None = None,
    *,
    stop_after: int | None = None,
    on_checkpoint: Callable[[RunState], None] | None = None,
) -> RunState:
    """Run (or continue) the search up to ``recipe.steps``, checkpointing after every step.

    ``state`` is a loaded checkpoint to continue from (None: start with a fresh population).
    ``stop_after`` stops once that step is checkpointed (for tests and partial runs);
    ``on_checkpoint`` is called after each checkpoint is written.
    """
    if state is None:
        state = initial_population(ctx)
        save_state(ctx.out, state)
        if on_checkpoint:
            on_checkpoint(state)
    last = ctx.recipe.steps if stop_after is None else min(stop_after, ctx.recipe.steps)
    with tqdm(
        total=ctx.recipe.steps,
        initial=state.step,
        desc="evolve",
        unit="step",
        disable=not ctx.progress,
    ) as bar:
        while state.step < last:
            step = state.step + 1
            record = run_step(ctx, state, step)
            state.history.append(record)
            state.step = step
            save_state(ctx.out, state)
            if on_checkpoint:
                on_checkpoint(state)
            bar.set_postfix(best=f"{record.best_fitness:.4f}", rate=f"{record.rate:.2f}")
            bar.update(1)
    return state
