"""The searches behind the shared driver, one module each; a recipe picks one with ``search:``.

Adding a search means one module implementing :class:`~mergekit_sae.search.base.Search` and
one line in :data:`SEARCHES`. Modules are imported only when their search is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mergekit_sae.search.base import Search

# name -> "module:class"
SEARCHES: dict[str, str] = {
    "sae": "mergekit_sae.search.sae:SaeSearch",
    "pso": "mergekit_sae.search.pso:PsoSearch",
    "m2n2": "mergekit_sae.search.m2n2:M2n2Search",
    "cmaes": "mergekit_sae.search.cmaes:CmaesSearch",
    "oneshot": "mergekit_sae.search.oneshot:OneShotSearch",
}


def search_names() -> list[str]:
    """The registered search names."""
    return list(SEARCHES)


def search_class(name: str) -> type[Search]:
    """The search class registered under ``name``."""
    if name not in SEARCHES:
        raise ValueError(f"unknown search {name!r}; choose one of {', '.join(SEARCHES)}")
    module_name, attribute = SEARCHES[name].split(":")
    return getattr(importlib.import_module(module_name), attribute)
