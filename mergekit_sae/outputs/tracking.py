"""Live tracking of a run in TensorBoard and Weights & Biases (the optional ``tracking`` extra).

After every checkpoint the shared loop hands the tracker the run's state; the tracker logs
the step's record (best and mean fitness, the best member's per-task training scores, the
zero fractions of the best and of the population, the schedule's rate, the evaluations used,
and every key of ``StepRecord.seconds``) to each backend at the step number. At the end it
logs the test scores, the plots as images and the recipe (W&B config, TensorBoard hparams).

Resuming continues the same runs: the W&B run id is kept in the checkpoint
(``RunState.wandb_run_id``) and ``OUT/.work/tracking.json`` records the last step each
backend logged. A resumed TensorBoard writer purges steps after that one (``purge_step``) and
no backend logs a step it already logged. A step is logged from the member records of the
checkpoint it follows, so only the checkpoint's last step can be logged late (after a crash
between the checkpoint and its logging); a run that turns tracking on when resumed starts
logging there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from mergekit_sae.atomic import write_text
from mergekit_sae.driver.checkpoint import RunState, work_dir
from mergekit_sae.errors import RecipeError
from mergekit_sae.recipe.schema import Recipe, TrackingSettings, WandbSettings
from mergekit_sae.records import Member, StepRecord, TestResult

MARKER_FILE = "tracking.json"
INSTALL_HINT = 'pip install "mergekit-sae[tracking]"'


def step_values(record: StepRecord, members: Mapping[str, Member]) -> dict[str, float]:
    """The scalars logged for one step, by tag (from the record and the members it names)."""
    best = members[record.best]
    living = [members[i] for i in record.population_after if i in members]
    values: dict[str, float | None] = {
        "fitness/best": record.best_fitness,
        "fitness/mean": record.mean_fitness,
        "performance/best": record.best_performance,
        **{f"train/{task}": score for task, score in best.scores.items()},
        "zeros/best": best.zero_fraction,
        "zeros/population": sum(m.zero_fraction for m in living) / max(1, len(living)),
        "schedule/rate": record.info.get("rate"),
        "evaluations": record.evaluations,
        **{f"seconds/{key}": seconds for key, seconds in record.seconds.items()},
    }
    return {tag: float(value) for tag, value in values.items() if value is not None}


def final_values(results: Sequence[TestResult]) -> dict[str, float]:
    """The test-split scalars of the final report: ``test/<row label>/<task>`` and ``/mean``."""
    values = {}
    for row in results:
        for task, score in row.scores.items():
            values[f"test/{row.label}/{task}"] = float(score)
        values[f"test/{row.label}/mean"] = float(row.mean)
        values[f"test/{row.label}/zeros"] = float(row.zero_fraction)
    return values


def flat_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe data as ``a.b.c`` keys with scalar values (lists written as text)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = "none" if value is None else value
        else:
            flat[name] = json.dumps(value)
    return flat


def with_tracking(recipe: Recipe, tensorboard: str | None, wandb_project: str | None) -> Recipe:
    """The recipe with the command line's ``--tensorboard DIR`` / ``--wandb PROJECT`` applied.

    ``--wandb`` replaces the project of a recipe's ``tracking.wandb`` block (other fields
    stay) or adds a block with that project.
    """
    tracking = recipe.tracking
    if tensorboard is not None:
        tracking = tracking.model_copy(update={"tensorboard": tensorboard})
    if wandb_project is not None:
        block = tracking.wandb or WandbSettings(project=wandb_project)
        tracking = tracking.model_copy(
            update={"wandb": block.model_copy(update={"project": wandb_project})}
        )
    return recipe.model_copy(update={"tracking": tracking})


def comparison_tracking(data: dict[str, Any], folder: Path, group: str) -> dict[str, Any]:
    """One comparison run's recipe data with its own tracking: runs overlay in one place.

    TensorBoard logs to ``DIR/<method>/seed<k>``; W&B runs share ``group`` (a recipe's own
    ``group`` wins) and are named ``<method>/seed<k>``.
    """
    tracking = data.get("tracking")
    if not isinstance(tracking, dict):
        return data
    tracking = dict(tracking)
    if tracking.get("tensorboard"):
        tracking["tensorboard"] = str(Path(tracking["tensorboard"]) / folder)
    if isinstance(tracking.get("wandb"), dict):
        block = dict(tracking["wandb"])
        block["group"] = block.get("group") or group
        block["name"] = folder.as_posix()
        tracking["wandb"] = block
    return {**data, "tracking": tracking}


class Backend(Protocol):
    """One tracking library: scalars per step, the end of the run, closing."""

    name: str

    def log(self, values: Mapping[str, float], step: int) -> None: ...

    def final(
        self,
        values: Mapping[str, float],
        images: Mapping[str, Path],
        config: Mapping[str, Any],
        recipe_text: str,
        step: int,
    ) -> None: ...

    def close(self) -> None: ...


class TensorBoardBackend:
    """Scalars, images, text and hparams in a TensorBoard log directory (flushed every step)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=3600)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def final(self, values, images, config, recipe_text, step) -> None:
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard.summary import hparams

        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        for tag, path in images.items():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.add_text("recipe", f"```yaml\n{recipe_text}\n```", step)
        metrics = {tag: value for tag, value in values.items() if tag.endswith("/mean")}
        for summary in hparams(dict(config), metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """One W&B run (resumed by id), the recipe as its config, test scores in its summary."""

    name = "wandb"

    def __init__(self, settings: WandbSettings, run_id: str, name: str, out: Path, config: dict):
        import wandb

        directory = None if os.environ.get("WANDB_DIR") else str(work_dir(out))
        self.wandb = wandb
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            mode=settings.mode,
            group=settings.group,
            name=settings.name or name,
            id=run_id,
            resume="allow",
            config=config,
            dir=directory,
            allow_val_change=True,
            # no system-metrics sampler, no console capture: they cost CPU on every step
            settings=wandb.Settings(x_disable_stats=True, console="off"),
        )

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def final(self, values, images, config, recipe_text, step) -> None:
        self.run.summary.update(dict(values))
        media = {tag: self.wandb.Image(str(path)) for tag, path in images.items()}
        if media:
            self.run.log(media, step=max(step, self.run.step))

    def close(self) -> None:
        self.run.finish()


