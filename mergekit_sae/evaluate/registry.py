"""The registry of task types: each type is one module that registers itself here.

A :class:`TaskType` names the type, the :class:`~mergekit_sae.evaluate.spec.TaskSpec` options
that are its own, the keys every JSONL item needs (none: its items come from elsewhere, as for
``lm_eval``), and the class that scores it. :class:`TaskSpec` validation and :func:`load_task`
only read this registry, so a new task type is one new module and no other edit.

This module imports no other module of the package, so type modules import it freely. The
built-in types (``exact_match``, ``text_match``, ``multiple_choice``, ``lm_eval_task``) register
when ``mergekit_sae.evaluate`` is imported, which any import of one of its modules does first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

JsonKind = type | tuple[type, ...]


@dataclass(frozen=True)
class TaskType:
    """One task type: its name, its own spec options, its JSONL keys and its scorer class.

    ``check_item(item)`` returns what is wrong with an item beyond its keys' JSON types (or
    None); ``check_spec(spec)`` raises ``ValueError`` for type-specific spec errors (the message
    is prefixed with the task and type by the caller).
    """

    name: str
    task_class: Callable[[Any], Any]
    options: tuple[str, ...] = ()
    item_keys: Mapping[str, JsonKind] = field(default_factory=dict)
    check_item: Callable[[dict[str, Any]], str | None] | None = None
    check_spec: Callable[[Any], None] | None = None

    @property
    def reads_jsonl(self) -> bool:
        """True when items come from the spec's `train:`/`test:` JSONL files."""
        return bool(self.item_keys)


_REGISTRY: dict[str, TaskType] = {}


def register_task_type(kind: TaskType) -> TaskType:
    """Add a task type; a name registered twice is an error (as in MergeKit's method registry).

    Its options must be fields of TaskSpec; a spec of a type naming other options is rejected.
    """
    if kind.name in _REGISTRY and _REGISTRY[kind.name] is not kind:
        raise ValueError(f"task type {kind.name!r} is already registered")
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
