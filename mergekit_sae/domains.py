"""Parameter domains, declared once: the ``sae_evolve``/``sae_prune`` kernels' signatures (which
MergeKit validates with pydantic), the evolve recipe's models and the plain-Python API use these
aliases, and :func:`domain_problem` words a violation the same way everywhere.

Imports only pydantic, so recipe validation does not need torch.
"""

from __future__ import annotations

from functools import cache
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import Field, TypeAdapter, ValidationError

SparsityMeasure = Literal["zero_count", "magnitude"]
SparsityScope = Literal["local", "global"]
PruneTarget = Literal["weights", "delta"]
Redense = Literal["parents", "original"]

Density = Annotated[float, Field(gt=0.0, le=1.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Score = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]
CycleLength = Annotated[int, Field(ge=1)]


def choices(alias: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` alias."""
    return tuple(get_args(alias))


@cache
def _adapter(alias: Any) -> TypeAdapter:
    """A cached pydantic validator for an alias."""
    return TypeAdapter(alias)


def _constraints(alias: Any) -> list[Any]:
    """The annotated-types constraints attached to an ``Annotated`` alias."""
    if get_origin(alias) is not Annotated:
        return []
    found = []
    for meta in get_args(alias)[1:]:
        found += [m for m in getattr(meta, "metadata", [meta])]
    return found


def describe(alias: Any) -> str:
    """The domain in words: ``one of a, b``, ``in (0, 1]``, ``a finite number >= 0``."""
    if get_origin(alias) is Literal:
        return "one of " + ", ".join(map(str, choices(alias)))
    if get_origin(alias) in (Union, UnionType):
        return " or ".join(describe(a) for a in get_args(alias) if a is not type(None))
    if isinstance(alias, type):
        return f"a {alias.__name__}"
    found = _constraints(alias)
    low = next((f"{'(' if isinstance(c, Gt) else '['}{_num(c)}" for c in found if _low(c)), None)
    high = next((f"{_num(c)}{')' if isinstance(c, Lt) else ']'}" for c in found if _high(c)), None)
    finite = any(getattr(c, "allow_inf_nan", None) is False for c in found)
    prefix = "a finite number " if finite else ""
    if low and high:
        return f"{prefix}in {low}, {high}"
    if low:
        return f"{prefix}{'>' if low[0] == '(' else '>='} {low[1:]}"
    if high:
        return f"{prefix}{'<' if high[-1] == ')' else '<='} {high[:-1]}"
    return prefix.strip() or describe(get_args(alias)[0])


def _low(constraint: Any) -> bool:
    """Whether a constraint is a lower bound."""
    return isinstance(constraint, (Gt, Ge))


def _high(constraint: Any) -> bool:
    """Whether a constraint is an upper bound."""
    return isinstance(constraint, (Lt, Le))


def _num(constraint: Any) -> str:
    """A bound's value as written by a person (0, not 0.0)."""
    value = next(getattr(constraint, k) for k in ("gt", "ge", "lt", "le") if hasattr(constraint, k))
    return str(int(value)) if float(value).is_integer() else str(value)


def domain_problem(alias: Any, value: Any, field: str) -> str | None:
    """None when ``value`` is in the domain, else ``unknown field 'x'; expected one of ...`` or
    ``field must be in (0, 1], got 1.5``."""
    try:
        _adapter(alias).validate_python(value)
    except ValidationError:
        if get_origin(alias) is Literal:
            return f"unknown {field} {value!r}; expected {describe(alias)}"
        return f"{field} must be {describe(alias)}, got {value!r}"
    return None


def check_domain(alias: Any, value: Any, field: str, where: str | None = None) -> None:
    """Raise ValueError (prefixed ``where: ``, e.g. the tensor name) when ``value`` is outside."""
    problem = domain_problem(alias, value, field)
    if problem is not None:
        raise ValueError(f"{where}: {problem}" if where else problem)


def check_schedule(s_min: float, s_max: float, t0: int, t_mult: int) -> None:
    """The cyclic schedule's rule, shared by ``cyclic_rate`` and the recipe's ``Schedule``."""
    for alias, value, field in (
        (Rate, s_min, "s_min"),
        (Rate, s_max, "s_max"),
        (CycleLength, t0, "t0"),
        (CycleLength, t_mult, "t_mult"),
    ):
        check_domain(alias, value, field)
    if s_min > s_max:
        raise ValueError(
            f"s_min ({s_min}) is larger than s_max ({s_max}); need s_min <= s_max "
            "(the rate rises from s_min to s_max)"
        )
