"""The finishing stage: test-split report, the best model written to OUT/, recipe, plots, card.

The best member (highest fitness on the last step's subsample) is scored on each task's test
split, together with the reference models the recipe asks for (the dense parents, a linear
50/50 merge streamed into the scoring model); the best member's row also carries the
generation metrics of its test outputs when the evaluator measures them. Its weights,
configuration and the first parent's tokenizer replace the model files in OUT/ as one set
(``atomic.replace_files``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from mergekit_sae import faults
from mergekit_sae.driver.checkpoint import RunState, save_state, work_dir
from mergekit_sae.driver.context import RunContext, task_weights, test_items
from mergekit_sae.merging.rebuild import run_rebuilder
from mergekit_sae.merging.recipes import write_recipe
from mergekit_sae.merging.stream import stats_reference, stream_merge
from mergekit_sae.outputs import pareto
from mergekit_sae.outputs.card import write_card
from mergekit_sae.outputs.model_files import write_model
from mergekit_sae.outputs.plots import write_plots
from mergekit_sae.outputs.tracking import plot_images
from mergekit_sae.records import (
    Member,
    MergeRecord,
    TestResult,
    member_dir,
    performance,
)
from mergekit_sae.search.oneshot import STATIC_MERGES, static_record
from mergekit_sae.sparsity import sparsity_from_stats

REBUILT_DIR = "rebuilt"  # OUT/.work/rebuilt/: evicted members rebuilt for the test report


def best_member(ctx: RunContext, state: RunState) -> Member:
    """The search's answer: for SAE the living member of highest fitness."""
    return state.members[ctx.search.best(state.members)]


def parent_labels(parents: Sequence[Member]) -> list[str]:
    """Short row labels for the parents: the last part of their names, made unique."""
    labels = []
    for parent in parents:
        label = Path(str(parent.source)).name or str(parent.source)
        labels.append(label if label not in labels else f"{label} ({parent.id})")
    return labels


def test_result(
    ctx: RunContext,
    label: str,
    kind: str,
    model: str,
    member: Member,
    items: dict,
    *,
    generation: bool = False,
) -> TestResult:
    """Score the evaluator's current candidate on the test items as one report row.

    With ``generation`` and an evaluator that offers ``score_with_generation``, the row also
    carries the generation metrics of those same test outputs (one scoring pass).
    """
    measured = None
    with_generation = getattr(ctx.evaluator, "score_with_generation", None)
    if generation and with_generation is not None:
        scores, measured = with_generation(items)
    else:
        scores = ctx.evaluator.score(items)
    return TestResult(
        label=label,
        kind=kind,
        model=model,
        scores=scores,
        mean=performance(scores, task_weights(ctx.recipe)),
        sparsity=member.sparsity,
        zero_fraction=member.zero_fraction,
        generation=measured,
    )


def linear_record(parents: Sequence[Member], dtype: str) -> MergeRecord:
    """MergeKit's ``linear`` merge of the dense parents with equal weights (the one-shot one)."""
    return static_record(STATIC_MERGES["linear"], [p.id for p in parents], None, dtype)


def report(
    ctx: RunContext, state: RunState, best: Member, best_dir: Path | None = None
) -> list[TestResult]:
    """Test-split rows: each parent and baseline asked for, then the evolved model.

    ``best_dir`` holds the evolved model's weights (default: its member folder).
    """
    items = test_items(ctx)
    parents = [m for m in state.members.values() if m.origin == "parent"]
    baselines = ctx.recipe.test_baselines
    total = 1 + len(parents) * ("parents" in baselines) + ("linear" in baselines)
    bar = tqdm(total=total, desc="test split", unit="model", disable=not ctx.progress)
    rows = []
    if "parents" in ctx.recipe.test_baselines:
        for label, parent in zip(parent_labels(parents), parents, strict=False):
            ctx.evaluator.load(member_dir(parent, ctx.out))
            rows.append(test_result(ctx, label, "parent", str(parent.source), parent, items))
            bar.update(1)
    if "linear" in ctx.recipe.test_baselines:
        record = linear_record(parents, ctx.dtype)
        linear = Member(id="linear", path="", origin="offspring", merge=record)
        outcome = stream_merge(
            record,
            [member_dir(p, ctx.out) for p in parents],
            None,
            None,
            device=ctx.device,
            sink=ctx.evaluator.receive,
            stats_base=stats_reference(ctx.recipe.prune_target, ctx.base),
        )
        measure = ctx.recipe.sparsity_measure
        linear.sparsity = sparsity_from_stats(outcome.stats, measure)
        linear.zero_fraction = sparsity_from_stats(outcome.stats, "zero_count")
        rows.append(test_result(ctx, "linear 50/50", "baseline", "linear", linear, items))
        bar.update(1)
    ctx.evaluator.load(best_dir or member_dir(best, ctx.out))
    evolved = test_result(ctx, result_label(ctx), "evolved", best.id, best, items, generation=True)
    best.test_scores = evolved.scores
    rows.append(evolved)
    bar.update(1)
    bar.close()
    return rows


