"""The run's checkpoint: one JSON state file, replaced atomically after every step.

Layout of a run folder OUT/::

    OUT/.work/state.json               the checkpoint (RunState)
    OUT/.work/population/<member id>/  weights of the living generated members
    OUT/history.jsonl                  one StepRecord per line, rewritten with the state

Member directories are written (and renamed into place) before the state that references
them; the state is written to a temporary file in the same folder, flushed, then renamed over
the previous one, so a crash at any point leaves the previous checkpoint valid. Directories no
state references (offspring of an interrupted step, replaced members) are removed only after
the new state is in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mergekit_sae.atomic import clean_leftovers, current_umask, write_text  # noqa: F401
from mergekit_sae.evolve.population import Member, StepRecord, TestResult

STATE_VERSION = 1
WORK_DIR = ".work"
STATE_FILE = "state.json"
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
    ``seconds`` times the stages outside the steps (``initial``, ``test``, ``write``). All
    randomness of step t derives from (seed, t), so no generator state needs saving.
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


def work_dir(out: Path) -> Path:
    """The hidden folder of a run that holds its checkpoint and population."""
    return out / WORK_DIR


def population_dir(out: Path) -> Path:
    """Where generated members' weights live."""
    return work_dir(out) / POPULATION_DIR


def state_path(out: Path) -> Path:
    """The checkpoint file of a run."""
    return work_dir(out) / STATE_FILE


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file beside ``path``, flush it, and rename it over ``path``."""
    write_text(path, text)


def history_lines(state: RunState) -> str:
    """The history as JSON lines, one step per line."""
    return "".join(record.model_dump_json() + "\n" for record in state.history)


def save_state(out: Path, state: RunState, *, keep_members: bool = True) -> None:
    """Write the checkpoint (then history.jsonl) atomically, then drop unreferenced members.

    Once the run is finished, the living members' weights go too unless ``keep_members``.
    """
    write_atomic(state_path(out), state.model_dump_json(indent=1))
    write_atomic(out / HISTORY_FILE, history_lines(state))
    remove_stale_members(out, state, keep_members=keep_members)


def load_state(out: Path) -> RunState | None:
    """The run's checkpoint, or None when the folder holds none."""
    path = state_path(out)
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
    for child in folder.iterdir():
        if child.name not in living:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
