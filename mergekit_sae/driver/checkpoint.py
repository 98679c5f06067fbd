"""The run's checkpoint: one JSON state file, replaced atomically after every step.

Layout of a run folder OUT/::

    OUT/.work/state.json               the checkpoint (RunState)
    OUT/.work/state.prev.json          the checkpoint before it (the fallback of a resume)
    OUT/.work/population/<member id>/  weights of the living generated members
    OUT/history.jsonl                  one StepRecord per line, rewritten with the state

Member directories are written (and renamed into place) before the state that references
them; the state is written to a temporary file in the same folder, flushed, then renamed over
the previous one, so a crash at any point leaves the previous checkpoint valid. Directories no
state references (offspring of an interrupted step, replaced members) are removed only after
the new state is in place.

Each generated member's files are checksummed (sha256) at the first checkpoint that names it;
the checkpoint before the current one is kept as ``state.prev.json`` together with its
members' folders. A resume verifies the members of the current checkpoint and, when a file is
missing or differs from its checksum, falls back to the previous checkpoint if its members
verify (the step in between is redone; it repeats exactly, see ``loop``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mergekit_sae import faults
from mergekit_sae.atomic import clean_leftovers, current_umask, write_text  # noqa: F401
from mergekit_sae.errors import MergeInputError
from mergekit_sae.records import Member, StepRecord, TestResult, member_dir
from mergekit_sae.weight_files import check_model_files

STATE_VERSION = 1
WORK_DIR = ".work"
STATE_FILE = "state.json"
PREV_STATE_FILE = "state.prev.json"
POPULATION_DIR = "population"
HISTORY_FILE = "history.jsonl"


class RunState(BaseModel):
    """Everything a stopped run needs to continue exactly where it stopped.

    ``recipe`` is the recipe as the run started it (a resume refuses a recipe that differs in
    anything but ``steps``); ``step`` is the last completed step (0: initial population made);
    ``evaluations`` the fitness evaluations used so far; ``search`` the search's own state;
    ``population`` lists the living member ids in archive order; ``members`` holds every member
    ever made (the lineage); ``next_member`` numbers the next member; ``best`` is the member
    written out and ``results`` the final test-split report (both set by the finishing stage);
    ``seconds`` times the stages outside the steps (``initial``, ``test``, ``write``);
    ``checksums`` the sha256 of each file of each living generated member (member id ->
    file name -> digest); ``wandb_run_id`` the Weights & Biases run a tracked run logs to (a
    resume continues that run). All randomness of step t derives from (seed, t), so no
    generator state needs saving.
    """

    version: int = STATE_VERSION
    recipe: dict[str, Any]
    step: int = 0
    evaluations: int = 0
    search: dict[str, Any] = Field(default_factory=dict)
    next_member: int = 0
    population: list[str] = Field(default_factory=list)
    members: dict[str, Member] = Field(default_factory=dict)
    history: list[StepRecord] = Field(default_factory=list)
    best: str | None = None
    results: list[TestResult] = Field(default_factory=list)
    seconds: dict[str, float] = Field(default_factory=dict)
    finished: bool = False
    checksums: dict[str, dict[str, str]] = Field(default_factory=dict)
    wandb_run_id: str | None = None


def work_dir(out: Path) -> Path:
    """The hidden folder of a run that holds its checkpoint and population."""
    return out / WORK_DIR


def population_dir(out: Path) -> Path:
    """Where generated members' weights live."""
    return work_dir(out) / POPULATION_DIR


def state_path(out: Path) -> Path:
    """The checkpoint file of a run."""
    return work_dir(out) / STATE_FILE


def prev_state_path(out: Path) -> Path:
    """The checkpoint before the current one."""
    return work_dir(out) / PREV_STATE_FILE


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file beside ``path``, flush it, and rename it over ``path``."""
    write_text(path, text)


def history_lines(state: RunState) -> str:
    """The history as JSON lines, one step per line."""
    return "".join(record.model_dump_json() + "\n" for record in state.history)


def save_state(out: Path, state: RunState, *, keep_members: bool = True) -> None:
    """Write the checkpoint (then history.jsonl) atomically, then drop unreferenced members.

    Once the run is finished, the living members' weights go too unless ``keep_members``.
    The checkpoint it replaces is kept as ``state.prev.json`` (its members stay too).
    """
    record_checksums(out, state)
    current = state_path(out)
    if current.is_file():
        write_atomic(prev_state_path(out), current.read_text(encoding="utf-8"))
    write_atomic(current, state.model_dump_json(indent=1))
    faults.point("checkpoint.history")
    write_atomic(out / HISTORY_FILE, history_lines(state))
    faults.point("checkpoint.saved")
    remove_stale_members(out, state, keep_members=keep_members)


def load_state(out: Path, path: Path | None = None) -> RunState | None:
    """The run's checkpoint (or the one at ``path``), or None when the folder holds none."""
    path = path or state_path(out)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("version") != STATE_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {data.get('version')} is not {STATE_VERSION}; "
            "start a fresh run with --force"
        )
    return RunState.model_validate(data)


