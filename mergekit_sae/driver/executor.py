"""Where a step's candidates are scored: in the driver's process, or in parallel on Ray actors.

``serial`` (the default) is the driver's own path: each merge streams into the resident
evaluator and is scored at once. ``ray``: the driver merges every candidate of one
``make``/``rescore`` call to disk first, then Ray actors score them in parallel. Each actor
holds one resident scoring model (built from the recipe's first model and its tasks, with
this package's methods registered) between candidates and takes each candidate's weights by
path (the run's ``OUT/.work/population``, which every worker must see) or through the Ray
object store. Results come back in proposal order and scoring is deterministic, so a run
makes the same members, scores and history under either executor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_sae.errors import RecipeError

ItemScores = dict[str, list[float]]
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
        import torch

        import mergekit_sae.methods  # noqa: F401  (every process that merges registers them)
        from mergekit_sae.evaluate import ResidentModel, resolve_device
        from mergekit_sae.evaluate.evaluator import ResidentEvaluator
        from mergekit_sae.recipe.schema import parse_recipe
        from mergekit_sae.run import load_tasks

        if threads is not None:
            torch.set_num_threads(threads)
        recipe = parse_recipe(recipe_data, "recipe (in a Ray worker)")
        device, _ = resolve_device(recipe.device)
        resident = ResidentModel(
            model,
            device=str(device),
            dtype=recipe.eval_dtype,
            trust_remote_code=recipe.trust_remote_code,
        )
        tasks = load_tasks(recipe, "recipe (in a Ray worker)")
        batch_size = recipe.eval_batch_size or resident.batch_size  # sized to a GPU's memory
        self.evaluator = ResidentEvaluator(resident, tasks, batch_size=batch_size)

    def score(self, weights: Any, items: Mapping[str, Sequence[Any]]) -> tuple[ItemScores, float]:
        """Per-item scores of the candidate at ``weights`` (a path or a state dict), and the
        seconds spent loading it."""
        start = time.perf_counter()
        if isinstance(weights, str):
            self.evaluator.load(Path(weights))
        else:
            self.evaluator.resident.load_weights(weights)
        loaded = time.perf_counter() - start
        scores = self.evaluator.score_items(items)
        return {name: list(values) for name, values in scores.items()}, loaded


class RayExecutor:
    """Scores candidates on Ray actors: one per GPU, or ``workers`` CPU actors."""

    parallel = True

    def __init__(self, settings: Any, recipe: Any, model: Path):
        ray = import_ray()
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
        self.load_seconds = 0.0

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

    def score(self, paths: Sequence[Path], items: Mapping[str, Sequence[Any]]) -> list[ItemScores]:
        """Per-item scores of each candidate, in the order of ``paths`` (round-robin on actors)."""
        items_ref = self.ray.put(dict(items))
        futures = [
            self.actors[index % len(self.actors)].score.remote(self._weights(path), items_ref)
            for index, path in enumerate(paths)
        ]
        results = self.ray.get(futures)
        self.load_seconds += sum(loaded for _, loaded in results)
        return [scores for scores, _ in results]

    def close(self) -> None:
        """Stop the actors (Ray itself stays up for whoever started it)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def executor_for(ctx: Any) -> RayExecutor | None:
    """The run's parallel executor, made on first use (None for the serial executor)."""
    settings = getattr(ctx.recipe, "executor", None)
    if settings is None or settings.kind == "serial":
        return None
    if getattr(ctx, "executor", None) is None:
        ctx.executor = RayExecutor(settings, ctx.recipe, ctx.models[0])
    return ctx.executor
