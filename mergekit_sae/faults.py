"""Fault-injection points: named moments at which a test can make the process fail on purpose.

``point(name)`` does nothing unless the environment variable ``MERGEKIT_SAE_FAULT`` names that
point. Its value is a comma-separated list of ``name:n`` or ``name:n:action``; the n-th time
(1-based) the process reaches ``name`` it performs ``action``:

``kill`` (the default)
    sends itself SIGKILL, as ``kill -9`` of the driver would: no cleanup runs.
``int``
    sends itself SIGINT, as Ctrl-C would (Python raises KeyboardInterrupt).
``enospc``
    raises ``OSError(ENOSPC)``, as a write on a full disk would.

The variable is read once, at the first call, so an unset variable costs one dict lookup per
point. The points, in the order a run reaches them:

``merge.tensor``          streaming merge, after each merged tensor is handed to the writer
``merge.finalize``        streaming merge, every tensor given, before the writer's finalize
``atomic.file``           ``atomic.write_file``: temporary written and flushed, not renamed
``atomic.dir.staged``     ``atomic_dir``: staged folder complete, nothing swapped yet
``atomic.dir.swap``       ``publish_dir``: old folder renamed away, new one not renamed in
``atomic.files.staged``   ``replace_files``: files staged, journal (commit point) not written
``atomic.files.rename``   ``replace_files``: journal written, before each staged file's rename
``checkpoint.history``    ``save_state``: state.json replaced, history.jsonl not yet
``checkpoint.saved``      ``save_state``: state and history written, stale members not removed
``score``                 ``StepDriver._score``: before a candidate is scored
``evaluator.task``        ``ResidentEvaluator.score_items``: before each task is scored
``finish.report``         the final stage: before the test-split report
``finish.model``          before the best model's files replace those in OUT/
``finish.recipe``         before the reproducing MergeKit recipe is written
``finish.plots``          before the plots are written
``finish.card``           before the model card is written
``finish.state``          before the finished state is saved
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "MERGEKIT_SAE_FAULT"
ACTIONS = ("kill", "int", "enospc")
POINTS = (
    "merge.tensor",
    "merge.finalize",
    "atomic.file",
    "atomic.dir.staged",
    "atomic.dir.swap",
    "atomic.files.staged",
    "atomic.files.rename",
    "checkpoint.history",
    "checkpoint.saved",
    "score",
    "evaluator.task",
    "finish.report",
    "finish.model",
    "finish.recipe",
    "finish.plots",
    "finish.card",
    "finish.state",
)

_plan: dict[str, tuple[int, str]] | None = None
_counts: dict[str, int] = {}


def parse(value: str) -> dict[str, tuple[int, str]]:
    """``name:n[:action],...`` as {name: (n, action)}; ValueError naming a bad entry."""
    plan = {}
    for entry in filter(None, (part.strip() for part in value.split(","))):
        name, _, rest = entry.partition(":")
        count, _, action = rest.partition(":")
        action = action or "kill"
        if name not in POINTS or not count.isdigit() or int(count) < 1 or action not in ACTIONS:
            raise ValueError(
                f"{ENV}: bad entry {entry!r}; expected NAME:N[:ACTION] with NAME one of "
                f"{', '.join(POINTS)}, N >= 1 and ACTION one of {', '.join(ACTIONS)}"
            )
        plan[name] = (int(count), action)
    return plan


def reset() -> None:
    """Forget the counts and read the environment variable again at the next point."""
    global _plan
    _plan = None
    _counts.clear()


def point(name: str) -> None:
    """Count one arrival at ``name``; perform the planned fault on the planned arrival."""
    global _plan
    if _plan is None:
        _plan = parse(os.environ.get(ENV, ""))
    if not _plan or name not in _plan:
        return
    _counts[name] = _counts.get(name, 0) + 1
    count, action = _plan[name]
    if _counts[name] != count:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "int":
        os.kill(os.getpid(), signal.SIGINT)
    else:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(fault point {name})")
