"""Plug-ins from other packages, found through entry points (as pytest finds its plug-ins).

A package extends mergekit-sae by declaring entry points in its own ``pyproject.toml``::

    [project.entry-points."mergekit_sae.searches"]
    my_search = "my_package.search:MySearch"           # a Search subclass

    [project.entry-points."mergekit_sae.merge_methods"]
    my_method = "my_package.method:my_method"          # a MergeKit MergeMethod

    [project.entry-points."mergekit_sae.commands"]
    my-command = "my_package.cli:my_command"           # a click command

    [project.entry-points."mergekit_sae.task_types"]
    my_task = "my_package.task:TASK_TYPE"              # an evaluate TaskType

Each group's registry reads its entry points once, on first use, and loads an entry point only
when its object is needed. A plug-in that fails to load is reported with its entry point and
the distribution that declares it.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from mergekit_sae.errors import PluginError

SEARCHES = "mergekit_sae.searches"
MERGE_METHODS = "mergekit_sae.merge_methods"
COMMANDS = "mergekit_sae.commands"
TASK_TYPES = "mergekit_sae.task_types"


@cache
def declared(group: str) -> tuple[EntryPoint, ...]:
    """The entry points of a group, in a stable order (by name, then value)."""
    return tuple(sorted(entry_points(group=group), key=lambda e: (e.name, e.value)))


def describe(entry: EntryPoint) -> str:
    """An entry point as errors name it: its line, its group and the distribution declaring it."""
    dist = entry.dist
    source = "an unknown distribution" if dist is None else f"{dist.name} {dist.version}"
    return f"entry point '{entry.name} = {entry.value}' ({entry.group}) of {source}"


def load(entry: EntryPoint) -> Any:
    """The object an entry point names; PluginError naming it when it does not load."""
    try:
        return entry.load()
    except Exception as error:  # any failure of third-party code is reported the same way
        raise PluginError(
            f"{describe(entry)} failed to load: {type(error).__name__}: {error}"
        ) from error


def forget() -> None:
    """Read the entry points again on next use (after installing a plug-in in a process)."""
    declared.cache_clear()
