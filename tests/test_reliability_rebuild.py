"""The lineage rebuilds offline, bit for bit, with the real mergekit-multi and mergekit-yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from evolve_fixtures import assert_identical, deep_lineage_recipe, run_fake, tiny_llama
from method_fixtures import _ENTRY

from mergekit_sae.merging.recipes import RECIPE_FILE, load_stages

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
    here = Path.cwd()
    os.chdir(root)
    try:
        run_fake(deep_lineage_recipe(["parents/a", "parents/b"]), Path("OUT"))
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
