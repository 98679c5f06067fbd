"""The one way this package writes outputs: complete, or not at all.

Policy for an existing target: it is **replaced whole**; new files are never merged into an old
folder, so no stale shard of a previous model survives. Every writer (stream merges, MergeKit
runs through the run guard, recipe replays, the testbed, checkpoints, history, plots, cards and
the final model files of an evolve run) goes through one of three functions:

``write_file`` / ``write_text`` (one file)
    The content goes to ``.NAME.<token>.incomplete`` in the same folder, is flushed to disk,
    then renamed over NAME (``os.replace``, atomic on POSIX) and the folder entry is flushed.
    A crash leaves NAME old or new, plus at most a leftover temporary.

``atomic_dir`` / ``publish_dir`` (one folder)
    The folder is written inside a temporary sibling ``.NAME.<token>.incomplete/NAME`` (so its
    base name, which MergeKit puts on the model card, is the target's), flushed (with
    ``atomic_dir(..., flush_while_writing=True)``, as the model writers call it, a background
    thread flushes the files while they are written, so the disk works during the writing and
    the last flush waits only for the rest), then swapped:
    (1) an existing NAME is renamed to ``.NAME.<token>.old``, (2) the new one is renamed to NAME,
    (3) the old one is deleted. A crash before (1) leaves the old folder in place; between (1)
    and (2) the old folder is complete under its ``.old`` name and NAME is briefly absent;
    after (2) NAME is the new folder. The next write of NAME (or ``recover_dir``) cleans up:
    it puts a lone ``.old`` back when NAME is absent and deletes every other leftover.

``replace_files`` (a set of files inside a folder that holds other things, like OUT/)
    The new files are copied into ``.files.incomplete/`` inside the folder and flushed; then a
    journal (``.files.journal``, written with ``write_text``) records which names come in and
    which old names go; that write is the commit point. The files are then renamed into place
    one by one and the old names not in the new set are deleted. Each file is always whole,
    but a crash after the commit point can leave a mix of old and new files until the next
    ``replace_files`` or ``recover_files`` on that folder, which finishes the journal (rolls
    forward); a crash before it leaves the old set untouched and the staging is deleted.

Leftovers are recognised by name (``is_leftover``); ``clean_leftovers`` tidies a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from mergekit_sae import faults
from mergekit_sae.errors import OutOfSpaceError, OutputMissingError, is_out_of_space

INCOMPLETE = ".incomplete"
OLD = ".old"
FILES_STAGING = ".files.incomplete"
FILES_JOURNAL = ".files.journal"
# names written by earlier versions of this package's writers
_LEGACY_PREFIXES = (".tmp-",)
_LEGACY_SUFFIXES = (".tmp", ".partial")


def is_leftover(name: str) -> bool:
    """Whether a file or folder name is a temporary that an interrupted write left behind."""
    if not name.startswith("."):
        return False
    return name.endswith((INCOMPLETE, OLD, *_LEGACY_SUFFIXES)) or name.startswith(_LEGACY_PREFIXES)


def _remove(path: Path) -> None:
    """Delete a file, link or folder, whichever it is; nothing when it is gone already."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush one file's or folder's contents and metadata to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(path: Path) -> None:
    """Flush every file and folder below ``path`` (and ``path`` itself) to disk."""
    path = Path(path)
    if path.is_dir():
        for child in path.iterdir():
            if not child.is_symlink():
                fsync_tree(child)
    fsync_path(path)


fsync_dir = fsync_tree  # the name the evolve modules used


class BackgroundFlush:
    """Flush the files below a folder to disk over and over while they are being written.

    A merge writes gigabytes that a final ``fsync_tree`` would otherwise wait for after the
    last byte; flushed as they come, the disk writes while the merge computes. The final
    flush still runs, so nothing is less durable. An error of a background flush is kept and
    raised by :meth:`check`: once reported to this thread, a later ``fsync`` may not report it
    again.
    """

    def __init__(self, folder: Path, interval: float = 0.05) -> None:
        self.folder = folder
        self.interval = interval
        self.error: OSError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mergekit-sae-flush", daemon=True)

    def __enter__(self) -> BackgroundFlush:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for path in _files_below(self.folder):
                try:
                    fsync_path(path)
                except FileNotFoundError:
                    continue  # renamed or deleted since it was listed
                except OSError as error:
                    self.error = error
                    return

    def check(self) -> None:
        """Raise the error a background flush met, if any."""
        if self.error is not None:
            raise self.error


def _files_below(folder: Path) -> list[Path]:
    """The regular files below ``folder`` now (none when it is gone)."""
    try:
        return [path for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]
    except OSError:
        return []


def _sibling(target: Path, suffix: str) -> Path:
    """A fresh hidden name beside ``target``: ``.NAME.<token><suffix>``."""
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{suffix}")


def _leftovers_of(target: Path, suffix: str) -> list[Path]:
    """Hidden siblings of ``target`` made by ``_sibling`` with ``suffix``, oldest first."""
    if not target.parent.is_dir():
        return []
    found = target.parent.glob(f".{target.name}.*{suffix}")
    length = len(target.name) + 10 + len(suffix)  # "." NAME "." 8 hex digits SUFFIX
    return sorted((p for p in found if len(p.name) == length), key=lambda p: p.lstat().st_mtime)


