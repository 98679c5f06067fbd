"""A full disk stops a run with one clear line; the last checkpoint stays valid; --resume ends
bit-identical once there is space again.

Two ways to fill the disk: the atomic writer patched to fail with ENOSPC on its k-th file (after
writing part of it, as a real full disk does), and a small tmpfs holding OUT/ (mounted when the
test may mount one, skipped otherwise), enlarged before the resume.
"""

from __future__ import annotations

import errno
import gc
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from evolve_fixtures import assert_identical, recipe_data, task_files, tiny_llama
from yaml import safe_dump

from mergekit_sae import atomic, cli
from mergekit_sae.driver.checkpoint import load_state
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The recipe file and an uninterrupted run of it."""
    root = tmp_path_factory.mktemp("disk")
    parents = [tiny_llama(root / "p0", 60, tied=True), tiny_llama(root / "p1", 61, tied=True)]
    data = recipe_data(
        parents,
        task_files(root / "data"),
        steps=2,
        sae={"archive_size": 3, "children_per_step": 2},
        test_baselines=[],
    )
    recipe = root / "recipe.yml"
    recipe.write_text(safe_dump(data))
    run(parse_recipe(data), root / "whole", progress=False)
    return recipe, root / "whole"


def evolve(recipe: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli.main, ["evolve", str(recipe), str(out), "-q", *extra])


def assert_resumes_identical(recipe: Path, whole: Path, out: Path) -> None:
    resumed = evolve(recipe, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_identical(whole, out)
    first, second = load_state(whole), load_state(out)
    assert second.finished and second.best == first.best
    assert [r.model_dump() for r in second.results] == [r.model_dump() for r in first.results]
    assert not [p for p in out.rglob("*") if atomic.is_leftover(p.name)]


@pytest.mark.parametrize("failing", [3, 5, 9])
def test_a_full_disk_stops_with_one_line_and_resume_continues(
    reference, tmp_path, monkeypatch, failing
) -> None:
    recipe, whole = reference
    out = tmp_path / "out"
    original = atomic.write_file
    calls: list[Path] = []

    def full_disk(path, write):
        calls.append(Path(path))
        if len(calls) != failing:
            return original(path, write)

        def half_then_fail(tmp: Path) -> None:
            tmp.write_bytes(b"{")
            raise OSError(errno.ENOSPC, "No space left on device")

        return original(path, half_then_fail)

    monkeypatch.setattr(atomic, "write_file", full_disk)
    stopped = evolve(recipe, out)
    monkeypatch.setattr(atomic, "write_file", original)
    assert len(calls) == failing  # the run stopped at the failed write
    assert stopped.exit_code == 1
    lines = stopped.output.strip().splitlines()
    assert lines == [
        f"error: no space left on device while writing {calls[-1]}; free some space; "
        "then continue with --resume"
    ]
    if calls[-1].name == "state.json":
        state = load_state(out)
        assert state is None or not state.finished  # the previous checkpoint, whole
    assert_resumes_identical(recipe, whole, out)


@pytest.fixture
def small_tmpfs(tmp_path) -> Path:
    """A 96 KiB tmpfs (skip when this process may not mount one); unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    gc.collect()  # a finished run's memory maps into the tmpfs close when their objects go
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_tmpfs_stops_the_run_and_resume_continues_once_it_grows(
    reference, small_tmpfs
) -> None:
    recipe, whole = reference
    out = small_tmpfs / "out"
    stopped = evolve(recipe, out)
    assert stopped.exit_code == 1, stopped.output
    lines = stopped.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device"), lines
    assert lines[0].endswith("free some space; then continue with --resume")
    assert "unexpected" not in lines[0]
    load_state(out)  # whatever checkpoint is there parses
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    assert_resumes_identical(recipe, whole, out)
