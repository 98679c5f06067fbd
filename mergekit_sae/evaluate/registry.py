"""The registry of task types: each type is one module that registers itself here.

A :class:`TaskType` names the type, the settings model of its own options (a
:class:`TaskSettings` subclass), the keys every JSONL item needs (none: its items come from
elsewhere, as for ``lm_eval``), and the class that scores it.
:class:`~mergekit_sae.evaluate.spec.TaskSpec` validation and
:func:`~mergekit_sae.evaluate.tasks.load_task` only read this registry, so a new task type is
one new module and no other edit.

The built-in types (``exact_match``, ``text_match``, ``multiple_choice``, ``lm_eval_task``)
register when ``mergekit_sae.evaluate`` is imported, which any import of one of its modules does
first. Types of other distributions are found through the entry-point group
``mergekit_sae.task_types``: each entry point is named after its type and its value names a
:class:`TaskType` object (``word_count = my_tasks.word_count:TASK_TYPE``). They are loaded once,
the first time the registry is read (:func:`task_type`, :func:`task_types`).

This module imports no other module of the package except the error types and the plug-in
loader (:mod:`mergekit_sae.plugins`), so type modules import it freely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict

from mergekit_sae import plugins
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
_OWNERS: dict[str, str] = {}
_plugins_loaded = False


def register_task_type(kind: TaskType, *, owner: str | None = None) -> TaskType:
    """Add a task type; a name registered twice is an error naming both owners.

    ``owner`` says where the type comes from in errors (default: its scorer's module). The
    same object registered again (a module imported twice) is accepted.
    """
    model = kind.settings_model
    if not (isinstance(model, type) and issubclass(model, TaskSettings)):
        raise PluginError(
            f"task type {kind.name!r}: settings_model must be a subclass of "
            f"mergekit_sae.evaluate.TaskSettings, got {model!r}"
        )
    existing = _REGISTRY.get(kind.name)
    if existing is kind:
        return kind
    owner = owner or getattr(kind.task_class, "__module__", repr(kind.task_class))
    if existing is not None:
        raise PluginError(
            f"task type {kind.name!r} is already registered by {_OWNERS[kind.name]}; "
            f"{owner} registers it again"
        )
    _REGISTRY[kind.name] = kind
    _OWNERS[kind.name] = owner
    return kind


def task_type(name: str) -> TaskType:
    """The registered task type of that name; an unknown name lists the known ones."""
    kinds = task_types()
    if name not in kinds:
        raise ValueError(f"unknown task type {name!r}; known types: {', '.join(sorted(kinds))}")
    return kinds[name]


def task_types() -> Mapping[str, TaskType]:
    """Every registered task type by name, plug-ins included (a read-only view)."""
    load_plugins()
    return MappingProxyType(_REGISTRY)


def load_plugins() -> None:
    """Register the task types of the ``mergekit_sae.task_types`` entry points, once.

    A plug-in that fails leaves the plug-ins unloaded, so the next read fails the same way.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # a plug-in reading the registry while it loads sees the built-ins
    try:
        for entry_point in plugins.declared(plugins.TASK_TYPES):
            register_task_type(plugin_task_type(entry_point), owner=plugins.describe(entry_point))
    except PluginError:
        _plugins_loaded = False
        raise


def plugin_task_type(entry_point: EntryPoint) -> TaskType:
    """The TaskType an entry point names; a PluginError naming it and its distribution."""
    where = plugins.describe(entry_point)
    kind = plugins.load(entry_point)
    if not isinstance(kind, TaskType):
        raise PluginError(
            f"{where} names a {type(kind).__name__}, not a mergekit_sae.evaluate.TaskType"
        )
    if kind.name != entry_point.name:
        raise PluginError(f"{where} names task type {kind.name!r}; name the entry point after it")
    return kind
