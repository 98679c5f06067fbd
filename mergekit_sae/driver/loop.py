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

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mergekit_sae.driver.checkpoint import RunState, population_dir, save_state
from mergekit_sae.driver.context import (
    RunContext,
    build_search,
    derive_seed,
    task_weights,
    training_subsample,
)
from mergekit_sae.driver.executor import Executor, ItemScores, SerialExecutor
from mergekit_sae.driver.members import (
    apply_scores,
    mean_scores,
    merge_member,
    new_member,
    original_member,
)
from mergekit_sae.driver.profiling import peak_rss_mib, reset_peak_rss, rss_mib
from mergekit_sae.driver.ray_executor import RayExecutor
from mergekit_sae.recipe.schema import Recipe
from mergekit_sae.records import Member, OffspringRecord, StepRecord, member_dir
from mergekit_sae.search.base import Proposal, Result


def executor_for(ctx: RunContext) -> Executor:
    """The run's executor (``recipe.executor``), made on first use and kept on the context."""
    if ctx.executor is None:
        settings = ctx.recipe.executor
        if settings.kind == "ray":
            ctx.executor = RayExecutor(settings, ctx.recipe, ctx.models[0], ctx.out)
        else:
            ctx.executor = SerialExecutor(ctx.evaluator)
    return ctx.executor


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
        if not score:
            return [Result(member=self._member(p, stream=False)) for p in proposals]
        if self.step == 0:
            raise ValueError("candidates can be scored only inside a step")
        members = [self._new(p) for p in list(proposals)[: self.affordable(len(proposals))]]
        self.scored.extend(member.id for member in members)
        scores = executor_for(self.ctx).make(members, self._merge, self.items, self.seconds)
        return self._apply_all(members, scores)

    def rescore(self, ids: Sequence[str]) -> list[Result]:
        if self.step == 0:
            raise ValueError("members can be scored only inside a step")
        members = [self.state.members[i] for i in list(ids)[: self.affordable(len(ids))]]
        paths = [member_dir(member, self.ctx.out) for member in members]
        scores = executor_for(self.ctx).rescore(paths, self.items, self.seconds)
        return self._apply_all(members, scores)

    def _new(self, proposal: Proposal) -> Member:
        """Record a proposal as a new member (made by :meth:`_merge`)."""
        return new_member(
            self.state,
            origin=proposal.origin,
            inputs=list(proposal.inputs),
            merge=proposal.merge,
            born=self.step,
            label=proposal.label,
        )

    def _member(self, proposal: Proposal, *, stream: bool) -> Member:
        """Record a proposal as a new member and make it."""
        member = self._new(proposal)
        self._merge(member, stream)
        return member

    def _merge(self, member: Member, stream: bool) -> None:
        """Stream a member's merge to disk (and, with ``stream``, into the evaluator); the
        copies into the evaluator count as ``load``, not ``merge``."""
        loaded = self.seconds["load"]
        receive = self._receive if stream else None
        outcome = merge_member(self.ctx, self.state, member, sink=stream, receive=receive)
        self.seconds["merge"] += outcome.seconds["merge"] - (self.seconds["load"] - loaded)
        self.seconds["write"] += outcome.seconds["write"]

    def _receive(self, name: str, tensor: Any) -> None:
        """Hand one merged tensor to the evaluator, timed as ``load``."""
        start = time.perf_counter()
        self.ctx.evaluator.receive(name, tensor)
        self.seconds["load"] += time.perf_counter() - start

    def _apply_all(self, members: Sequence[Member], scores: Iterable[ItemScores]) -> list[Result]:
        """Record each member's per-item scores (in order) as one fitness evaluation each."""
        return [self._apply(m, s) for m, s in zip(members, scores, strict=True)]

    def _apply(self, member: Member, item_scores: ItemScores) -> Result:
        """Record a member's per-item scores as one fitness evaluation."""
        apply_scores(member, mean_scores(item_scores), self.step, self.ctx.recipe)
        self.state.evaluations += 1
        if self.bar is not None:
            self.bar.update(1)
        return Result(member=member, item_scores={k: list(v) for k, v in item_scores.items()})

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
