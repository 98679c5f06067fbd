"""The driver every search shares: members, streaming merges, scoring, budget, checkpoints.

A run is: register the recipe's models as members, let the search make its initial stored
models (:meth:`Search.start`), then step t = 1, 2, ...:

1. draw each task's training items (afresh per step, or step 1's for every step when the
   search does not resample), seeded by the recipe seed, t and the task;
2. let the search run its step through a :class:`StepDriver`: it proposes MergeKit stages,
   the driver streams each merge into the scoring model and to disk, scores it (one fitness
   evaluation, counted against the budget) and hands back the scores;
3. record the step, save the search's state and checkpoint.

The run ends after ``recipe.steps`` steps or when the budget is spent. All randomness of step
t derives from (seed, t), so a run resumed from the checkpoint of step k repeats steps k+1..
exactly as an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mergekit_sae import faults
from mergekit_sae.driver.checkpoint import RunState, population_dir, save_state
from mergekit_sae.driver.executor import executor_for
from mergekit_sae.driver.profiling import peak_rss_mib, reset_peak_rss, rss_mib
from mergekit_sae.evaluate import subsample
from mergekit_sae.evaluate.evaluator import Evaluator
from mergekit_sae.merging.stream import (
    DEFAULT_SHARD_SIZE,
    MergeOutcome,
    model_stats,
    stage_inputs,
    stats_reference,
    stream_merge,
)
from mergekit_sae.recipe.schema import Recipe
from mergekit_sae.records import (
    Member,
    OffspringRecord,
    StepRecord,
    member_dir,
    member_id,
    performance,
)
from mergekit_sae.search import search_class
from mergekit_sae.search.base import Proposal, Result, Search
from mergekit_sae.sparsity import SparsityStats, sparsity_from_stats


def build_search(recipe: Recipe, state: dict[str, Any] | None = None) -> Search:
    """The recipe's search with its settings, restored from a checkpointed state when given."""
    cls = search_class(recipe.search)
    restored = cls.state_model.model_validate(state) if state else None
    return cls.create(recipe, recipe.settings_for(), restored)


