"""Rebuild any recorded member of a run from its lineage.

A member's weights stay on disk only while it lives in the population. Any other member is
rebuilt by replaying the merges of its lineage (:func:`~mergekit_sae.records.lineage`,
ancestors first) with :func:`~mergekit_sae.merging.stream.stream_merge`, the function that made
it during the run: the same registered MergeKit methods, inputs and parameters give the same
bits (on the same kind of device as the run: CPU merges are rebuilt on the CPU). Every rebuilt
member's zero fraction is checked against the recorded one, so a changed input model is an
error, not a silent difference.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from mergekit_sae.errors import MergeInputError, UsageError
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
