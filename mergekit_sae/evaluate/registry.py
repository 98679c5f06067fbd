"""The registry of task types: each type is one module that registers itself here.

A :class:`TaskType` names the type, the settings model of its own options (a
:class:`TaskSettings` subclass), the keys every JSONL item needs (none: its items come from
elsewhere, as for ``lm_eval``), and the class that scores it.
:class:`~mergekit_sae.evaluate.spec.TaskSpec` validation and
:func:`~mergekit_sae.evaluate.tasks.load_task` only read this registry, so a new task type is
one new module and no other edit.

The built-in types (``exact_match``, ``text_match``, ``multiple_choice``, ``lm_eval_task``)
register when ``mergekit_sae.evaluate`` is imported, which any import of one of its modules does
first.

This module imports no other module of the package except its error types, so type modules
import it freely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict

from mergekit_sae.errors import PluginError

JsonKind = type | tuple[type, ...]


class TaskSettings(BaseModel):
    """Base of every task type's settings model: its own options, beside the general fields.

    Subclasses declare each option as a field with its default, constraints and description.
    A validator's ``ValueError`` should name its option: its message is shown as written.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class TaskType:
    """One task type: its name, the settings model of its options, its JSONL keys, its scorer.

    ``check_item(item)`` returns what is wrong with an item beyond its keys' JSON types (or
    None).
    """

    name: str
    task_class: Callable[[Any], Any]
    settings_model: type[TaskSettings] = TaskSettings
    item_keys: Mapping[str, JsonKind] = field(default_factory=dict)
    check_item: Callable[[dict[str, Any]], str | None] | None = None

    @property
    def options(self) -> tuple[str, ...]:
        """The names of the type's own options, in declaration order."""
        return tuple(self.settings_model.model_fields)

    @property
    def reads_jsonl(self) -> bool:
        """True when items come from the spec's `train:`/`test:` JSONL files."""
        return bool(self.item_keys)


_REGISTRY: dict[str, TaskType] = {}


def register_task_type(kind: TaskType) -> TaskType:
    """Add a task type; a name registered twice is an error (as in MergeKit's method registry).

    The same object registered again (a module imported twice) is accepted.
    """
    model = kind.settings_model
    if not (isinstance(model, type) and issubclass(model, TaskSettings)):
        raise PluginError(
            f"task type {kind.name!r}: settings_model must be a subclass of "
            f"mergekit_sae.evaluate.TaskSettings, got {model!r}"
        )
    if kind.name in _REGISTRY and _REGISTRY[kind.name] is not kind:
        raise PluginError(f"task type {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def task_type(name: str) -> TaskType:
    """The registered task type of that name; an unknown name lists the known ones."""
    kinds = task_types()
    if name not in kinds:
        raise ValueError(f"unknown task type {name!r}; known types: {', '.join(sorted(kinds))}")
    return kinds[name]


def task_types() -> Mapping[str, TaskType]:
    """Every registered task type by name, in registration order (a read-only view)."""
    return MappingProxyType(_REGISTRY)
