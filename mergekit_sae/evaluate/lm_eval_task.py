"""Tasks from lm-eval-harness, scored on an in-memory transformers model through lm-eval's HFLM.

Items are document references ``{"task": leaf_task, "doc_id": i}`` into the task's evaluation
documents, so a seeded subsample of items becomes lm-eval's ``samples=`` argument and only those
documents are scored. Per-item scores are read from lm-eval's logged samples.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from mergekit_sae.evaluate.device import call_with_oom_backoff
from mergekit_sae.evaluate.registry import TaskSettings, TaskType, register_task_type
from mergekit_sae.evaluate.spec import TaskSpec, resolve_path
from mergekit_sae.evaluate.tasks import DEFAULT_BATCH_SIZE, Task

logger = logging.getLogger(__name__)


class LmEvalSettings(TaskSettings):
    """Options of ``lm_eval``: which lm-eval task, where its YAML is, and how it is scored."""

    lm_eval_task: str | None = Field(None, description="lm-eval task or group (default: name)")
    train_task: str | None = Field(None, description="lm-eval task used for the train split")
    num_fewshot: int | None = Field(
        None, ge=0, description="few-shot examples per prompt (None: the task's own)"
    )
    limit: int | float | None = Field(
        None, gt=0, description="documents kept per task: a count, or a fraction below 1"
    )
    apply_chat_template: bool | str = Field(
        False, description="format prompts with the tokenizer's (or the named) chat template"
    )
    include_path: list[Path] = Field(default_factory=list, description="extra task YAML dirs")
    metric: str | None = Field(None, description="per-sample metric (default: task's first)")
    filter: str | None = Field(None, description="lm-eval filter name (default: the first)")

    @field_validator("include_path", mode="after")
    @classmethod
    def _folders(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        """Each entry, resolved against the recipe's folder, must be a folder."""
        paths = [resolve_path(p, info) for p in value]
        for path in paths:
            if not path.is_dir():
                raise ValueError(f"include_path {path} is not a directory")
        return paths


