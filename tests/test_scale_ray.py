"""The Ray executor scores a step's candidates on actors and gives the serial run's results."""

from __future__ import annotations

from pathlib import Path

import pytest
from evolve_fixtures import assert_identical, recipe_data, task_files, tiny_llama

from mergekit_sae.evolve.recipe import parse_recipe
from mergekit_sae.evolve.runner import run

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance with 2 CPUs for the whole module (start-up takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[list[Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("ray")
    parents = [tiny_llama(root / "p0", 30), tiny_llama(root / "p1", 31)]
    return parents, task_files(root / "data")


def history(state) -> list[dict]:
    return [record.model_dump(exclude={"seconds"}) for record in state.history]


@pytest.mark.parametrize("transfer", ["path", "object_store"])
def test_ray_matches_serial(tmp_path: Path, setup, transfer: str) -> None:
    parents, files = setup
    data = recipe_data(parents, files, steps=2, population_size=4, threads=1)
    serial = run(parse_recipe(data), tmp_path / "serial", progress=False)
    executor = {"kind": "ray", "workers": 2, "transfer": transfer}
    parallel = run(parse_recipe({**data, "executor": executor}), tmp_path / "ray", progress=False)
    assert parallel.finished and serial.finished
    assert history(parallel) == history(serial)
    assert parallel.best == serial.best
    assert [m.model_dump() for m in parallel.members.values()] == [
        m.model_dump() for m in serial.members.values()
    ]
    assert_identical(tmp_path / "serial", tmp_path / "ray")
    scored = sum(len(record.offspring) for record in serial.history)
    assert scored > 0  # the comparison covers offspring scored on the actors
