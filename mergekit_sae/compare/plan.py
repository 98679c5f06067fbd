"""Which runs a comparison makes: methods x seeds (plus sweep variants), each a recipe.

Every search gets the same evaluation budget (default: what the recipe's SAE run uses) and
as many steps as it needs to spend it; a one-shot merge is one step and uses the
evaluations it needs. Seeds 0..n-1 replace the recipe's seed. A sweep ``field=v1,v2`` adds
SAE runs with one recipe field (dotted path: ``sae.schedule.t0``, ``sae.crossover``,
``sparsity_measure``) set to each value.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_sae.errors import UsageError
from mergekit_sae.search import search_names
from mergekit_sae.search.oneshot import SAE_ONESHOT, STATIC_MERGES

ONE_SHOTS = [*STATIC_MERGES, SAE_ONESHOT]
DEFAULT_METHODS = "sae,pso,m2n2,cmaes,linear,task_arithmetic,ties,dare_ties,sae_oneshot"


def searches() -> list[str]:
    """The registered searches a comparison can run (every one but the one-shot driver)."""
    return [name for name in search_names() if name != "oneshot"]


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: its row label, seed, and the recipe fields it overrides."""

    method: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """Where the run lives under OUT/: ``<method>/seed<k>``."""
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in self.method)
        return Path(safe) / f"seed{self.seed}"


def parse_methods(text: str) -> list[str]:
    """The comma-separated method list, checked against the known searches and merges."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = [*searches(), *ONE_SHOTS]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UsageError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise UsageError("--methods: a method is listed twice")
    return methods


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``field=v1,v2,...`` as the field path and the YAML-typed values."""
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise UsageError(f"--sweep {text!r}: expected FIELD=VALUE1,VALUE2,...")
    return name.strip(), [yaml.safe_load(v.strip()) for v in values.split(",")]


def set_field(data: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted field path in recipe data, creating blocks on the way."""
    *blocks, last = path.split(".")
    target = data
    for block in blocks:
        current = target.get(block)
        if current is None:
            current = target[block] = {}
        if not isinstance(current, dict):
            raise UsageError(f"--sweep {path}: {block} is not a block of the recipe")
        target = current
    target[last] = value


def plan_runs(methods: list[str], seeds: int, sweeps: list[tuple[str, list[Any]]]) -> list[RunSpec]:
    """Every run, method by method, seed by seed; sweep variants of SAE after the methods."""
    runs = [RunSpec(method, seed) for method in methods for seed in range(seeds)]
    for path, values in sweeps:
        for value in values:
            label = f"sae[{path}={value}]"
            runs += [RunSpec(label, seed, {path: value}) for seed in range(seeds)]
    return runs


def search_of(spec: RunSpec) -> str:
    """The search a run uses: its method, ``oneshot`` for merges, ``sae`` for sweeps."""
    if spec.method in ONE_SHOTS:
        return "oneshot"
    return spec.method if spec.method in searches() else "sae"


def run_recipe_data(base: dict[str, Any], spec: RunSpec, budget: int) -> dict[str, Any]:
    """The recipe data of one run: the base recipe with seed, search, budget and overrides."""
    data = copy.deepcopy(base)
    for path, value in spec.overrides.items():
        set_field(data, path, value)
    data["seed"] = spec.seed
    data["test_baselines"] = []
    data["keep_population"] = False
    search = search_of(spec)
    data["search"] = search
    if search == "oneshot":
        data["oneshot"] = {**(data.get("oneshot") or {}), "method": spec.method}
        data["steps"] = 1
        data.pop("budget", None)
    else:
        data["budget"] = budget
        data["steps"] = budget  # every step scores at least one model
    return data