class LmEvalTask(Task):
    """An lm-eval task or group; each leaf task's evaluation documents are its items."""

    settings: LmEvalSettings

    def __init__(self, spec: TaskSpec):
        super().__init__(spec)
        _require_lm_eval()
        self.task_name = self.settings.lm_eval_task or spec.name
        self._leaves: dict[str, dict[str, Any]] = {}

    def task_manager(self, names: Sequence[str]):
        """A TaskManager that knows the named tasks: the include_path folders alone when they
        define them all (fast), else with lm-eval's built-in tasks (indexing takes seconds)."""
        include = tuple(str(p) for p in self.settings.include_path)
        if include:
            local = _task_manager(include, include_defaults=False)
            if all(name in local.all_tasks for name in names):
                return local
        return _task_manager(include, include_defaults=True)

    def items(self, split) -> list[dict[str, Any]]:
        """Document references of the split's lm-eval task (``train_task`` for train)."""
        if split not in ("train", "test"):
            raise ValueError(f"task {self.name!r}: unknown split {split!r}; use 'train' or 'test'")
        name = self.task_name
        if split == "train":
            if self.settings.train_task is None:
                logger.warning(
                    "task %r: no train_task given; the train split uses the evaluation "
                    "documents of %r",
                    self.name,
                    name,
                )
            else:
                name = self.settings.train_task
        items = []
        for leaf, task in self._leaf_tasks(name).items():
            n_docs = len(task.eval_docs)
            items.extend(
                {"task": leaf, "doc_id": i} for i in range(_limited(n_docs, self.settings.limit))
            )
        return items

    def score_details(self, model, tokenizer, items, *, batch_size=None) -> list[dict[str, Any]]:
        """Records with lm-eval's logged sample for each item and its metric value as score."""
        if not items:
            return []
        samples: dict[str, list[int]] = {}
        for item in items:
            samples.setdefault(item["task"], []).append(int(item["doc_id"]))
        samples = {leaf: sorted(set(ids)) for leaf, ids in samples.items()}
        # Resolve filter and metric before any scoring, so a wrong name fails fast.
        filters = {leaf: self._filter(leaf) for leaf in samples}
        metrics = {leaf: self._metric(leaf) for leaf in samples}

        def run(size: int) -> dict[str, Any]:
            return self._evaluate(model, tokenizer, samples, size)

        size = batch_size or self.spec.batch_size or DEFAULT_BATCH_SIZE
        results = call_with_oom_backoff(run, size)
        logged = {
            (leaf, s["doc_id"]): s
            for leaf in samples
            for s in results["samples"][leaf]
            if s["filter"] == filters[leaf]
        }
        records = []
        for item in items:
            sample = logged[(item["task"], int(item["doc_id"]))]
            metric = metrics[item["task"]]
            records.append({"sample": sample, "metric": metric, "score": float(sample[metric])})
        return records

    def _evaluate(self, model, tokenizer, samples: dict[str, list[int]], batch_size: int):
        """One lm-eval run over the given documents with logged samples."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        settings = self.settings
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with quiet_git_hash():
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=sorted(samples),
                num_fewshot=settings.num_fewshot,
                samples=samples,
                apply_chat_template=settings.apply_chat_template,
                task_manager=self.task_manager(sorted(samples)),
                log_samples=True,
                bootstrap_iters=0,
                random_seed=None,  # leave the caller's global random state alone
                numpy_random_seed=None,
                torch_random_seed=None,
            )

    def _leaf_tasks(self, name: str) -> dict[str, Any]:
        """The leaf lm-eval Task objects of a task or group name, by task name."""
        if name not in self._leaves:
            try:
                loaded = self.task_manager([name]).load([name])
            except (KeyError, ValueError) as e:
                raise ValueError(
                    f"task {self.name!r}: lm-eval does not know task {name!r} ({e}); "
                    "check the name or add its YAML folder to include_path"
                ) from e
            self._leaves[name] = dict(loaded["tasks"])
        return self._leaves[name]

    def _filter(self, leaf: str) -> str:
        """The filter whose results are scored: the filter option, else the task's first one."""
        task = self._task(leaf)
        names = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        wanted = self.settings.filter
        if wanted is None:
            return names[0]
        if wanted not in names:
            raise ValueError(
                f"task {self.name!r}: lm-eval task {leaf!r} has no filter {wanted!r}; "
                f"it has {names}"
            )
        return wanted

    def _metric(self, leaf: str) -> str:
        """The metric used as score: the metric option, else the task's first listed metric."""
        available = list(getattr(self._task(leaf), "_metric_fn_list", {}))
        if not available:
            raise ValueError(f"task {self.name!r}: lm-eval task {leaf!r} lists no metric")
        metric = self.settings.metric or available[0]
        if metric not in available:
            raise ValueError(
                f"task {self.name!r}: lm-eval task {leaf!r} has no metric {metric!r}; "
                f"it has {available}"
            )
        return metric

    def _task(self, leaf: str):
        for leaves in self._leaves.values():
            if leaf in leaves:
                return leaves[leaf]
        return self._leaf_tasks(leaf)[leaf]


def git_commit_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` with git's stderr discarded (same result).

    lm-eval records the commit of the current directory in its results by running
    ``git describe``, whose ``fatal: not a git repository`` would reach the terminal.
    """
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        command = ["git", "describe", "--always"]
        output = subprocess.check_output(command, stderr=subprocess.DEVNULL)  # noqa: S607
        return output.strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def quiet_git_hash() -> Iterator[None]:
    """Use :func:`git_commit_hash` in lm-eval's evaluator for the block (restored after)."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _limited(n_docs: int, limit: int | float | None) -> int:
    """Number of documents kept by the limit option (a count, or a fraction when below 1)."""
    if limit is None:
        return n_docs
    if limit < 1:
        return int(math.ceil(n_docs * limit))
    return min(n_docs, int(limit))


@cache
def _task_manager(include_path: tuple[str, ...], include_defaults: bool):
    """One TaskManager per set of task folders (indexing the built-in tasks is slow)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "lm_eval tasks need lm-eval-harness: pip install 'mergekit-sae[lm-eval]'"
        ) from e


TASK_TYPE = register_task_type(
    TaskType(
        name="lm_eval",
        task_class=LmEvalTask,
        settings_model=LmEvalSettings,
    )
)
