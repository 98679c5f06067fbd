"""A member file corrupted between stop and resume: the resume falls back a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from evolve_fixtures import assert_identical, tiny_llama
from evolve_fixtures import run_fake as evolve

from mergekit_sae.driver.checkpoint import load_state, member_checksums, prev_state_path
from mergekit_sae.errors import MergeInputError
from mergekit_sae.records import member_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    models = [tiny_llama(root / name, seed) for seed, name in enumerate("ab")]
    return {
        "models": [str(m) for m in models],
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 8} for name in "ab"],
        "steps": 4,
        # a heavy sparsity term in the selection keeps stored (pruned) members in the archive
        # from one step to the next, which the checkpoint fallback below needs
        "sae": {
            "archive_size": 4,
            "children_per_step": 2,
            "sparsity_term": {"weight": 2.0},
            "select_by_sparsity": True,
        },
        "dtype": "float32",
        "device": "cpu",
    }


def flip_a_byte(path: Path) -> None:
    """Change one byte of tensor data (the header stays valid, the checksum does not)."""
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


def stopped_run(data: dict, out: Path) -> tuple[int, str]:
    """Stop at the first step whose population holds a member the step before did not."""
    for stop in range(2, data["steps"]):
        evolve(data, out, stop_after=stop, force=out.exists())
        state, previous = load_state(out), load_state(out, prev_state_path(out))
        new = [m for m in state.population if m not in previous.population]
        new = [m for m in new if state.members[m].merge is not None]
        if new:
            return stop, new[0]
    raise AssertionError("no step replaced a member")


def test_corrupt_member_falls_back_to_the_previous_checkpoint(tmp_path: Path, data, caplog) -> None:
    reference = evolve(data, tmp_path / "REF")
    out = tmp_path / "OUT"
    stop, victim = stopped_run(data, out)
    state = load_state(out)
    folder = member_dir(state.members[victim], out)
    assert state.checksums[victim] == member_checksums(folder)  # recorded as written
    flip_a_byte(folder / "model.safetensors")
    resumed = evolve(data, out, resume=True)
    assert f"resuming from the checkpoint of step {stop - 1} instead of step {stop}" in caplog.text
    assert str(folder / "model.safetensors") in caplog.text
    assert resumed.finished and resumed.best == reference.best
    steps = [(r.population_after, r.offspring) for r in resumed.history]
    assert steps == [(r.population_after, r.offspring) for r in reference.history]
    assert_identical(out, tmp_path / "REF")


def test_no_intact_checkpoint_names_the_file(tmp_path: Path, data) -> None:
    out = tmp_path / "OUT"
    evolve(data, out, stop_after=2)
    state, previous = load_state(out), load_state(out, prev_state_path(out))
    shared = [m for m in state.population if m in previous.population and m in state.checksums]
    path = member_dir(state.members[shared[0]], out) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])  # truncated: both checkpoints hold it
    with pytest.raises(MergeInputError, match="no earlier checkpoint .* has intact files") as e:
        evolve(data, out, resume=True)
    assert str(path) in str(e.value)
