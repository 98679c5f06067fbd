"""The task specification a recipe gives for each task, validated with actionable errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

TaskType = Literal["generate_exact_match", "multiple_choice", "lm_eval"]
BUILTIN_TYPES = ("generate_exact_match", "multiple_choice")

# Options that only make sense for some task types: naming one for another type is an error.
_TYPE_OPTIONS: dict[str, tuple[str, ...]] = {
    "generate_exact_match": ("max_new_tokens", "stop", "extraction"),
    "multiple_choice": ("normalize", "target_delimiter"),
    "lm_eval": (
        "lm_eval_task",
        "train_task",
        "num_fewshot",
        "limit",
        "apply_chat_template",
        "include_path",
        "metric",
        "filter",
    ),
}


class TaskSpec(BaseModel):
    """One task of a recipe: where its items are and how a model is scored on them.

    Relative paths are resolved against the ``base_dir`` of the validation context (the
    recipe's folder) when one is given, else against the current directory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="label of the task in scores and reports")
    type: TaskType
    train: Path | None = Field(None, description="JSONL items of the training split")
    test: Path | None = Field(None, description="JSONL items of the held-out test split")
    batch_size: int | None = Field(None, ge=1, description="sequences per forward (None: auto)")
    # generate_exact_match
    max_new_tokens: int = Field(32, ge=1, description="generation budget per item")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="stop strings")
    extraction: Literal["strict", "flexible", "strict_or_flexible"] = "strict_or_flexible"
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

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        where = f"task {self.name!r} ({self.type})"
        foreign = [
            option
            for kind, options in _TYPE_OPTIONS.items()
            if kind != self.type
            for option in options
            if option in self.model_fields_set and option not in _TYPE_OPTIONS[self.type]
        ]
        if foreign:
            raise ValueError(
                f"{where}: option(s) {sorted(foreign)} do not apply to this type; "
                f"its own options are {list(_TYPE_OPTIONS[self.type])}"
            )
        if self.type in BUILTIN_TYPES:
            if self.train is None and self.test is None:
                raise ValueError(f"{where}: give a JSONL file in `train:` and/or `test:`")
            for split in ("train", "test"):
                path = getattr(self, split)
                if path is not None and not path.is_file():
                    raise ValueError(f"{where}: {split} file {path} does not exist")
        else:
            for split in ("train", "test"):
                if getattr(self, split) is not None:
                    raise ValueError(
                        f"{where}: `{split}:` is for JSONL tasks; an lm_eval task takes its "
                        "documents from lm-eval (use `lm_eval_task` / `train_task`)"
                    )
            for path in self.include_path:
                if not path.is_dir():
                    raise ValueError(f"{where}: include_path {path} is not a directory")
        if "" in self.stop:
            raise ValueError(f"{where}: stop strings must not be empty")
        return self


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Make a path absolute against the context's base_dir (if any)."""
    path = path.expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path.absolute()
