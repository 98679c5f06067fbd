"""The searches behind the shared driver, one module each; a recipe picks one with ``search:``.

The registry holds the built-in searches and every search another package declares in the
entry-point group ``mergekit_sae.searches`` (``name = "package.module:SearchClass"``; see
:mod:`mergekit_sae.plugins`), or registers with :func:`register_search`. Recipe validation,
``compare --methods`` and the help texts read names from here only. Modules are imported only
when their search is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mergekit_sae import plugins

if TYPE_CHECKING:
    from mergekit_sae.search.base import Search

# name -> "module:class" of the built-in searches
BUILT_IN: dict[str, str] = {
    "sae": "mergekit_sae.search.sae:SaeSearch",
    "pso": "mergekit_sae.search.pso:PsoSearch",
    "m2n2": "mergekit_sae.search.m2n2:M2n2Search",
    "cmaes": "mergekit_sae.search.cmaes:CmaesSearch",
    "oneshot": "mergekit_sae.search.oneshot:OneShotSearch",
}
_REGISTERED: dict[str, type[Search]] = {}


def register_search(name: str, search: type[Search]) -> None:
    """Add a search under ``name``; a name taken by another search is an error."""
    known = search_names()
    if name in known and _REGISTERED.get(name) is not search:
        raise ValueError(f"search {name!r} is already registered")
    _REGISTERED[name] = search


def search_names() -> list[str]:
    """Every registered search name: built-in, then plug-ins, then registered in-process."""
    names = [*BUILT_IN, *(entry.name for entry in plugins.declared(plugins.SEARCHES))]
    return list(dict.fromkeys([*names, *_REGISTERED]))


def search_class(name: str) -> type[Search]:
    """The search class registered under ``name``."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILT_IN:
        module_name, attribute = BUILT_IN[name].split(":")
        return getattr(importlib.import_module(module_name), attribute)
    for entry in plugins.declared(plugins.SEARCHES):
        if entry.name == name:
            return plugins.load(entry)
    raise ValueError(f"unknown search {name!r}; choose one of {', '.join(search_names())}")
