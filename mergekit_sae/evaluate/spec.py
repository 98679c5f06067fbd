"""The task specification a recipe gives for each task, validated with actionable errors.

The spec is flat: it holds every option of every task type. Which type names which options, and
which types read JSONL files, comes from the task-type registry (:mod:`.registry`), so naming an
option of another type, or an unknown type, is an error that lists what applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mergekit_sae.evaluate.registry import TaskType, task_type, task_types


class TaskSpec(BaseModel):
    """One task of a recipe: where its items are and how a model is scored on them.

    Relative paths are resolved against the ``base_dir`` of the validation context (the
    recipe's folder) when one is given, else against the current directory. The options of
    every task type are fields here; the registry says which type owns which.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="label of the task in scores and reports")
    type: str = Field(description="a registered task type (see mergekit_sae.evaluate.registry)")
    train: Path | None = Field(None, description="JSONL items of the training split")
    test: Path | None = Field(None, description="JSONL items of the held-out test split")
    batch_size: int | None = Field(None, ge=1, description="sequences per forward (None: auto)")
    # generation (generate_exact_match, generate_text_match)
    max_new_tokens: int = Field(32, ge=1, description="generation budget per item")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="stop strings")
    # generate_exact_match
    extraction: Literal["strict", "flexible", "strict_or_flexible"] = "strict_or_flexible"
    # generate_text_match
    answer_regex: str | None = Field(
        None, description="regex applied to the output; its first group (else the match) is scored"
    )
    ignore_case: bool = Field(False, description="compare answers case-folded")
    ignore_punctuation: bool = Field(False, description="drop punctuation before comparing")
    # multiple_choice
    normalize: Literal["none", "tokens", "chars"] = Field(
        "none", description="divide each choice's log-likelihood by its token or char count"
    )
    target_delimiter: str = Field(" ", description="text put between the prompt and a choice")
    # lm_eval
    lm_eval_task: str | None = Field(None, description="lm-eval task or group (default: name)")
    train_task: str | None = Field(None, description="lm-eval task used for the train split")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | float | None = Field(None, gt=0)
    apply_chat_template: bool | str = False
    include_path: list[Path] = Field(default_factory=list, description="extra task YAML dirs")
    metric: str | None = Field(None, description="per-sample metric (default: task's first)")
    filter: str | None = Field(None, description="lm-eval filter name (default: the first)")

    @field_validator("train", "test", mode="after")
    @classmethod
    def _resolve_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @field_validator("include_path", mode="after")
    @classmethod
    def _resolve_dirs(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        return [_resolve(p, info) for p in value]

    @field_validator("type", mode="after")
    @classmethod
    def _registered_type(cls, value: str) -> str:
        task_type(value)  # raises, listing the known types
        return value

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        kind = task_type(self.type)
        where = f"task {self.name!r} ({self.type})"
        _check_options(self, kind, where)
        if kind.reads_jsonl:
            _check_files(self, where)
        else:
            for split in ("train", "test"):
                if getattr(self, split) is not None:
                    raise ValueError(
                        f"{where}: `{split}:` is for JSONL tasks; a {self.type} task takes its "
                        "items from elsewhere (see its own options)"
                    )
        if "" in self.stop:
            raise ValueError(f"{where}: stop strings must not be empty")
        if kind.check_spec is not None:
            try:
                kind.check_spec(self)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
        return self


def _check_options(spec: TaskSpec, kind: TaskType, where: str) -> None:
    """Options set explicitly must be the type's own, not those of another registered type."""
    undeclared = sorted(set(kind.options) - set(TaskSpec.model_fields))
    if undeclared:
        raise ValueError(
            f"{where}: the task type declares option(s) {undeclared} that TaskSpec lacks; "
            "add them as fields of mergekit_sae.evaluate.spec.TaskSpec"
        )
    foreign = sorted(
        {
            option
            for other in task_types().values()
            for option in other.options
            if option in spec.model_fields_set and option not in kind.options
        }
    )
    if foreign:
        raise ValueError(
            f"{where}: option(s) {foreign} do not apply to this type; "
            f"its own options are {list(kind.options)}"
        )


def _check_files(spec: TaskSpec, where: str) -> None:
    """A JSONL task needs at least one split file, and every named file must exist."""
    if spec.train is None and spec.test is None:
        raise ValueError(f"{where}: give a JSONL file in `train:` and/or `test:`")
    for split in ("train", "test"):
        path = getattr(spec, split)
        if path is not None and not path.is_file():
            raise ValueError(f"{where}: {split} file {path} does not exist")


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Make a path absolute against the context's base_dir (if any)."""
    path = path.expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path.absolute()