def remove_temporaries(out: Path) -> None:
    """Finish or undo interrupted atomic writes and delete the temporaries they left behind."""
    for folder in (out, work_dir(out), population_dir(out)):
        clean_leftovers(folder)


def remove_stale_members(out: Path, state: RunState, *, keep_members: bool = True) -> None:
    """Delete member directories (and temporary ones) that the state does not reference."""
    folder = population_dir(out)
    if not folder.is_dir():
        return
    living = set(state.population) if keep_members or not state.finished else set()
    if not state.finished:
        living |= previous_population(out)
    for child in folder.iterdir():
        if child.name not in living:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()


def previous_population(out: Path) -> set[str]:
    """Member ids the previous checkpoint keeps alive (empty when there is none or it is bad)."""
    try:
        data = json.loads(prev_state_path(out).read_text(encoding="utf-8"))
        return {str(identifier) for identifier in data.get("population", [])}
    except (OSError, ValueError, AttributeError):
        return set()


def is_generated(member: Member) -> bool:
    """Whether a member's weights live in the run's population store (not a recipe model)."""
    return not Path(member.path).is_absolute() and member.origin not in ("parent", "base")


def file_digest(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def member_checksums(folder: Path) -> dict[str, str]:
    """The sha256 of every file of a member folder, by file name."""
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def record_checksums(out: Path, state: RunState) -> None:
    """Checksum the living generated members not yet checksummed; forget the dead ones."""
    living = {i for i in state.population if i in state.members}
    sums = {i: state.checksums[i] for i in living if i in state.checksums}
    for identifier in sorted(living - set(sums)):
        member = state.members[identifier]
        folder = member_dir(member, out)
        if is_generated(member) and folder.is_dir():
            sums[identifier] = member_checksums(folder)
    state.checksums = sums


def member_problem(out: Path, state: RunState, identifier: str) -> str | None:
    """What is wrong with a living member's files (None when they verify)."""
    member = state.members[identifier]
    folder = member_dir(member, out)
    expected = state.checksums.get(identifier)
    if expected is None:
        if not is_generated(member):
            return None
        try:
            check_model_files(folder)  # a checkpoint without checksums: headers only
        except MergeInputError as error:
            return str(error)
        return None
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if file_digest(path) != digest:
            return f"{path}: content differs from its checksum in the checkpoint (corrupt)"
    return None


def state_problem(out: Path, state: RunState) -> str | None:
    """The first problem of a checkpoint's living members' files, or None."""
    for identifier in state.population:
        if identifier in state.members:
            problem = member_problem(out, state, identifier)
            if problem is not None:
                return problem
    return None


def verified_state(out: Path, state: RunState) -> RunState:
    """``state`` when its members' files verify, else the previous checkpoint when its do.

    A fallback is made the current checkpoint on disk (state and history) and logged.
    Raises MergeInputError naming the file when neither checkpoint verifies.
    """
    if state.finished:
        return state
    problem = state_problem(out, state)
    if problem is None:
        return state
    previous = load_state(out, prev_state_path(out))
    if previous is not None and state_problem(out, previous) is None:
        logging.getLogger(__name__).warning(
            "%s; resuming from the checkpoint of step %d instead of step %d",
            problem,
            previous.step,
            state.step,
        )
        write_atomic(state_path(out), previous.model_dump_json(indent=1))
        write_atomic(out / HISTORY_FILE, history_lines(previous))
        return previous
    raise MergeInputError(
        f"{problem}; no earlier checkpoint in {work_dir(out)} has intact files, so the run "
        "cannot resume: start it over with --force",
        file=problem.split(": ")[0],
    )
