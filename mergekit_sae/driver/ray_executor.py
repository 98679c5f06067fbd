"""Scoring on Ray actors (``executor: ray``): candidates merged to disk, then scored in parallel.

Each actor holds one resident scoring model (built from the recipe's first model and its tasks,
with this package's methods registered) between candidates and takes each candidate's weights
by path (the run's ``OUT/.work/population``, which every worker must see) or through the Ray
object store. Results come back in the order asked and scoring is deterministic, so a run makes
the same members, scores and history as with the serial executor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergekit_sae import faults
from mergekit_sae.driver.executor import ItemScores, Merge, Seconds
from mergekit_sae.errors import RecipeError
from mergekit_sae.evaluate import resolve_device
from mergekit_sae.evaluate.evaluator import build_evaluator, load_tasks
from mergekit_sae.methods import register_all
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.records import Member, member_dir

RAY_HINT = 'executor: ray needs Ray; install it with `pip install "mergekit-sae[ray]"`'


def import_ray() -> Any:
    """The ``ray`` module, or a RecipeError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise RecipeError(RAY_HINT) from None
    return ray


def worker_recipe(recipe: Any) -> dict[str, Any]:
    """The recipe as data with task files made absolute (a worker's folder may differ)."""
    data = recipe.model_dump(mode="json", exclude_unset=True)  # as written: valid again
    for task in data["tasks"]:
        for key in ("train", "test"):
            if task.get(key):
                task[key] = str(Path(task[key]).absolute())
        if task.get("include_path"):
            task["include_path"] = [str(Path(p).absolute()) for p in task["include_path"]]
    return data


class ScoringWorker:
    """The body of one Ray actor: a resident evaluator built from the recipe, kept between
    candidates; :meth:`score` loads one candidate's weights and scores it on the items."""

    def __init__(self, recipe_data: dict[str, Any], model: str, threads: int | None):
        if threads is not None:
            torch.set_num_threads(threads)
        register_all()  # every process that merges registers the methods
        source = "recipe (in a Ray worker)"
        recipe = parse_recipe(recipe_data, source)
        device, _ = resolve_device(recipe.device)
        self.evaluator = build_evaluator(
            model,
            load_tasks(recipe.tasks, source),
            device=str(device),
            dtype=recipe.eval_dtype,
            batch_size=recipe.eval_batch_size,
            trust_remote_code=recipe.trust_remote_code,
        )

    def score(
        self, weights: Any, items: Mapping[str, Sequence[Any]]
    ) -> tuple[ItemScores, float, float]:
        """Per-item scores of the candidate at ``weights`` (a path or a state dict), and the
        seconds spent loading it and scoring it."""
        start = time.perf_counter()
        if isinstance(weights, str):
            self.evaluator.load(Path(weights))
        else:
            self.evaluator.resident.load_weights(weights)
        loaded = time.perf_counter()
        scores = self.evaluator.score_items(items)
        scored = time.perf_counter()
        items_scores = {name: list(values) for name, values in scores.items()}
        return items_scores, loaded - start, scored - loaded


def split_wall(wall: float, loading: float, scoring: float) -> tuple[float, float]:
    """A parallel batch's wall seconds as (load, score), in the proportion the actors spent on
    each (their own seconds overlap, so they do not add up to the wall time themselves)."""
    busy = loading + scoring
    load = wall * loading / busy if busy > 0 else 0.0
    return load, wall - load


class RayExecutor:
    """Scores candidates on Ray actors: one per GPU, or ``workers`` CPU actors."""

    def __init__(self, settings: Any, recipe: Any, model: Path, out: Path):
        ray = import_ray()
        self.out = out  # the run's folder: members' weights are under it
        self.ray = ray
        self.settings = settings
        if not ray.is_initialized():
            ray.init(address=settings.address, include_dashboard=False, log_to_driver=False)
        count = settings.workers or self._default_workers()
        threads = recipe.threads or max(1, int(settings.cpus_per_worker))
        actor = ray.remote(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker)(
            ScoringWorker
        )
        data = worker_recipe(recipe)
        self.actors = [actor.remote(data, str(model), threads) for _ in range(count)]

    def _default_workers(self) -> int:
        """One actor per GPU share (gpus_per_worker > 0), else one per cpus_per_worker CPUs."""
        resources = self.ray.cluster_resources()
        if self.settings.gpus_per_worker > 0:
            count = int(resources.get("GPU", 0) // self.settings.gpus_per_worker)
            if count < 1:
                raise RecipeError("executor: gpus_per_worker > 0 but the Ray cluster has no GPU")
            return count
        return max(1, int(resources.get("CPU", 1) // self.settings.cpus_per_worker))

    def _weights(self, path: Path) -> Any:
        """What an actor is sent: the path, or the weights put in the object store."""
        if self.settings.transfer == "path":
            return str(Path(path).absolute())
        from safetensors.torch import load_file

        tensors: dict[str, Any] = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        return self.ray.put(tensors)

    def make(
        self,
        members: Sequence[Member],
        merge: Merge,
        items: Mapping[str, Sequence[Any]],
        seconds: Seconds,
    ) -> Iterator[ItemScores]:
        """Merge every member to disk, then score them all in parallel."""
        for member in members:
            merge(member, False)
        paths = [member_dir(member, self.out) for member in members]
        return self.rescore(paths, items, seconds)

    def rescore(
        self, paths: Sequence[Path], items: Mapping[str, Sequence[Any]], seconds: Seconds
    ) -> Iterator[ItemScores]:
        """Per-item scores of each stored model, in the order of ``paths`` (round-robin on
        the actors). The wall time of the parallel batch goes to ``load`` and ``score`` in the
        proportion the actors spent on each (:func:`split_wall`), so a step's seconds add up."""
        if not paths:
            return iter(())
        faults.point("score")
        start = time.perf_counter()
        items_ref = self.ray.put(dict(items))
        futures = [
            self.actors[index % len(self.actors)].score.remote(self._weights(path), items_ref)
            for index, path in enumerate(paths)
        ]
        results = self.ray.get(futures)
        load, score = split_wall(
            time.perf_counter() - start,
            sum(loading for _, loading, _ in results),
            sum(scoring for _, _, scoring in results),
        )
        seconds["load"] += load
        seconds["score"] += score
        return iter([scores for scores, _, _ in results])

    def close(self) -> None:
        """Stop the actors (Ray itself stays up for whoever started it)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
