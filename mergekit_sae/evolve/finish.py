"""The finishing stage: test-split report, the best model written to OUT/, recipe, plots, card.

The best member (highest fitness on the last step's subsample) is scored on each task's test
split, together with the reference models the recipe asks for (the dense parents, a linear
50/50 merge streamed into the scoring model). Its weights, configuration and the first
parent's tokenizer replace the model files in OUT/ as one set (``atomic.replace_files``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from mergekit_sae.atomic import replace_files
from mergekit_sae.evolve.card import write_card
from mergekit_sae.evolve.checkpoint import RunState, save_state
from mergekit_sae.evolve.loop import RunContext, task_weights, test_items
from mergekit_sae.evolve.merging import CONFIG_FILES, stream_merge
from mergekit_sae.evolve.plots import write_plots
from mergekit_sae.evolve.population import (
    Member,
    MergeInput,
    MergeRecord,
    TestResult,
    member_dir,
    performance,
)
from mergekit_sae.evolve.reproduce import write_recipe
from mergekit_sae.sparsity import sparsity_from_stats

WEIGHT_SUFFIXES = (".safetensors", ".bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


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
    ctx: RunContext, label: str, kind: str, model: str, member: Member, items: dict
) -> TestResult:
    """Score the evaluator's current candidate on the test items as one report row."""
    scores = ctx.evaluator.score(items)
    return TestResult(
        label=label,
        kind=kind,
        model=model,
        scores=scores,
        mean=performance(scores, task_weights(ctx.recipe)),
        sparsity=member.sparsity,
        zero_fraction=member.zero_fraction,
    )


def linear_record(parents: Sequence[Member], dtype: str) -> MergeRecord:
    """MergeKit's ``linear`` merge of the dense parents with equal weights."""
    return MergeRecord(
        method="linear",
        inputs=[MergeInput(member=p.id, parameters={"weight": 1.0}) for p in parents],
        parameters={"normalize": True},
        dtype=dtype,
    )


def report(ctx: RunContext, state: RunState, best: Member) -> list[TestResult]:
    """Test-split rows: each parent and baseline asked for, then the evolved model."""
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
        )
        measure = ctx.recipe.merge.sparsity_measure
        linear.sparsity = sparsity_from_stats(outcome.stats, measure)
        linear.zero_fraction = sparsity_from_stats(outcome.stats, "zero_count")
        rows.append(test_result(ctx, "linear 50/50", "baseline", "linear", linear, items))
        bar.update(1)
    ctx.evaluator.load(member_dir(best, ctx.out))
    evolved = test_result(ctx, ctx.search.result_label, "evolved", best.id, best, items)
    best.test_scores = evolved.scores
    rows.append(evolved)
    bar.update(1)
    bar.close()
    return rows


def model_files(folder: Path) -> list[Path]:
    """The weight shards, weight index and configuration files of a model folder."""
    names = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in WEIGHT_INDEXES)
    ]
    return names + [folder / n for n in CONFIG_FILES if (folder / n).is_file()]


def write_model(best_dir: Path, tokenizer_dir: Path, out: Path) -> list[Path]:
    """Replace the model files in OUT/ by the best model's and the tokenizer, as one set.

    Model and tokenizer files of an earlier write that the new set lacks (other shards) go.
    """
    sources = model_files(best_dir)
    sources += [tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    old = [p.name for p in model_files(out)] if out.is_dir() else []
    old += [n for n in TOKENIZER_FILES if (out / n).is_file()]
    return replace_files(out, sources, remove=old)


def card_settings(ctx: RunContext) -> dict[str, object]:
    """The search settings shown on the model card."""
    recipe = ctx.recipe
    return {
        **ctx.search.card_settings(),
        "budget": recipe.budget,
        "seed": recipe.seed,
        "tasks": {t.name: {"subsample": t.subsample, "weight": t.weight} for t in recipe.tasks},
    }


def finish(ctx: RunContext, state: RunState) -> RunState:
    """Evaluate the best member on the test splits and write every output into OUT/."""
    best = best_member(ctx, state)
    start = time.perf_counter()
    results = report(ctx, state, best)
    state.seconds["test"] = time.perf_counter() - start
    start = time.perf_counter()
    write_model(member_dir(best, ctx.out), ctx.models[0], ctx.out)
    recipe_path = write_recipe(state.members, best.id, ctx.out)
    table = {row.label: row.scores for row in results}
    write_plots(ctx.out, state.history, table)
    write_card(
        ctx.out,
        name=ctx.out.resolve().name,
        parents=list(ctx.recipe.models),
        recipe=recipe_path.read_text(encoding="utf-8"),
        results=table,
        tasks=[task.name for task in ctx.recipe.tasks],
        evolved=ctx.search.result_label,
        found_by=ctx.search.title,
        settings=card_settings(ctx),
    )
    state.seconds["write"] = time.perf_counter() - start
    state.best = best.id
    state.results = results
    state.finished = True
    save_state(ctx.out, state, keep_members=ctx.recipe.keep_population)
    return state
