"""`mergekit_sae.atomic`: a crash at any step of a swap leaves the old or the new output whole."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from mergekit_sae import atomic
from mergekit_sae.errors import OutOfSpaceError, OutputMissingError


class Crash(Exception):
    """The simulated crash."""


def crash_on_call(monkeypatch, function_name: str, k: int, module=os) -> None:
    """Make the k-th call (1-based) of ``module.function_name`` raise Crash."""
    real = getattr(module, function_name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise Crash(f"{function_name} call {k}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, function_name, flaky)


def make_model(folder: Path, label: str, shards: int) -> None:
    """A folder of `shards` fake shard files, each holding `label`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        (folder / f"shard-{i}.bin").write_text(label)


def contents(folder: Path) -> dict[str, str]:
    """File name -> text of every file directly in a folder."""
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file()}


def write_model(target: Path, label: str, shards: int) -> None:
    with atomic.atomic_dir(target) as staged:
        make_model(staged, label, shards)


def test_write_text_replaces_and_a_crash_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic.write_text(path, "old")
    crash_on_call(monkeypatch, "replace", 1)
    with pytest.raises(Crash):
        atomic.write_text(path, "new")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["state.json"] and path.read_text() == "old"
    atomic.write_text(path, "new")
    assert os.listdir(tmp_path) == ["state.json"] and path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o666 & ~atomic.current_umask()


def test_an_existing_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "merged"
    write_model(target, "old", shards=3)
    write_model(target, "new", shards=1)
    assert contents(target) == {"shard-0.bin": "new"}  # no stale shard-1, shard-2
    assert os.listdir(tmp_path) == ["merged"]


OLD = {f"shard-{i}.bin": "old" for i in range(3)}
NEW = {"shard-0.bin": "new"}


@pytest.mark.parametrize("step", [1, 2, 3])
def test_crash_at_each_step_of_the_swap_leaves_old_or_new_whole(tmp_path, monkeypatch, step):
    target = tmp_path / "merged"
    write_model(target, "old", shards=3)
    if step == 3:  # deleting the old folder, after the new one is in place
        crash_on_call(monkeypatch, "_remove", 1, module=atomic)
    else:  # 1: renaming the old folder away; 2: renaming the new one into place
        crash_on_call(monkeypatch, "replace", step)
    with pytest.raises(Crash):
        write_model(target, "new", shards=1)
    monkeypatch.undo()
    if step == 1:
        assert contents(target) == OLD
    elif step == 2:  # the old folder is whole under its hidden name; recovery puts it back
        assert not target.exists()
        (old,) = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
        assert contents(old) == OLD
        atomic.recover_dir(target)
        assert contents(target) == OLD
    else:
        assert contents(target) == NEW
    write_model(target, "newer", shards=2)
    assert contents(target) == {"shard-0.bin": "newer", "shard-1.bin": "newer"}
    assert os.listdir(tmp_path) == ["merged"]  # every leftover was cleaned


def test_a_failing_body_leaves_nothing_not_even_created_parents(tmp_path):
    target = tmp_path / "a" / "b" / "merged"
    with pytest.raises(Crash), atomic.atomic_dir(target) as staged:
        make_model(staged, "x", 1)
        raise Crash()
    assert os.listdir(tmp_path) == []
    assert staged.name == "merged"  # the staged folder carries the target's name


def test_no_folder_written_raises_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "merged"
    write_model(target, "old", shards=3)
    with (
        pytest.raises(OutputMissingError, match="no output folder was written"),
        atomic.atomic_dir(target) as staged,
    ):
        make_model(staged.with_name("elsewhere"), "new", 1)
    assert contents(target) == OLD and os.listdir(tmp_path) == ["merged"]


def run_folder(tmp_path: Path) -> tuple[Path, list[Path]]:
    """An OUT/ with old model files, a checkpoint and plots; and a new model's files."""
    out = tmp_path / "out"
    (out / ".work").mkdir(parents=True)
    (out / ".work" / "state.json").write_text("{}")
    (out / "plots").mkdir()
    for name in ("model-1.safetensors", "model-2.safetensors", "config.json"):
        (out / name).write_text("old")
    new = tmp_path / "best"
    new.mkdir()
    for name in ("model.safetensors", "config.json"):
        (new / name).write_text("new")
    return out, sorted(new.iterdir())


OLD_SET = ["model-1.safetensors", "model-2.safetensors", "config.json"]
NEW_FILES = {"config.json": "new", "model.safetensors": "new"}


