"""Fuzzed recipes end in a validation message or a valid run, never in an unexpected error.

Documents are a valid recipe mutated by hypothesis (keys deleted, unknown keys added, values
replaced by wrong types, huge or negative numbers, NaN, nested structures, a list where a
mapping belongs), or YAML text damaged as bytes (duplicate keys, non-UTF-8 bytes, deep nesting,
cut short). ``mergekit-sae evolve`` runs them in this process through the CLI funnel; the
search itself is replaced by a stub (everything before it, inputs, tasks, output folder and
evaluator, is real), so a valid document costs a model load, not a run. A failure must be the
package's one-line ``error:`` (never the funnel's "unexpected error") and must leave nothing in
OUT/. The same holds for ``sae_evolve`` parameters in MergeKit recipes run by ``mergekit-yaml``
(the run guard's message, or a merge) and for damaged JSONL task files (file and line named).
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from evolve_fixtures import recipe_data, task_files, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_sae import cli
from mergekit_sae import run as runner
from mergekit_sae.driver.checkpoint import RunState
from mergekit_sae.errors import MergekitSaeError

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = 200
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2**63, -(2**63), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "cpu", "cuda:7", "float16", "sae", "pso", "zero_count", "\x00"]),
)
VALUES = st.recursive(
    LEAF,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


def paths(document: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every place in a nested document (mapping keys and list positions)."""
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from paths(value, (*prefix, index))


def at(document: Any, path: tuple) -> Any:
    for part in path:
        document = document[part]
    return document


@st.composite
def mutated(draw, valid: dict) -> dict:
    """The valid document with one to four mutations applied."""
    document = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 4))):
        places = list(paths(document))
        place = draw(st.sampled_from(places))
        kind = draw(st.sampled_from(["delete", "add", "replace", "listify", "nest"]))
        if not place:
            if kind == "add":
                document[draw(st.text(max_size=8))] = draw(VALUES)
            continue
        parent, last = at(document, place[:-1]), place[-1]
        target = parent[last]
        if kind == "delete":
            del parent[last]
        elif kind == "add" and isinstance(target, dict):
            target[draw(st.sampled_from(["extra", "seed", "type", "s_max", ""]))] = draw(VALUES)
        elif kind == "listify":
            parent[last] = [target] if not isinstance(target, dict) else list(target.items())
        elif kind == "nest":
            for _ in range(draw(st.integers(1, 40))):
                target = {"x": target} if draw(st.booleans()) else [target]
            parent[last] = target
        else:
            parent[last] = draw(VALUES)
    return document


def damage(text: str, how: str, where: int) -> bytes:
    """YAML text damaged as bytes."""
    lines = text.splitlines(keepends=True)
    position = where % max(1, len(text))
    if how == "duplicate":
        line = lines[where % len(lines)]
        return "".join(lines[: where % len(lines)] + [line] + lines[where % len(lines) :]).encode()
    if how == "bytes":
        raw = text.encode()
        return raw[:position] + b"\xff\xfe\xc3" + raw[position:]
    if how == "deep":
        depth = 100 + where % 1200  # PyYAML is slow near its recursion limit
        return (text + "extra: " + "[" * depth + "]" * depth + "\n").encode()
    if how == "cut":
        return text.encode()[:position]
    return text.encode() + b"\t: :\n  - ]\n"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz")
    parents = [tiny_llama(root / "p0", 40), tiny_llama(root / "p1", 41)]
    data = recipe_data(parents, task_files(root / "data"), steps=2)
    data["sae"] = {
        "archive_size": 3,
        "children_per_step": 2,
        "schedule": {"s_min": 0.1, "s_max": 0.5, "t0": 2, "t_mult": 1},
        "merge": {"sparsity_weight": 1.0},
    }
    data["sparsity_measure"] = "zero_count"
    data["seed"] = 3
    return data


@pytest.fixture
def stub_search(monkeypatch) -> list[Path]:
    """Replace the search by a stub that records the folders it was handed."""
    reached: list[Path] = []

    def evolve(ctx, state=None, **_):
        reached.append(ctx.out)
        return state or RunState(recipe=ctx.recipe.digest_fields())

    monkeypatch.setattr(runner, "evolve", evolve)
    return reached


class Findings:
    """Documents that ended in an unexpected error (the tests fail listing them)."""

    def __init__(self) -> None:
        self.tried = 0
        self.valid = 0
        self.bad: list[str] = []


