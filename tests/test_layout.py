"""The package's dependency rule, checked on its imports: no cycle, no import from a lower layer
to a higher one (docs/architecture.md states the layers)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import mergekit_sae

PACKAGE = Path(mergekit_sae.__file__).parent

# Lowest first. A module may import modules of its own layer's part and of lower layers only.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "faults", "dtypes", "domains", "parallel"),
    ("atomic", "sparsity", "records", "plugins", "weight_files"),
    ("methods",),
    ("evaluate",),
    ("merging",),
    ("calibration",),
    ("search",),
    ("recipe",),
    ("driver",),
    ("outputs",),
    ("run",),
    ("compare", "landscape", "testbed"),
    ("cli", "_hook"),
]


def part_of(module: str) -> str:
    """The part a module belongs to: ``mergekit_sae.driver.loop`` -> ``driver``."""
    return module.split(".")[1] if "." in module else module


def layer_of(part: str) -> int:
    """The index of a part's layer."""
    for index, parts in enumerate(LAYERS):
        if part in parts:
            return index
    raise AssertionError(f"part {part!r} is in no layer of LAYERS: add it")


def module_name(path: Path) -> str:
    """``mergekit_sae/driver/loop.py`` -> ``mergekit_sae.driver.loop``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) of every import of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name`, pkg
            names = [
                f"{node.module}.{alias.name}"
                if is_module(f"{node.module}.{alias.name}")
                else node.module
                for alias in node.names
            ]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("mergekit_sae.") and is_module(name):
                yield name, node.lineno, id(node) in local


def is_module(name: str) -> bool:
    """Whether a dotted name is a module or package of mergekit_sae (not a name in one)."""
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative).is_dir()


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level."""
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        edges[module_name(path)] = {name for name, _, inside in imports(path) if not inside}
    return edges


def test_every_part_has_a_layer() -> None:
    parts = {part_of(module_name(p)) for p in PACKAGE.rglob("*.py")} - {"mergekit_sae"}
    for part in parts:
        layer_of(part)


def test_no_import_runs_up_a_layer_or_across_a_layer() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        if source == "mergekit_sae":
            continue
        for target, line, _ in imports(path):
            here, there = part_of(source), part_of(target)
            if here == there:
                continue
            if layer_of(there) >= layer_of(here):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} -> {target}")
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def cycles_of(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles a depth-first walk meets, each as a closed path of modules."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target in edges and state.get(target) is None:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycle() -> None:
    cycles = cycles_of(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_catch_what_they_claim_to(tmp_path: Path) -> None:
    """The checks themselves: an upward import and a two-module cycle are found."""
    assert layer_of("driver") > layer_of("search") > layer_of("merging")
    assert part_of("mergekit_sae.search.sae") == "search" and part_of("mergekit_sae.run") == "run"
    upward = tmp_path / "m.py"
    upward.write_text("def f():\n    from mergekit_sae.driver import loop\n")
    assert [(n, inside) for n, _, inside in imports(upward)] == [("mergekit_sae.driver.loop", True)]
    assert cycles_of({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles_of({"a": {"b"}, "b": set()}) == []
