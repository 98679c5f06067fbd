"""Rebuild any recorded candidate of a run from its lineage; ``mergekit-sae export``.

A member's weights stay on disk only while it lives in the population. Any other member is
rebuilt by replaying the merges of its lineage (:func:`population.lineage`, ancestors first)
with :func:`merging.stream_merge`, the function that made it during the run: the same
registered MergeKit methods, inputs and parameters give the same bits (on the same kind of
device as the run: CPU merges are rebuilt on the CPU). Every rebuilt member's zero fraction is
checked against the recorded one, so a changed input model is an error, not a silent
difference.

``mergekit-sae export OUT CANDIDATE MODEL_DIR`` writes one candidate as a complete model
folder: weights, configuration, the first parent's tokenizer, its own ``mergekit_config.yml``
(its lineage as MergeKit stages) and a model card.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import click

from mergekit_sae.errors import MergeInputError, OutputFolderError, UsageError
from mergekit_sae.merging.stream import (
    DEFAULT_SHARD_SIZE,
    stage_inputs,
    stats_reference,
    stream_merge,
)
from mergekit_sae.records import Member, lineage, member_dir
from mergekit_sae.sparsity import sparsity_from_stats


class Rebuilder:
    """Weights of recorded members: the member's folder when on disk, else rebuilt into ``cache``.

    ``base`` is the base model folder given to merges that name a ``base_model``;
    ``stats_base`` the folder zero fractions are measured against (the base when the run
    pruned the task vectors, else None), as in the run.
    """

    def __init__(
        self,
        members: Mapping[str, Member],
        out: Path,
        cache: Path,
        *,
        base: Path | None,
        stats_base: Path | None,
        device: str = "cpu",
        shard_size: int = DEFAULT_SHARD_SIZE,
    ):
        self.members = members
        self.out = out
        self.cache = cache
        self.base = base
        self.stats_base = stats_base
        self.device = device
        self.shard_size = shard_size
        self.rebuilt: list[str] = []

    def on_disk(self, member: Member) -> Path | None:
        """The member's own folder or an earlier rebuild of it, when present."""
        for folder in (member_dir(member, self.out), self.cache / member.id):
            if (folder / "config.json").is_file():
                return folder
        return None

    def path(self, identifier: str) -> Path:
        """A folder holding the member's weights, rebuilding missing ancestors first."""
        if identifier not in self.members:
            raise UsageError(f"no recorded candidate {identifier!r}")
        for ancestor in lineage(self.members, identifier):
            if self.on_disk(ancestor) is None:
                self.build(ancestor)
        folder = self.on_disk(self.members[identifier])
        assert folder is not None
        return folder

    def build(self, member: Member) -> Path:
        """Replay the merge that made ``member`` (its inputs are on disk) into the cache."""
        if member.merge is None:
            raise MergeInputError(f"{member.id}: original model {member.path} is missing")
        record = member.merge
        inputs, base = stage_inputs(
            record,
            lambda i: self.on_disk(self.members[i]),  # type: ignore[arg-type,return-value]
            self.base,
        )
        target = self.cache / member.id
        outcome = stream_merge(
            record,
            inputs,
            base,
            target,
            device=self.device,
            shard_size=self.shard_size,
            stats_base=self.stats_base,
        )
        zeros = sparsity_from_stats(outcome.stats, "zero_count")
        if zeros != member.zero_fraction:
            shutil.rmtree(target, ignore_errors=True)
            raise MergeInputError(
                f"{member.id}: the rebuilt weights have a zero fraction of {zeros!r}, the "
                f"recorded member {member.zero_fraction!r}: an input model changed since the "
                "run, or the rebuild runs on another kind of device"
            )
        self.rebuilt.append(member.id)
        return target


def run_rebuilder(
    members: Mapping[str, Member],
    out: Path,
    cache: Path,
    *,
    prune_target: str,
    shard_size: int,
    device: str,
) -> Rebuilder:
    """A rebuilder for a run's members, with the run's base, shard size and pruning target."""
    base_member = next((m for m in members.values() if m.origin == "base"), None)
    base = Path(base_member.path) if base_member is not None else None
    return Rebuilder(
        members,
        out,
        cache,
        base=base,
        stats_base=stats_reference(prune_target, base),
        device=device,
        shard_size=shard_size,
    )


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
    from mergekit_sae.atomic import atomic_dir
    from mergekit_sae.driver.checkpoint import load_state, state_path
    from mergekit_sae.evaluate import resolve_device
    from mergekit_sae.merging.recipes import write_recipe
    from mergekit_sae.outputs.card import write_card
    from mergekit_sae.outputs.finish import write_model
    from mergekit_sae.search import search_class

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
        with atomic_dir(target) as staged:
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


@click.command(name="export")
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("candidate")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default=None, help="Merge device (default: the run's recipe device).")
@click.option("--force", is_flag=True, help="Replace MODEL_DIR when it is not empty.")
def export_command(
    out: Path, candidate: str, model_dir: Path, device: str | None, force: bool
) -> None:
    """Rebuild candidate CANDIDATE (a member id, e.g. m0012) of the run in OUT into MODEL_DIR."""
    if model_dir.exists() and any(model_dir.iterdir()) and not force:
        raise UsageError(f"{model_dir} is not empty; pass --force to replace it")
    export(out, candidate, model_dir, device=device)
    click.echo(f"wrote {model_dir}")
