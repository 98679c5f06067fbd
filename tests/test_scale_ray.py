"""The Ray executor scores a step's candidates on actors and gives the serial run's results."""

from __future__ import annotations

from pathlib import Path

import pytest
from evolve_fixtures import assert_identical, recipe_data, task_files, tiny_llama

from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import run

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance with 2 CPUs for the whole module (start-up takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """A small run scored in the driver: the reference for the Ray runs."""
    root = tmp_path_factory.mktemp("ray")
    parents = [tiny_llama(root / "p0", 30), tiny_llama(root / "p1", 31)]
    data = recipe_data(parents, task_files(root / "data"), steps=2, threads=1)
    data["test_baselines"] = []
    out = root / "serial"
    return data, out, run(parse_recipe(data), out, progress=False)


def history(state) -> list[dict]:
    return [record.model_dump(exclude={"seconds"}) for record in state.history]


@pytest.mark.parametrize("transfer", ["path", "object_store"])
def test_ray_matches_serial(tmp_path: Path, serial, transfer: str) -> None:
    data, serial_out, reference = serial
    executor = {"kind": "ray", "workers": 2, "transfer": transfer}
    parallel = run(parse_recipe({**data, "executor": executor}), tmp_path, progress=False)
    assert parallel.finished and reference.finished
    assert sum(len(record.offspring) for record in reference.history) > 0
    assert history(parallel) == history(reference)
    assert parallel.best == reference.best
    assert [m.model_dump() for m in parallel.members.values()] == [
        m.model_dump() for m in reference.members.values()
    ]
    assert_identical(serial_out, tmp_path)