def _check_space(error: BaseException, target: Path) -> None:
    """Raise OutOfSpaceError naming ``target`` when ``error`` reports a full disk."""
    if is_out_of_space(error):
        raise OutOfSpaceError(
            f"no space left on device while writing {target}", file=target
        ) from error


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Have ``write(tmp)`` fill a temporary beside ``path``, flush it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, INCOMPLETE)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode from the umask
    try:
        write(tmp)
        fsync_path(tmp)
        faults.point("atomic.file")
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _check_space(error, path)
        raise
    fsync_path(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically (see ``write_file``)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def recover_dir(target: str | os.PathLike) -> None:
    """Undo what an interrupted folder swap left: put a lone old folder back, delete the rest."""
    target = Path(target)
    olds = _leftovers_of(target, OLD)
    if olds and not os.path.lexists(target):
        os.replace(olds.pop(), target)
    for leftover in olds + _leftovers_of(target, INCOMPLETE):
        _remove(leftover)


def publish_dir(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Swap a complete folder into place: old renamed away, new renamed in, old deleted."""
    staged, target = Path(staged), Path(target)
    fsync_tree(staged)
    old = None
    if os.path.lexists(target):
        old = _sibling(target, OLD)
        os.replace(target, old)
    faults.point("atomic.dir.swap")
    os.replace(staged, target)
    fsync_path(target.parent)
    if old is not None:
        _remove(old)


def _first_missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet, if any."""
    missing = None
    while not path.exists():
        missing, parent = path, path.parent
        if parent == path:
            break
        path = parent
    return missing


def _describe_contents(folder: Path) -> str:
    """What a staging folder holds, for an error message."""
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(names) if names else "nothing"


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, flush_while_writing: bool = False) -> Iterator[Path]:
    """Yield a path named like ``target`` inside a temporary sibling; publish it on success.

    When the body raises, ``target`` is untouched and no folder created for it stays behind.
    When the body returns without having created the yielded folder, OutputMissingError.
    ``flush_while_writing``: flush the staged files from a background thread while the body
    writes them (:class:`BackgroundFlush`), for bodies that write gigabytes (a merged model).
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output path {target} exists and is not a directory")
    created = _first_missing_ancestor(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    staging = _sibling(target, INCOMPLETE)
    staging.mkdir()
    staged = staging / target.name
    try:
        if flush_while_writing:
            with BackgroundFlush(staging) as flush:
                yield staged
            flush.check()
        else:
            yield staged
        if not staged.is_dir():
            raise OutputMissingError(
                f"no output folder was written at {staged} (the staging folder holds "
                f"{_describe_contents(staging)}); {target} was left as it was",
                file=target,
            )
        faults.point("atomic.dir.staged")
        publish_dir(staged, target)
    except BaseException as error:
        _remove(created if created is not None else staging)
        _check_space(error, target)
        raise
    _remove(staging)


def recover_files(folder: str | os.PathLike) -> None:
    """Finish an interrupted ``replace_files`` in ``folder`` (journal present) or discard it."""
    folder = Path(folder)
    journal = folder / FILES_JOURNAL
    staging = folder / FILES_STAGING
    if journal.is_file():
        _roll_forward(folder, json.loads(journal.read_text(encoding="utf-8")))
    for leftover in [staging, *_leftovers_of(journal, INCOMPLETE)]:
        _remove(leftover)


def _roll_forward(folder: Path, plan: dict[str, list[str]]) -> None:
    """Rename the journal's staged files into ``folder``, delete its old names, drop it."""
    staging = folder / FILES_STAGING
    for name in plan["files"]:
        if (staging / name).exists():
            faults.point("atomic.files.rename")
            os.replace(staging / name, folder / name)
    for name in plan["remove"]:
        (folder / name).unlink(missing_ok=True)
    fsync_path(folder)
    (folder / FILES_JOURNAL).unlink(missing_ok=True)
    fsync_path(folder)


def replace_files(
    folder: str | os.PathLike, sources: Sequence[Path], *, remove: Iterable[str] = ()
) -> list[Path]:
    """Copy ``sources`` into ``folder`` as one set; delete the old ``remove`` names not in it.

    Guarantees (see the module docstring): every file is whole at every moment; the set is
    old or new once the next call (or ``recover_files``) has run after a crash.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover_files(folder)
    staging = folder / FILES_STAGING
    staging.mkdir()
    names = [Path(source).name for source in sources]
    for source, name in zip(sources, names, strict=True):
        try:
            shutil.copyfile(source, staging / name)
        except OSError as error:
            _remove(staging)
            _check_space(error, folder / name)
            raise
        os.chmod(staging / name, 0o666 & ~current_umask())
    fsync_tree(staging)
    faults.point("atomic.files.staged")
    stale = sorted(set(remove) - set(names))
    write_text(folder / FILES_JOURNAL, json.dumps({"files": names, "remove": stale}))
    _roll_forward(folder, {"files": names, "remove": stale})
    _remove(staging)
    return [folder / name for name in names]


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean_leftovers(folder: str | os.PathLike) -> None:
    """Recover interrupted swaps in ``folder`` and delete every temporary left in it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    recover_files(folder)
    for child in list(folder.iterdir()):
        if child.name.endswith(OLD) and is_leftover(child.name):
            recover_dir(folder / child.name[1:].rsplit(".", 2)[0])
    for child in list(folder.iterdir()):
        if is_leftover(child.name):
            _remove(child)
