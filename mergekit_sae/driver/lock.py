"""One process at a time in an output folder: an exclusive ``flock`` on ``OUT/.lock``.

The lock is an advisory ``fcntl.flock`` taken without waiting on the file ``OUT/.lock``; the
file holds a JSON payload naming the holder (pid, host, start time, command) so that a second
run refuses at once with a message that says who holds the folder. The operating system
releases a ``flock`` when its process dies (``kill -9`` included), so a lock file left by a
killed run is stale by construction: the next run takes it over and writes its own payload.
On release the file is deleted; a run that took the lock checks that the file it locked is
still the one at ``OUT/.lock`` (and retries otherwise), so deleting it cannot let two runs in.
``flock`` works on local Linux filesystems (and on NFS, where Linux emulates it with POSIX
locks); the lock file is hidden, so it is never published and never counts as content.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from mergekit_sae.errors import OutputFolderError

LOCK_FILE = ".lock"


def lock_path(out: Path) -> Path:
    """The lock file of an output folder."""
    return Path(out) / LOCK_FILE


def holder_payload() -> dict[str, object]:
    """Who holds a lock: this process's pid, host, start time and command line."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


def describe_holder(text: str) -> str:
    """The holder named by a lock file's payload, for the refusal message."""
    try:
        data = json.loads(text)
        return f"pid {data['pid']} on host {data['host']}, started {data['started']}" + (
            f", command `{data['command']}`" if data.get("command") else ""
        )
    except (ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"


def read_holder(out: Path) -> dict[str, object] | None:
    """The payload of a folder's lock file, or None when there is none or it is unreadable."""
    try:
        data = json.loads(lock_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _try_lock(path: Path) -> int | None:
    """Open and lock ``path`` without waiting; the descriptor, or None when another holds it."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        except BaseException:
            os.close(descriptor)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return descriptor
        os.close(descriptor)  # the holder released and deleted it meanwhile: lock the new one


def _write_payload(descriptor: int) -> None:
    """Replace the lock file's content with this process's payload."""
    data = json.dumps(holder_payload()).encode()
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, data, 0)
    os.fsync(descriptor)


@contextlib.contextmanager
def lock_folder(out: Path, what: str = "run") -> Iterator[Path]:
    """Hold ``out``'s lock for the block (creating ``out``); refuse at once when it is held.

    Raises OutputFolderError naming the folder and the holder. A folder this call created
    and that is still empty at the end is removed again, so a refused or failed start leaves
    nothing behind.
    """
    out = Path(out)
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out} exists and is not a folder", file=out)
    out.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    descriptor = _try_lock(path)
    if descriptor is None:
        try:
            holder = describe_holder(path.read_text(encoding="utf-8"))
        except OSError:
            holder = "another process"
        raise OutputFolderError(
            f"{out} is in use by another {what} ({holder}); wait for it to finish, or choose "
            "another output folder",
            file=out,
        )
    try:
        stale = os.pread(descriptor, 4096, 0).decode("utf-8", "replace")
        if stale.strip():
            logging.getLogger(__name__).warning(
                "%s: taking over the lock of a run that ended without releasing it (%s)",
                out,
                describe_holder(stale),
            )
        _write_payload(descriptor)
        yield out
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()


def content(out: Path) -> list[Path]:
    """The entries of a folder other than its lock file."""
    if not out.is_dir():
        return []
    return [child for child in out.iterdir() if child.name != LOCK_FILE]


def clear_folder(out: Path) -> None:
    """Delete everything in a locked folder except its lock file (a ``--force`` start)."""
    for child in content(out):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def claim_for_fresh_run(out: Path, *, force: bool, holds_run: bool, what: str) -> None:
    """Make a locked ``out`` ready for a fresh ``what``: empty, or with ``force`` emptied when
    ``holds_run`` says it holds a previous one; any other content is refused, never deleted."""
    if not content(out):
        return
    if not force:
        raise OutputFolderError(
            f"{out} is not empty; pass --resume to continue the {what} in it, or --force to "
            "delete it and start over"
        )
    if not holds_run:
        raise OutputFolderError(
            f"{out} is not empty and holds no {what}, so --force will not delete it; "
            "choose another output folder"
        )
    clear_folder(out)
