"""Per-tensor parameter values written as MergeKit conditional parameters (``filter:`` lists).

A search that gives each layer its own weight (CMA-ES) or splits a model at a layer boundary
(M2N2) records the values as MergeKit writes them in YAML: a list of ``{filter, value}``
entries, the first entry whose filter is a substring of the tensor name wins, an entry
without a filter is the default. The driver resolves them per tensor exactly as MergeKit's
``evaluate_setting`` does, so a recorded stage rebuilds bit for bit with ``mergekit-yaml``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer index of a tensor name (``model.layers.3.mlp...`` -> 3), or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def is_conditional(setting: Any) -> bool:
    """Whether a parameter value is a list of ``{filter, value}`` entries."""
    return (
        bool(setting)
        and isinstance(setting, list)
        and all(isinstance(entry, Mapping) for entry in setting)
    )


def resolve(setting: Any, name: str) -> Any:
    """The value a setting takes for one tensor (MergeKit's first-matching-filter rule)."""
    if not is_conditional(setting):
        return setting
    for entry in setting:
        pattern = entry.get("filter")
        if pattern is None or pattern == "*" or pattern in name:
            return resolve(entry["value"], name)
    raise ValueError(f"tensor {name!r}: no filter of {setting!r} matches and none is a default")


def resolve_parameters(parameters: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Shared and per-model parameters of a merge, each resolved for one tensor."""
    resolved: dict[str, Any] = {}
    for key, value in parameters.items():
        if isinstance(value, Mapping):
            resolved[key] = {k: resolve(v, name) for k, v in value.items()}
        else:
            resolved[key] = resolve(value, name)
    return resolved


def conditional(values: Mapping[str, float]) -> Any:
    """The shortest filter list giving each tensor its value (a plain value when all agree).

    Tensors of a layer that share one value get one ``layers.N.`` filter; other tensors get
    their full name as filter; the most common value is the default entry.
    """
    distinct = set(values.values())
    if len(distinct) == 1:
        return next(iter(distinct))
    default = Counter(values.values()).most_common(1)[0][0]
    by_layer: dict[int, set[float]] = {}
    for name, value in values.items():
        layer = layer_of(name)
        if layer is not None:
            by_layer.setdefault(layer, set()).add(value)
    entries = []
    for name, value in values.items():
        layer = layer_of(name)
        if layer is not None and len(by_layer[layer]) == 1:
            continue
        if value != default:
            entries.append({"filter": _exact_filter(name, values), "value": value})
    for layer, layer_values in sorted(by_layer.items()):
        if len(layer_values) == 1 and (value := next(iter(layer_values))) != default:
            entries.append({"filter": f"layers.{layer}.", "value": value})
    return [*entries, {"value": default}]


def _exact_filter(name: str, names: Sequence[str] | Mapping[str, Any]) -> str:
    """A tensor's full name as a filter; refused when it is part of another tensor's name."""
    clashes = [other for other in names if other != name and name in other]
    if clashes:
        raise ValueError(
            f"tensor {name!r} is part of the name {clashes[0]!r}, so no MergeKit filter selects "
            "it alone"
        )
    return name


def layer_groups(names: Sequence[str], granularity: int) -> list[list[str]]:
    """Tensors in groups of ``granularity`` consecutive layers, then one group of the rest.

    ``granularity`` 0 puts every tensor in one group.
    """
    if granularity <= 0:
        return [list(names)]
    layers = sorted({layer for name in names if (layer := layer_of(name)) is not None})
    groups: dict[int, list[str]] = {}
    rest = []
    for name in names:
        layer = layer_of(name)
        if layer is None:
            rest.append(name)
        else:
            groups.setdefault(layers.index(layer) // granularity, []).append(name)
    ordered = [groups[key] for key in sorted(groups)]
    return [*ordered, rest] if rest else ordered
