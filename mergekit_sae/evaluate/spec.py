"""The task specification a recipe gives for each task, validated with actionable errors.

A spec holds what every task has (``name``, ``type``, its JSONL splits, ``batch_size``) and,
in ``settings``, the options of its type, validated against the settings model the type
registered (:mod:`.registry`). The recipe writes those options flat, beside the general
fields (``max_new_tokens: 24`` directly on the task), and a spec serialises back to that flat
form. An option of another type, an unknown option or a bad value is an error naming the
task, its type and the option, and listing the type's own options.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from mergekit_sae.evaluate.registry import TaskSettings, TaskType, task_type, task_types


class TaskSpec(BaseModel):
    """One task of a recipe: where its items are and how a model is scored on them.

    Relative paths are resolved against the ``base_dir`` of the validation context (the
    recipe's folder) when one is given, else against the current directory. ``settings``
    holds the type's own options (given flat, beside these fields).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="label of the task in scores and reports")
    type: str = Field(description="a registered task type (see mergekit_sae.evaluate.registry)")
    train: Path | None = Field(None, description="JSONL items of the training split")
    test: Path | None = Field(None, description="JSONL items of the held-out test split")
    batch_size: int | None = Field(None, ge=1, description="sequences per forward (None: auto)")
    settings: SerializeAsAny[TaskSettings] = Field(
        description="the type's own options, validated by its settings model"
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, data: Any, info: ValidationInfo) -> Any:
        """Validate every key that is not a general field as an option of the task's type."""
        if not isinstance(data, Mapping):
            return data  # a spec already validated
        general = {k: v for k, v in data.items() if k in cls.model_fields and k != "settings"}
        options = {k: v for k, v in data.items() if k not in general}
        name = data.get("type")
        if not isinstance(name, str) or name not in task_types():
            return {**general, "settings": TaskSettings()}  # `type` reports the error
        kind = task_type(name)
        where = f"task {data.get('name')!r} ({name})"
        return {**general, "settings": _validate_settings(kind, options, cls, where, info)}

    @field_validator("train", "test", mode="after")
    @classmethod
    def _resolve_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @field_validator("type", mode="after")
    @classmethod
    def _registered_type(cls, value: str) -> str:
        task_type(value)  # raises, listing the known types
        return value

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        kind = task_type(self.type)
        where = f"task {self.name!r} ({self.type})"
        if kind.reads_jsonl:
            _check_files(self, where)
        else:
            for split in ("train", "test"):
                if getattr(self, split) is not None:
                    raise ValueError(
                        f"{where}: `{split}:` is for JSONL tasks; a {self.type} task takes its "
                        "items from elsewhere (see its own options)"
                    )
        return self

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Serialise as a recipe writes a task: the type's options beside the general fields."""
        data = handler(self)
        options = data.pop("settings", {})
        return {**data, **options}


def _validate_settings(
    kind: TaskType,
    options: Mapping[str, Any],
    spec_class: type[TaskSpec],
    where: str,
    info: ValidationInfo,
) -> TaskSettings:
    """The type's settings model validated from the options (the recipe's folder in context).

    Keys that are not options of the type, and bad values, raise one ValidationError with a
    problem per key: each names the task and type (``where``) and lists the type's own options.
    """
    own = _own_options(kind)
    general = [f for f in spec_class.model_fields if f != "settings"]
    problems = _task_problems(kind, options, general, where, own)
    try:
        settings = kind.settings_model.model_validate(
            {k: v for k, v in options.items() if k in kind.options}, context=info.context
        )
    except ValidationError as error:
        problems += [_value_problem(p, where, own) for p in error.errors()]
    if problems:
        raise ValidationError.from_exception_data(spec_class.__name__, problems)
    return settings


def _own_options(kind: TaskType) -> str:
    """The end of every option error: what the type does take."""
    if not kind.options:
        return "it takes no options of its own"
    return f"its own options are {list(kind.options)}"


def _task_problems(
    kind: TaskType, options: Mapping[str, Any], general: list[str], where: str, own: str
) -> list[InitErrorDetails]:
    """Problems of the task as a whole: options of other types, unknown keys, and own options
    that shadow a general field (a settings model that cannot be given its value)."""
    owners = {n: set(t.options) for n, t in task_types().items() if n != kind.name}
    foreign = [k for k in options if k not in kind.options and any(k in o for o in owners.values())]
    unknown = [k for k in options if k not in kind.options and k not in foreign]
    clash = [o for o in kind.options if o in general]
    messages = []
    if foreign:
        types = sorted(n for n, o in owners.items() if o & set(foreign))
        messages.append(
            f"{where}: option(s) {foreign} do not apply to this type (they are options of "
            f"{', '.join(types)}); {own}"
        )
    if unknown:
        messages.append(
            f"{where}: unknown option(s) {unknown}; {own}, and every task takes {general}"
        )
    if clash:
        messages.append(
            f"{where}: the type's settings model declares {clash}, which are general task "
            "fields; rename those options"
        )
    return [_problem((), message, dict(options)) for message in messages]


def _value_problem(problem: Mapping[str, Any], where: str, own: str) -> InitErrorDetails:
    """A bad option value, located at the option, its message naming the task and type."""
    message = str(problem["msg"]).removeprefix("Value error, ")
    return _problem(tuple(problem["loc"]), f"{where}: {message}; {own}", problem["input"])


def _problem(loc: tuple[int | str, ...], message: str, value: Any) -> InitErrorDetails:
    """One line of a ValidationError, its message shown as written."""
    return {"type": PydanticCustomError("task_option", message), "loc": loc, "input": value}


def _check_files(spec: TaskSpec, where: str) -> None:
    """A JSONL task needs at least one split file, and every named file must exist."""
    if spec.train is None and spec.test is None:
        raise ValueError(f"{where}: give a JSONL file in `train:` and/or `test:`")
    for split in ("train", "test"):
        path = getattr(spec, split)
        if path is not None and not path.is_file():
            raise ValueError(f"{where}: {split} file {path} does not exist")


def resolve_path(path: Path, info: ValidationInfo) -> Path:
    """Make a path absolute against the validation context's base_dir (if any)."""
    path = path.expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path.absolute()