@dataclass
class RunContext:
    """A run's fixed inputs: recipe, output folder, resolved models, evaluator, the search.

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
    search: Search = field(default=None)  # type: ignore[assignment]
    tracker: Any = None  # a tracking.Tracker: logs every checkpointed step (None: no tracking)
    executor: Any = None  # the parallel executor, made on first use (None: serial scoring)

    def __post_init__(self) -> None:
        if self.search is None:
            self.search = build_search(self.recipe)


def derive_seed(seed: int, *labels: object) -> int:
    """A 64-bit seed determined by the recipe seed and labels (step, task, purpose)."""
    text = ":".join(str(part) for part in (seed, *labels))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def training_subsample(ctx: RunContext, step: int) -> dict[str, list[Any]]:
    """Each task's training items for a step: the search's draw for the step, seeded by
    (seed, draw, task); steps of one draw score on the same items."""
    draw = ctx.search.items_draw(step)
    draws = {}
    for task in ctx.recipe.tasks:
        items = ctx.evaluator.items(task.name, "train")
        draws[task.name] = subsample(
            items, task.subsample, derive_seed(ctx.recipe.seed, draw, task.name)
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


class StepDriver:
    """What a search may do during its start or one step (see :class:`~.search.base.Driver`)."""

    def __init__(self, ctx: RunContext, state: RunState, step: int, bar: Any = None):
        self.ctx = ctx
        self.state = state
        self.step = step
        self.items = training_subsample(ctx, step) if step > 0 else {}
        self.bar = bar
        self.seconds = {"merge": 0.0, "write": 0.0, "load": 0.0, "score": 0.0}
        self.notes: dict[str, Any] = {}
        self.scored: list[str] = []

    @property
    def members(self) -> Mapping[str, Member]:
        return self.state.members

    @property
    def parents(self) -> list[str]:
        return [m.id for m in self.state.members.values() if m.origin == "parent"]

    @property
    def base(self) -> str | None:
        return next((m.id for m in self.state.members.values() if m.origin == "base"), None)

    @property
    def budget_left(self) -> int | None:
        budget = self.ctx.recipe.budget
        return None if budget is None else max(0, budget - self.state.evaluations)

    @property
    def task_weights(self) -> dict[str, float]:
        return task_weights(self.ctx.recipe)

    @property
    def dtype(self) -> str:
        return self.ctx.dtype

    @property
    def run_dir(self) -> Path:
        return self.ctx.out

    def model_dir(self, member: str) -> Path:
        return member_dir(self.state.members[member], self.ctx.out)

    def rng(self, *labels: object) -> random.Random:
        return random.Random(derive_seed(self.ctx.recipe.seed, *labels))

    def affordable(self, count: int) -> int:
        """How many of ``count`` evaluations the budget still allows."""
        left = self.budget_left
        return count if left is None else min(count, left)

    def make(self, proposals: Sequence[Proposal], *, score: bool = True) -> list[Result]:
        if score:
            if self.step == 0:
                raise ValueError("candidates can be scored only inside a step")
            proposals = list(proposals)[: self.affordable(len(proposals))]
        executor = executor_for(self.ctx) if score else None
        if executor is not None:  # merge all to disk, then score them in parallel
            members = [self._merged(proposal, sink=False) for proposal in proposals]
            self.scored.extend(member.id for member in members)
            return self._score_parallel(executor, members)
        results = []
        for proposal in proposals:
            member = self._merged(proposal, sink=score)
            if score:
                results.append(self._score(member))
                self.scored.append(member.id)
            else:
                results.append(Result(member=member))
        return results

    def _merged(self, proposal: Proposal, *, sink: bool) -> Member:
        """Record a proposal as a new member and stream its merge (into the evaluator with
        ``sink``); the copies into the evaluator count as ``load``, not ``merge``."""
        member = new_member(
            self.state,
            origin=proposal.origin,
            inputs=list(proposal.inputs),
            merge=proposal.merge,
            born=self.step,
            label=proposal.label,
        )
        loaded = self.seconds["load"]
        outcome = merge_member(self.ctx, self.state, member, sink=sink, receive=self._receive)
        self.seconds["merge"] += outcome.seconds["merge"] - (self.seconds["load"] - loaded)
        self.seconds["write"] += outcome.seconds["write"]
        return member

    def _receive(self, name: str, tensor: Any) -> None:
        """Hand one merged tensor to the evaluator, timed as ``load``."""
        start = time.perf_counter()
        self.ctx.evaluator.receive(name, tensor)
        self.seconds["load"] += time.perf_counter() - start

    def rescore(self, ids: Sequence[str]) -> list[Result]:
        if self.step == 0:
            raise ValueError("members can be scored only inside a step")
        members = [self.state.members[i] for i in list(ids)[: self.affordable(len(ids))]]
        executor = executor_for(self.ctx)
        if executor is not None:
            return self._score_parallel(executor, members)
        results = []
        for member in members:
            start = time.perf_counter()
            self.ctx.evaluator.load(member_dir(member, self.ctx.out))
            self.seconds["load"] += time.perf_counter() - start
            results.append(self._score(member))
        return results

    def _score_parallel(self, executor: Any, members: Sequence[Member]) -> list[Result]:
        """Score members stored on disk on the executor's workers; apply in the given order."""
        if not members:
            return []
        faults.point("score")
        start = time.perf_counter()
        scores = executor.score([member_dir(m, self.ctx.out) for m in members], self.items)
        self.seconds["score"] += time.perf_counter() - start
        return [self._apply(m, s) for m, s in zip(members, scores, strict=True)]

    def _score(self, member: Member) -> Result:
        """Score the evaluator's current candidate on the step's items as ``member``."""
        faults.point("score")
        start = time.perf_counter()
        item_scores = {k: list(v) for k, v in self.ctx.evaluator.score_items(self.items).items()}
        self.seconds["score"] += time.perf_counter() - start
        return self._apply(member, item_scores)

    def _apply(self, member: Member, item_scores: dict[str, list[float]]) -> Result:
        """Record a member's per-item scores as one fitness evaluation."""
        apply_scores(member, mean_scores(item_scores), self.step, self.ctx.recipe)
        self.state.evaluations += 1
        if self.bar is not None:
            self.bar.update(1)
        return Result(member=member, item_scores=item_scores)

    def note(self, **fields: Any) -> None:
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(self.notes.get(key), dict):
                self.notes[key].update(value)
            else:
                self.notes[key] = value


def initial_population(ctx: RunContext) -> RunState:
    """Record the recipe's models as members and let the search make its initial models."""
    recipe = ctx.recipe
    state = RunState(recipe=recipe.digest_fields())
    start = time.perf_counter()
    for name, path in zip(recipe.models, ctx.models, strict=True):
        original_member(ctx, state, name, path, "parent")
    if recipe.base_model is not None and ctx.base is not None:
        original_member(ctx, state, recipe.base_model, ctx.base, "base")
    population_dir(ctx.out).mkdir(parents=True, exist_ok=True)
    driver = StepDriver(ctx, state, 0)
    ctx.search.start(driver)
    state.population = ctx.search.keep()
    state.search = ctx.search.state.model_dump(mode="json")
    state.seconds["initial"] = time.perf_counter() - start
    return state