def check_outcome(result, out: Path, reached: list[Path], findings: Findings, label: str) -> None:
    """A valid run (exit 0, search reached) or one `error:` message with OUT/ untouched."""
    findings.tried += 1
    text = result.output
    if result.exit_code == 0:
        assert reached and reached[-1] == out, text
        findings.valid += 1
        return
    clean = (
        isinstance(result.exception, SystemExit)
        and result.exit_code in (1, 2)
        and "unexpected error" not in text
        and "Traceback" not in text
        and (text.startswith("error: ") or "Usage:" in text)
    )
    if not clean:
        findings.bad.append(f"{label}: exit {result.exit_code}: {text.strip()[:300]}")
    assert not out.exists() or not any(out.iterdir()), f"{label}: OUT/ written: {text}"


def invoke_evolve(raw: bytes) -> tuple[Any, Path]:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    recipe, out = folder / "recipe.yml", folder / "out"
    recipe.write_bytes(raw)
    result = CliRunner().invoke(cli.main, ["evolve", str(recipe), str(out), "-q"])
    return result, out


def test_mutated_evolve_recipes_end_in_a_message_or_a_run(valid, stub_search) -> None:
    findings = Findings()

    @SETTINGS
    @given(document=mutated(valid))
    def one(document: dict) -> None:
        text = yaml.safe_dump(document, allow_unicode=True)
        result, out = invoke_evolve(text.encode())
        check_outcome(result, out, stub_search, findings, repr(document)[:400])

    one()
    print(f"\nevolve recipes fuzzed: {findings.tried}, valid runs {findings.valid}")
    assert not findings.bad, "\n".join(findings.bad)
    assert findings.valid > 0


def test_damaged_recipe_text_ends_in_a_message_or_a_run(valid, stub_search) -> None:
    findings = Findings()
    text = yaml.safe_dump(valid)

    @settings(SETTINGS, max_examples=100)
    @given(
        how=st.sampled_from(["duplicate", "bytes", "deep", "cut", "junk"]),
        where=st.integers(0, 10**6),
    )
    def one(how: str, where: int) -> None:
        result, out = invoke_evolve(damage(text, how, where))
        check_outcome(result, out, stub_search, findings, f"{how}@{where}")

    one()
    print(f"\ndamaged recipe texts: {findings.tried}, valid runs {findings.valid}")
    assert not findings.bad, "\n".join(findings.bad)


def test_a_duplicate_key_is_named_with_its_line(valid, stub_search) -> None:
    text = yaml.safe_dump(valid)
    result, out = invoke_evolve((text + "seed: 4\n").encode())
    assert result.exit_code == 1
    assert "duplicate key 'seed'" in result.output and "line" in result.output
    assert not out.exists()


def test_non_utf8_recipe_is_a_message_naming_the_file(valid, stub_search) -> None:
    result, out = invoke_evolve(b"models: [\xff]\n")
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "UTF-8" in result.output
    assert "recipe.yml" in result.output and not out.exists()


# --- JSONL task files ---------------------------------------------------------------------

