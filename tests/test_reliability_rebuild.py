"""The lineage rebuilds offline, bit for bit, with the real mergekit-multi and mergekit-yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from evolve_fixtures import FakeEvaluator, assert_identical, tiny_llama
from method_fixtures import _ENTRY

from mergekit_sae.evolve.recipe import parse_recipe
from mergekit_sae.evolve.reproduce import RECIPE_FILE, load_stages
from mergekit_sae.evolve.runner import run

pytestmark = pytest.mark.usefixtures("one_thread")


def offline_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A console entry point in a fresh interpreter with the Hub unreachable (HF_HUB_OFFLINE)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", _ENTRY, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """An evolve run on parents named by relative paths with one slash (``parents/a``)."""
    root = tmp_path_factory.mktemp("rebuild")
    for seed, name in enumerate("ab"):
        tiny_llama(root / "parents" / name, seed)
    data = {
        "models": ["parents/a", "parents/b"],
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 12} for name in "ab"],
        "population_size": 4,
        "steps": 4,
        "fitness_sparsity_weight": 2.0,  # sparse members win: the best has a deep lineage
        "dtype": "float32",
        "device": "cpu",
    }
    here = Path.cwd()
    os.chdir(root)
    try:
        run(
            parse_recipe(data),
            Path("OUT"),
            progress=False,
            make_evaluator=lambda r, i: FakeEvaluator(),
        )
    finally:
        os.chdir(here)
    documents = load_stages(root / "OUT" / RECIPE_FILE)
    assert len(documents) >= 3  # two named stages at least: the case that failed offline
    return root


def test_mergekit_multi_rebuilds_offline(run_folder: Path) -> None:
    result = offline_cli(
        run_folder,
        "mergekit-multi",
        f"OUT/{RECIPE_FILE}",
        "--intermediate-dir",
        "stages",
        "--out-path",
        "merged",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OfflineModeIsEnabled" not in result.stderr
    assert_identical(run_folder / "OUT", run_folder / "merged")


def test_mergekit_yaml_stage_by_stage_rebuilds_offline(run_folder: Path, tmp_path: Path) -> None:
    documents = load_stages(run_folder / "OUT" / RECIPE_FILE)
    for index, document in enumerate(documents):
        name = document.pop("name", "./merged-by-stage")
        stage = tmp_path / f"stage{index}.yml"
        stage.write_text(yaml.safe_dump(document))
        result = offline_cli(run_folder, "mergekit-yaml", str(stage), name)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_identical(run_folder / "OUT", run_folder / "merged-by-stage")
