"""Task data: JSONL item files, their validation, and seeded subsampling."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from mergekit_sae.errors import TaskDataError
from mergekit_sae.evaluate import registry
from mergekit_sae.evaluate.registry import JsonKind

T = TypeVar("T")


def load_jsonl(path: str | Path, task_type: str | None = None) -> list[dict[str, Any]]:
    """Read one item per non-blank line; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"task data file {path} does not exist")
    items = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskDataError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                    f"{e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            except RecursionError:
                raise TaskDataError(f"{path}:{lineno}: JSON nested too deeply") from None
            if task_type is not None:
                problem = item_problem(item, task_type)
                if problem:
                    raise TaskDataError(f"{path}:{lineno}: {problem}")
            items.append(item)
    if not items:
        raise TaskDataError(f"task data file {path} holds no items")
    return items


def item_problem(item: Any, type_name: str) -> str | None:
    """Describe what is wrong with one item for a task type, or None when it is valid.

    The keys and their JSON types come from the type's registry entry, then its own item check.
    """
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    kind = registry.task_type(type_name)
    for key, json_kind in kind.item_keys.items():
        if key not in item:
            return f"missing key {key!r} (a {type_name} item needs {sorted(kind.item_keys)})"
        value = item[key]
        if not isinstance(value, json_kind) or isinstance(value, bool):
            return f"key {key!r} has type {type(value).__name__}, expected {_kind_name(json_kind)}"
    return kind.check_item(item) if kind.check_item is not None else None


def _kind_name(kind: JsonKind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def subsample(items: Sequence[T], n: int | None, seed: int) -> list[T]:
    """Draw n items without replacement, deterministically from seed; all items when n is None.

    The draw keeps the items' original order, so the same seed gives the same list.
    """
    if n is None or n >= len(items):
        return list(items)
    if n < 0:
        raise ValueError(f"subsample size must be >= 0, got {n}")
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]