def card_settings(ctx: RunContext) -> dict[str, object]:
    """The search settings shown on the model card."""
    recipe = ctx.recipe
    return {
        **ctx.search.card_settings(),
        "budget": recipe.budget,
        "seed": recipe.seed,
        "tasks": {t.name: {"subsample": t.subsample, "weight": t.weight} for t in recipe.tasks},
    }


def result_label(ctx: RunContext) -> str:
    """The report row of the final model: the search's best, or the chosen front member."""
    if ctx.recipe.select == "best":
        return ctx.search.result_label
    return f"{ctx.search.name} (sparsest within {ctx.recipe.tolerance:g} pt)"


def chosen_member(ctx: RunContext, state: RunState, on_front: Sequence[pareto.Point]) -> Member:
    """The final model: the search's best, or (``select: sparsest_within``) the sparsest
    front member within ``tolerance`` points of the front's highest training mean."""
    if ctx.recipe.select == "sparsest_within" and on_front:
        return state.members[pareto.sparsest_within(on_front, ctx.recipe.tolerance).candidate]
    return best_member(ctx, state)


def pareto_outputs(
    ctx: RunContext,
    state: RunState,
    candidates: Sequence[pareto.Point],
    on_front: Sequence[pareto.Point],
    chosen: Member,
    results: Sequence[TestResult],
    locate: Callable[[str], Path],
) -> None:
    """Score the front (at most ``pareto_max``, the final model kept) on the test splits and
    write ``OUT/pareto.csv`` and ``OUT/pareto.png``; rows already scored are reused."""
    kept = pareto.cap(on_front, ctx.recipe.pareto_max, keep=[chosen.id])
    sources = {str(m.source): m.id for m in state.members.values() if m.origin == "parent"}
    known = {sources[r.model]: r.scores for r in results if r.kind == "parent"}
    known[chosen.id] = dict(chosen.test_scores or {})
    items = test_items(ctx)

    def score(identifier: str) -> dict[str, float]:
        ctx.evaluator.load(locate(identifier))
        return ctx.evaluator.score(items)

    test = pareto.score_front(kept, state.members, known, score)
    tasks = [task.name for task in ctx.recipe.tasks]
    weights = task_weights(ctx.recipe)
    pareto.write_front(ctx.out, candidates, on_front, test, tasks, weights, chosen.id)


def finish(ctx: RunContext, state: RunState) -> RunState:
    """Evaluate the final model (and the Pareto front) on the test splits and write every
    output into OUT/; members no longer on disk are rebuilt from their lineage."""
    candidates = pareto.points(state.members)
    on_front = pareto.front(candidates)
    best = chosen_member(ctx, state, on_front)
    cache = work_dir(ctx.out) / REBUILT_DIR
    shutil.rmtree(cache, ignore_errors=True)
    rebuilder = run_rebuilder(
        state.members,
        ctx.out,
        cache,
        prune_target=ctx.recipe.prune_target,
        shard_size=ctx.shard_size,
        device=ctx.device,
    )
    best_dir = rebuilder.path(best.id)
    start = time.perf_counter()
    faults.point("finish.report")
    results = report(ctx, state, best, best_dir)
    pareto_outputs(ctx, state, candidates, on_front, best, results, rebuilder.path)
    state.seconds["test"] = time.perf_counter() - start
    start = time.perf_counter()
    faults.point("finish.model")
    write_model(best_dir, ctx.models[0], ctx.out)
    faults.point("finish.recipe")
    recipe_path = write_recipe(state.members, best.id, ctx.out)
    table = {row.label: row.scores for row in results}
    faults.point("finish.plots")
    write_plots(ctx.out, state.history, table)
    faults.point("finish.card")
    write_card(
        ctx.out,
        name=ctx.out.resolve().name,
        parents=list(ctx.recipe.models),
        recipe=recipe_path.read_text(encoding="utf-8"),
        results=table,
        tasks=[task.name for task in ctx.recipe.tasks],
        evolved=result_label(ctx),
        found_by=ctx.search.title,
        settings=card_settings(ctx),
    )
    state.seconds["write"] = time.perf_counter() - start
    state.best = best.id
    state.results = results
    state.finished = True
    faults.point("finish.state")
    save_state(ctx.out, state, keep_members=ctx.recipe.keep_population)
    shutil.rmtree(cache, ignore_errors=True)
    if ctx.tracker:
        ctx.tracker.final(state, ctx.recipe, plot_images(ctx.out))
    return state
