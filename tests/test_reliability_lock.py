"""One process per output folder: a second run refuses at once; a killed run's lock is taken."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from evolve_fixtures import FakeEvaluator, tiny_llama
from evolve_fixtures import run_fake as evolve

from mergekit_sae.cli import main
from mergekit_sae.compare.run import Comparison, compare
from mergekit_sae.driver.checkpoint import load_state
from mergekit_sae.driver.lock import LOCK_FILE, lock_path, read_holder
from mergekit_sae.errors import OutputFolderError

pytestmark = pytest.mark.usefixtures("one_thread")

# A process that takes a folder's lock, says so, and holds it until its stdin closes.
HOLDER = (
    "import sys; from pathlib import Path; from mergekit_sae.driver.lock import lock_folder\n"
    "with lock_folder(Path(sys.argv[1])):\n"
    "    print('held', flush=True); sys.stdin.read()\n"
)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    models = [tiny_llama(root / name, seed) for seed, name in enumerate("ab")]
    data = {
        "models": [str(m) for m in models],
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 8} for name in "ab"],
        "steps": 2,
        "sae": {"archive_size": 4, "children_per_step": 2},
        "dtype": "float32",
        "device": "cpu",
    }
    return data


def hold(out: Path) -> subprocess.Popen:
    """Start a process holding ``out``'s lock; return once it holds it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"
    return process


def release(process: subprocess.Popen) -> None:
    process.stdin.close()
    assert process.wait(timeout=60) == 0


def test_second_run_refuses_naming_the_holder(tmp_path: Path, recipe) -> None:
    out = tmp_path / "OUT"
    holder = hold(out)
    try:
        payload = read_holder(out)
        assert payload["pid"] == holder.pid and payload["host"] == socket.gethostname()
        for options in ({}, {"resume": True}, {"force": True}):
            with pytest.raises(OutputFolderError) as caught:
                evolve(recipe, out, **options)
            message = str(caught.value)
            assert str(out) in message and f"pid {holder.pid}" in message
            assert socket.gethostname() in message and str(payload["started"]) in message
            assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing touched
        recipe_file = tmp_path / "recipe.yml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(main, ["evolve", str(recipe_file), str(out), "--quiet"])
        assert result.exit_code == 1
        assert result.output.startswith("error: ") and f"pid {holder.pid}" in result.output
        assert "Traceback" not in result.output
    finally:
        release(holder)
    state = evolve(recipe, out)  # free again: the run goes ahead
    assert state.finished and not lock_path(out).exists()


def test_lock_of_a_killed_run_is_taken_over(tmp_path: Path, recipe, caplog) -> None:
    out = tmp_path / "OUT"
    holder = hold(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    assert read_holder(out)["pid"] == holder.pid  # the dead run's file is still there
    seen = []
    state = evolve(recipe, out, stop_after=1, on_checkpoint=lambda s: seen.append(read_holder(out)))
    assert state.step == 1
    assert f"taking over the lock of a run that ended without releasing it (pid {holder.pid}" in (
        caplog.text
    )
    assert seen and all(p["pid"] == os.getpid() for p in seen)
    assert not lock_path(out).exists()
    resumed = evolve(recipe, out, resume=True)  # --resume takes the lock like a fresh run
    assert resumed.finished and load_state(out).finished


def test_refused_start_leaves_no_folder_and_payload_is_json(tmp_path: Path, recipe) -> None:
    out = tmp_path / "new" / "OUT"
    bad = {**recipe, "models": [str(tmp_path / "missing"), recipe["models"][1]]}
    with pytest.raises(Exception, match="does not exist"):
        evolve(bad, out)
    assert not out.exists()  # the folder the lock made is gone again
    holder = hold(out)
    try:
        data = json.loads(lock_path(out).read_text())
        assert set(data) == {"pid", "host", "started", "command"}
    finally:
        release(holder)


def test_compare_locks_its_folder(tmp_path: Path, recipe) -> None:
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "CMP"
    holder = hold(out)
    try:
        comparison = Comparison(recipe=recipe_file, methods=["linear"], seeds=1, budget=2)
        with pytest.raises(OutputFolderError, match=f"comparison .*pid {holder.pid}"):
            compare(comparison, out, progress=False, make_evaluator=lambda r, i: FakeEvaluator())
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
        run_folder = tmp_path / "CMP2" / "linear" / "seed0"
        inner = hold(run_folder)  # a run folder held by another process stops the comparison
        try:
            with pytest.raises(OutputFolderError, match=f"pid {inner.pid}"):
                compare(
                    comparison,
                    tmp_path / "CMP2",
                    resume=True,
                    progress=False,
                    make_evaluator=lambda r, i: FakeEvaluator(),
                )
        finally:
            release(inner)
    finally:
        release(holder)