def test_replace_files_swaps_the_set_and_keeps_the_rest(tmp_path):
    out, sources = run_folder(tmp_path)
    written = atomic.replace_files(out, sources, remove=OLD_SET)
    assert [p.name for p in written] == ["config.json", "model.safetensors"]
    assert contents(out) == NEW_FILES
    assert sorted(os.listdir(out)) == [".work", "config.json", "model.safetensors", "plots"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_replace_files_crash_at_each_rename_recovers_to_old_or_new(tmp_path, monkeypatch, k):
    out, sources = run_folder(tmp_path)
    crash_on_call(monkeypatch, "replace", k)  # 1: the journal (commit point); 2, 3: the files
    with pytest.raises(Crash):
        atomic.replace_files(out, sources, remove=OLD_SET)
    monkeypatch.undo()
    atomic.recover_files(out)
    expected = {name: "old" for name in OLD_SET} if k == 1 else NEW_FILES
    assert contents(out) == expected
    assert sorted(os.listdir(out)) == sorted([".work", "plots", *expected])


def test_replace_files_crash_while_copying_keeps_the_old_set(tmp_path, monkeypatch):
    out, sources = run_folder(tmp_path)
    crash_on_call(monkeypatch, "copyfile", 2, module=atomic.shutil)
    with pytest.raises(Crash):
        atomic.replace_files(out, sources, remove=OLD_SET)
    monkeypatch.undo()
    atomic.replace_files(out, sources, remove=OLD_SET)  # the next write cleans up first
    assert contents(out) == NEW_FILES
    assert sorted(os.listdir(out)) == [".work", "config.json", "model.safetensors", "plots"]


def test_clean_leftovers_knows_every_temporary_and_nothing_else(tmp_path):
    names = [".a.0123abcd.incomplete", ".tmp-b", ".c.tmp", ".d.partial", ".files.incomplete"]
    kept = [".work", "plots", "model.safetensors", ".hidden"]
    for name in names + kept:
        (tmp_path / name).mkdir()
    (tmp_path / ".e.0123abcd.old").mkdir()  # a lone old folder of "e": put back
    atomic.clean_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "e"])


@pytest.mark.parametrize("while_writing", [True, False])
def test_atomic_dir_flushes_files_while_they_are_written(
    tmp_path, monkeypatch, while_writing
) -> None:
    """With flush_while_writing the disk works during the writing: a file of the staged folder
    is flushed before the body ends, and once more by the final flush after it; without, only
    the final flush runs."""
    flushed: list[tuple[str, bool]] = []
    body_done = {"done": False}
    real = atomic.fsync_path

    def recording(path):
        flushed.append((Path(path).name, body_done["done"]))
        real(path)

    monkeypatch.setattr(atomic, "fsync_path", recording)
    with atomic.atomic_dir(tmp_path / "out", flush_while_writing=while_writing) as staged:
        staged.mkdir()
        (staged / "model.safetensors").write_bytes(b"x" * 4096)
        for _ in range(100 if while_writing else 20):  # time for the flush thread to come round
            if ("model.safetensors", False) in flushed:
                break
            threading.Event().wait(0.01)
        body_done["done"] = True
    assert (("model.safetensors", False) in flushed) is while_writing
    assert ("model.safetensors", True) in flushed  # the final flush still runs
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"x" * 4096


@pytest.mark.parametrize(
    ("code", "raised"), [(errno.EIO, OSError), (errno.ENOSPC, OutOfSpaceError)]
)
def test_atomic_dir_raises_a_background_flush_error(tmp_path, monkeypatch, code, raised) -> None:
    """An error reported to the background flush is not lost (a later fsync of the file
    does not report it again, as on Linux): the write fails and the target is left as it was."""
    make_model(tmp_path / "out", "old", 1)
    real = atomic.fsync_path
    reported = []

    def failing_once(path):
        if Path(path).name == "model.safetensors" and ".incomplete" in str(path) and not reported:
            reported.append(path)
            raise OSError(code, os.strerror(code))
        real(path)

    monkeypatch.setattr(atomic, "fsync_path", failing_once)
    target = tmp_path / "out"
    with pytest.raises(raised), atomic.atomic_dir(target, flush_while_writing=True) as staged:
        staged.mkdir()
        (staged / "model.safetensors").write_bytes(b"new")
        threading.Event().wait(0.3)  # several rounds of the flush thread
    assert contents(tmp_path / "out") == {"shard-0.bin": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
