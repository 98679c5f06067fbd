"""A stopped or killed run, resumed, ends with the same tensors as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from evolve_fixtures import (
    FakeEvaluator,
    assert_identical,
    recipe_data,
    task_files,
    tiny_llama,
)

from mergekit_sae.driver.checkpoint import load_state, state_path
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[list[Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("resume")
    parents = [tiny_llama(root / "p0", 20, tied=True), tiny_llama(root / "p1", 21, tied=True)]
    return parents, task_files(root / "data")


def fake_run(recipe, out: Path, **options):
    return run(recipe, out, progress=False, make_evaluator=lambda r, i: FakeEvaluator(), **options)


def comparable_history(state) -> list[dict]:
    return [record.model_dump(exclude={"seconds"}) for record in state.history]


def test_stopped_after_step_k_then_resumed_matches(tmp_path: Path, setup) -> None:
    parents, files = setup
    data = recipe_data(parents, files, steps=3)
    data["tasks"] = [
        {"name": "a", "type": "lm_eval", "subsample": 10},
        {"name": "b", "type": "lm_eval"},
    ]
    recipe = parse_recipe(data)
    whole = fake_run(recipe, tmp_path / "whole")
    assert whole.finished

    steps = []
    partial = fake_run(
        recipe, tmp_path / "split", stop_after=2, on_checkpoint=lambda s: steps.append(s.step)
    )
    assert partial.step == 2 and not partial.finished
    assert steps == [0, 1, 2]
    resumed = fake_run(recipe, tmp_path / "split", resume=True)
    assert resumed.finished
    assert comparable_history(resumed) == comparable_history(whole)
    assert resumed.best == whole.best
    assert_identical(tmp_path / "whole", tmp_path / "split")
    # resuming a finished run does nothing and keeps the output
    again = fake_run(recipe, tmp_path / "split", resume=True)
    assert again.finished and again.best == whole.best


def cli(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mergekit_sae.cli",
        "evolve",
        str(recipe),
        str(out),
        "--quiet",
        *extra,
    ]


def test_killed_run_resumes_to_identical_model(tmp_path: Path, setup) -> None:
    parents, files = setup
    data = recipe_data(
        parents, files, steps=3, sae={"archive_size": 3, "children_per_step": 2}, test_baselines=[]
    )
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run(parse_recipe(data), tmp_path / "whole", progress=False)  # uninterrupted, in this process

    out = tmp_path / "killed"
    process = subprocess.Popen(cli(recipe, out), env=env)
    deadline = time.monotonic() + 240
    step = None
    while time.monotonic() < deadline and process.poll() is None:
        if state_path(out).is_file():
            step = load_state(out).step
            if step >= 1:
                break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped = load_state(out)
    assert stopped is not None and not stopped.finished and 1 <= stopped.step < 3

    subprocess.run(cli(recipe, out, "--resume"), check=True, env=env, timeout=300)
    assert_identical(tmp_path / "whole", out)
    whole, resumed = load_state(tmp_path / "whole"), load_state(out)
    assert comparable_history(resumed) == comparable_history(whole)
    assert [r.model_dump() for r in resumed.results] == [r.model_dump() for r in whole.results]
    assert not any(p.name.startswith(".tmp") for p in out.rglob("*"))
