"""The one map between recipe dtype names and torch dtypes, used by merging and scoring."""

from __future__ import annotations

from typing import Literal, get_args

import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = dict(
    zip(get_args(DtypeName), (torch.float32, torch.bfloat16, torch.float16), strict=True)
)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a recipe dtype name (a torch dtype is returned as it is)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The recipe name of a torch dtype; ValueError for one recipes cannot name."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no recipe name; use one of {sorted(DTYPES)}")


def known_dtype_name(name: object, default: str = "float32") -> str:
    """``name`` when it is a recipe dtype name, else ``default`` (for configs that say other)."""
    return name if isinstance(name, str) and name in DTYPES else default