def new_run_id() -> str:
    """A fresh W&B run id (8 lowercase letters and digits, as W&B makes them)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_marker(out: Path) -> dict[str, int]:
    """The last step each backend logged (empty for a run never tracked)."""
    path = work_dir(out) / MARKER_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Tracker:
    """Logs a run's steps to its backends, each step once, and the results at the end."""

    def __init__(
        self,
        backends: Sequence[Backend],
        out: Path,
        run_id: str | None = None,
        logged: Mapping[str, int] | None = None,
    ):
        self.backends = list(backends)
        self.out = out
        self.run_id = run_id
        self.logged = {b.name: int((logged or {}).get(b.name, 0)) for b in self.backends}

    def start(self, state: RunState) -> None:
        """Bind to the run's state (its W&B id goes into the checkpoint); log a missed step."""
        if self.run_id is not None:
            state.wandb_run_id = self.run_id
        self.checkpointed(state)

    def checkpointed(self, state: RunState) -> None:
        """Log the checkpoint's last step to every backend that has not logged it yet."""
        if not state.history:
            return
        record = state.history[-1]
        pending = [b for b in self.backends if self.logged[b.name] < record.step]
        if not pending:
            return
        values = step_values(record, state.members)
        for backend in pending:
            backend.log(values, record.step)
            self.logged[backend.name] = record.step
        write_text(work_dir(self.out) / MARKER_FILE, json.dumps(self.logged))

    def final(self, state: RunState, recipe: Recipe, images: Mapping[str, Path]) -> None:
        """Log the test report, the plots and the recipe at the run's last step."""
        import yaml

        values = final_values(state.results)
        config = flat_config(recipe.digest_fields())
        text = yaml.safe_dump(recipe.digest_fields(), sort_keys=False)
        for backend in self.backends:
            backend.final(values, images, config, text, state.step)

    def close(self) -> None:
        """Flush and close every backend (the W&B run is marked finished)."""
        for backend in self.backends:
            backend.close()


def require(module: str, field: str, source: str) -> None:
    """Raise a one-line RecipeError with the install command when a library is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RecipeError(
            f"{source}: {field}: needs the {module} package; install it with: {INSTALL_HINT}",
            field=field,
        )


def open_tracker(
    settings: TrackingSettings, out: Path, recipe: Recipe, state: RunState | None, source: str
) -> Tracker | None:
    """The run's tracker (None without tracking); ``state`` is the checkpoint being resumed."""
    if not settings.enabled:
        return None
    if settings.tensorboard is not None:
        require("tensorboard", "tracking.tensorboard", source)
    if settings.wandb is not None:
        require("wandb", "tracking.wandb", source)
    marker = read_marker(out) if state is not None else {}
    work_dir(out).mkdir(parents=True, exist_ok=True)
    backends: list[Backend] = []
    run_id = None
    if settings.tensorboard is not None:
        purge = marker["tensorboard"] + 1 if "tensorboard" in marker else None
        backends.append(TensorBoardBackend(Path(settings.tensorboard), purge))
    if settings.wandb is not None:
        run_id = (state.wandb_run_id if state is not None else None) or new_run_id()
        name = out.resolve().name
        backends.append(WandbBackend(settings.wandb, run_id, name, out, recipe.digest_fields()))
    return Tracker(backends, out, run_id, marker)


def plot_images(out: Path) -> dict[str, Path]:
    """The run's PNG plots by tag: ``plots/<name>`` for OUT/plots/*.png, ``pareto``."""
    images = {f"plots/{p.stem}": p for p in sorted((out / "plots").glob("*.png"))}
    if (out / "pareto.png").is_file():
        images["pareto"] = out / "pareto.png"
    return images