def run_step(ctx: RunContext, state: RunState, step: int) -> StepRecord:
    """Run one step of the search on the state (in place) and return its history record."""
    bar = tqdm(desc=f"step {step}", unit="model", leave=False, disable=not ctx.progress)
    profile = getattr(ctx.recipe, "profile", False)
    if profile:
        reset_peak_rss()
    driver = StepDriver(ctx, state, step, bar)
    before = list(state.population)
    ctx.search.step(driver, step)
    bar.close()
    state.population = ctx.search.keep()
    state.search = ctx.search.state.model_dump(mode="json")
    record = step_record(ctx, state, driver, before)
    if profile:  # recipe `profile: true` / `--profile`: memory and per-model times
        made = max(1, len(driver.scored))
        record.info["profile"] = {
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "rss_mib": round(rss_mib(), 1),
            "rss_anon_mib": round(rss_mib("RssAnon"), 1),
            "models_scored": len(driver.scored),
            "seconds_per_model": {k: v / made for k, v in driver.seconds.items()},
        }
    return record


def step_record(
    ctx: RunContext, state: RunState, driver: StepDriver, before: list[str]
) -> StepRecord:
    """Summarise a finished step for the history."""
    notes = dict(driver.notes)
    replacements = notes.pop("replacements", {})
    offspring = []
    for identifier in driver.scored:
        child = state.members[identifier]
        parents = [state.members[i] for i in child.inputs]
        offspring.append(
            OffspringRecord(
                id=child.id,
                parents=list(child.inputs),
                parent_performance=[float(p.performance or 0.0) for p in parents],
                scores=child.scores,
                performance=float(child.performance),
                sparsity=child.sparsity,
                zero_fraction=child.zero_fraction,
                fitness=float(child.fitness),
                replaced=replacements.get(child.id),
            )
        )
    living = [state.members[i] for i in state.population if state.members[i].fitness is not None]
    best = state.members[ctx.search.best(state.members)]
    return StepRecord(
        step=driver.step,
        evaluations=state.evaluations,
        subsample={name: len(items) for name, items in driver.items.items()},
        population_before=before,
        offspring=offspring,
        population_after=list(state.population),
        best=best.id,
        best_fitness=best.fitness,
        best_performance=best.performance,
        mean_fitness=sum(float(m.fitness) for m in living) / max(1, len(living)),
        mean_sparsity=sum(m.sparsity for m in living) / max(1, len(living)),
        info=notes,
        seconds=driver.seconds,
    )


def budget_spent(recipe: Recipe, state: RunState) -> bool:
    """Whether the run has used every evaluation it was given."""
    return recipe.budget is not None and state.evaluations >= recipe.budget


def is_complete(recipe: Recipe, state: RunState) -> bool:
    """Whether the search is over: every step taken, or the budget spent."""
    return state.step >= recipe.steps or budget_spent(recipe, state)


def evolve(
    ctx: RunContext,
    state: RunState | None = None,
    *,
    stop_after: int | None = None,
    on_checkpoint: Callable[[RunState], None] | None = None,
) -> RunState:
    """Run (or continue) the search until it is complete, checkpointing after every step.

    ``state`` is a loaded checkpoint to continue from (None: start afresh); the search's
    state is restored from it. ``stop_after`` stops once that step is checkpointed (for
    tests and partial runs); ``on_checkpoint`` is called after each checkpoint is written,
    and ``ctx.tracker`` (when set) logs each checkpointed step.
    """
    if state is None:
        ctx.search = build_search(ctx.recipe)
        state = initial_population(ctx)
        if ctx.tracker:
            ctx.tracker.start(state)
        save_state(ctx.out, state)
        if on_checkpoint:
            on_checkpoint(state)
    else:
        ctx.search = build_search(ctx.recipe, state.search)
        if ctx.tracker:
            ctx.tracker.start(state)
    last = ctx.recipe.steps if stop_after is None else min(stop_after, ctx.recipe.steps)
    total = ctx.recipe.budget or ctx.recipe.steps
    unit = "evaluation" if ctx.recipe.budget else "step"
    done = state.evaluations if ctx.recipe.budget else state.step
    with tqdm(
        total=total, initial=done, desc=ctx.recipe.search, unit=unit, disable=not ctx.progress
    ) as bar:
        while state.step < last and not budget_spent(ctx.recipe, state):
            step = state.step + 1
            record = run_step(ctx, state, step)
            state.history.append(record)
            state.step = step
            save_state(ctx.out, state)
            if ctx.tracker:
                ctx.tracker.checkpointed(state)
            if on_checkpoint:
                on_checkpoint(state)
            if record.best_fitness is not None:
                bar.set_postfix(best=f"{record.best_fitness:.4f}")
            bar.update((state.evaluations - done) if ctx.recipe.budget else 1)
            done = state.evaluations if ctx.recipe.budget else state.step
    if ctx.executor is not None:  # the steps are over: free the scoring workers
        ctx.executor.close()
        ctx.executor = None
    return state