BAD_LINES = {
    "not json": "{not json",
    "missing key": json.dumps({"prompt": "Q: 1 A:"}),
    "wrong type": json.dumps({"prompt": "Q: 1 A:", "choices": "red", "label": 0}),
    "array": json.dumps([1, 2]),
    "nan label": '{"prompt": "Q: 1 A:", "choices": ["red", "blue"], "label": NaN}',
    "label range": json.dumps({"prompt": "Q: 1 A:", "choices": ["red", "blue"], "label": 9}),
    "bool label": json.dumps({"prompt": "Q: 1 A:", "choices": ["red", "blue"], "label": True}),
    "deep": "[" * 100000 + "]" * 100000,
    "bytes": b"\xff\xfe{}".decode("latin-1"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
@pytest.mark.parametrize("line", [1, 3])
def test_a_bad_jsonl_line_is_named_by_file_and_line(valid, stub_search, tmp_path, kind, line):
    good = Path(valid["tasks"][0]["train"]).read_text().splitlines()
    lines = good[:3]
    lines.insert(line - 1, BAD_LINES[kind])
    data_file = tmp_path / "train.jsonl"
    encoded = "\n".join(lines) + "\n"
    data_file.write_bytes(encoded.encode("latin-1" if kind == "bytes" else "utf-8"))
    document = copy.deepcopy(valid)
    document["tasks"][0]["train"] = str(data_file)
    result, out = invoke_evolve(yaml.safe_dump(document).encode())
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and "unexpected" not in result.output
    assert f"{data_file}:{line}:" in result.output
    assert not out.exists()


def test_an_empty_jsonl_file_is_named(valid, stub_search, tmp_path) -> None:
    data_file = tmp_path / "empty.jsonl"
    data_file.write_text("\n\n")
    document = copy.deepcopy(valid)
    document["tasks"][1]["test"] = str(data_file)
    result, out = invoke_evolve(yaml.safe_dump(document).encode())
    assert result.exit_code == 1
    assert str(data_file) in result.output and "no items" in result.output
    assert not out.exists()


# --- sae_evolve parameters in MergeKit recipes --------------------------------------------


@pytest.fixture(scope="module")
def merge_recipe(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz_merge")
    parents = [tiny_llama(root / "p0", 50), tiny_llama(root / "p1", 51)]
    return {
        "merge_method": "sae_evolve",
        "models": [
            {"model": str(parents[0]), "parameters": {"score": 0.4, "density": 0.8}},
            {"model": str(parents[1]), "parameters": {"score": 0.6}},
        ],
        "parameters": {
            "sparsity_weight": 1.0,
            "sparsity_measure": "zero_count",
            "sparsity_scope": "local",
            "renormalize": True,
        },
        "dtype": "float32",
    }


@st.composite
def mutated_parameters(draw, recipe: dict) -> dict:
    """The recipe with its parameters blocks mutated (values, unknown names, deletions)."""
    document = copy.deepcopy(recipe)
    blocks = [document["parameters"]] + [m["parameters"] for m in document["models"]]
    names = ["score", "density", "global_sparsity", "sparsity_weight", "sparsity_measure",
             "sparsity_scope", "renormalize", "prune_target", "offspring_density", "redense",
             "unknown", "weight"]  # fmt: skip
    for _ in range(draw(st.integers(1, 3))):
        block = draw(st.sampled_from(blocks))
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["set", "delete", "gradient", "filter"]))
        if kind == "delete":
            block.pop(name, None)
        elif kind == "gradient":
            block[name] = draw(st.lists(LEAF, min_size=1, max_size=4))
        elif kind == "filter":
            block[name] = [{"filter": draw(st.sampled_from(["mlp", "self_attn", ""])),
                            "value": draw(LEAF)}, {"value": draw(LEAF)}]  # fmt: skip
        else:
            block[name] = draw(VALUES)
    return document


def is_ours(error: BaseException) -> bool:
    """Whether an exception was raised inside this package's code."""
    traceback = error.__traceback__
    last = None
    while traceback is not None:
        last = traceback.tb_frame.f_code.co_filename
        traceback = traceback.tb_next
    return last is not None and "mergekit_sae" in last


def test_mutated_sae_evolve_parameters_end_in_the_guard_message_or_a_merge(merge_recipe):
    import mergekit.scripts.run_yaml as run_yaml
    import pydantic

    assert getattr(run_yaml.run_merge, "_mergekit_sae_guarded", False)
    findings = Findings()
    merged = []

    @settings(SETTINGS, max_examples=100)
    @given(document=mutated_parameters(merge_recipe))
    def one(document: dict) -> None:
        findings.tried += 1
        folder = Path(tempfile.mkdtemp(prefix="fuzz-merge-"))
        recipe, out = folder / "recipe.yml", folder / "out"
        recipe.write_text(yaml.safe_dump(document))
        result = CliRunner().invoke(run_yaml.main, [str(recipe), str(out), "--lazy-unpickle"])
        error = result.exception
        if error is None or (isinstance(error, SystemExit) and error.code == 0):
            assert (out / "config.json").is_file()
            merged.append(out)
            return
        if isinstance(error, MergekitSaeError) or (
            isinstance(error, pydantic.ValidationError) and not is_ours(error)
        ):
            assert not out.exists(), result.output
            return
        where = "ours" if is_ours(error) else "MergeKit's"
        findings.bad.append(f"{where} {error!r} for {document['parameters']} {document['models']}")

    one()
    print(f"\nsae_evolve parameter sets fuzzed: {findings.tried}, merges {len(merged)}")
    assert not findings.bad, "\n".join(findings.bad[:20])
    assert merged
