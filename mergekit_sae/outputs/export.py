"""``export``: write any recorded candidate of a run as a complete model folder.

The candidate is rebuilt from its lineage when its weights are gone
(:mod:`mergekit_sae.merging.rebuild`); the folder holds its weights, configuration, the first
parent's tokenizer, its own ``mergekit_config.yml`` (its lineage as MergeKit stages) and a model
card.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mergekit_sae.atomic import atomic_dir
from mergekit_sae.driver.checkpoint import load_state, state_path
from mergekit_sae.errors import OutputFolderError, UsageError
from mergekit_sae.evaluate import resolve_device
from mergekit_sae.merging.rebuild import run_rebuilder
from mergekit_sae.merging.recipes import write_recipe
from mergekit_sae.outputs.card import write_card
from mergekit_sae.outputs.model_files import write_model
from mergekit_sae.records import Member
from mergekit_sae.search import search_class


def candidate_settings(member: Member, search: str) -> dict[str, object]:
    """What the exported card says about the candidate."""
    return {
        "candidate": member.id,
        "search": search,
        "training scores": {k: round(v, 4) for k, v in member.scores.items()},
        "scored at step": member.scored_at,
        "fraction of zeros": round(member.zero_fraction, 4),
    }


def export(run: Path, candidate: str, target: Path, *, device: str | None = None) -> Path:
    """Write candidate ``candidate`` of the run in ``run`` as a complete model folder."""
    state = load_state(run) if run.is_dir() else None
    if state is None:
        raise OutputFolderError(f"{run} holds no evolve run ({state_path(run)} is missing)")
    if candidate not in state.members:
        known = sorted(state.members)
        raise UsageError(f"{run}: no candidate {candidate!r}; recorded: {known[0]} ... {known[-1]}")
    recipe = state.recipe  # as the run validated it (JSON data)
    device = device or str(resolve_device(recipe.get("device", "auto"))[0])
    member = state.members[candidate]
    parents = [m for m in state.members.values() if m.origin == "parent"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as cache:
        rebuilder = run_rebuilder(
            state.members,
            run,
            Path(cache),
            prune_target=recipe["prune_target"],
            shard_size=recipe["shard_size"],
            device=device,
        )
        source = rebuilder.path(candidate)
        with atomic_dir(target, flush_while_writing=True) as staged:
            staged.mkdir()
            write_model(source, Path(parents[0].path), staged)
            recipe_path = write_recipe(state.members, candidate, staged)
            cls = search_class(recipe["search"])
            results = {candidate: member.test_scores} if member.test_scores else {}
            write_card(
                staged,
                name=target.resolve().name,
                parents=list(recipe["models"]),
                recipe=recipe_path.read_text(encoding="utf-8"),
                results=results,
                tasks=[task["name"] for task in recipe["tasks"]],
                evolved=candidate,
                found_by=cls.title,
                settings=candidate_settings(member, recipe["search"]),
            )
    return target
