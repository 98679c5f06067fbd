"""kill -9 and Ctrl-C at fault points spread over a run; ``--resume`` ends bit-identical.

One uninterrupted run (in this process, real JSONL tasks and the real resident evaluator)
records the order in which it reaches the fault points (``mergekit_sae.faults``). Twenty
moments are picked from that trace so that every point is tried at least once. They are
replayed as a few chains of subprocesses on one output folder each: the first process is
killed at the chain's first moment, each ``--resume`` is killed at the next moment, and a last
``--resume`` runs to the end. A resumed process repeats the run from its checkpoint, so the
arrival number of the next moment is counted in the reference trace from where that process
restarts. After every kill no file in OUT/ is truncated; at the end of a chain the model
equals the reference bit for bit and no temporary is left.

Each driver is its own process, killed for real, but forked from one helper process that has
imported torch, transformers and MergeKit once (a fresh interpreter per run would spend most of
its time importing them). The helper runs no torch code itself, so its children start clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from evolve_fixtures import assert_identical, recipe_data, task_files, tiny_llama
from safetensors import safe_open

from mergekit_sae import faults
from mergekit_sae.atomic import is_leftover
from mergekit_sae.driver.checkpoint import load_state
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import run

pytestmark = pytest.mark.usefixtures("one_thread")

KILLS = 20
CHAIN_LENGTH = 5
PNG_END = b"IEND\xaeB`\x82"
ENV = {
    **os.environ,
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    faults.ENV: "",
}


# A helper process: reads one JSON request per line (argv, env), forks a child that runs the
# CLI with them, and answers with the child's exit code (negative: killed by that signal).
FORK_SERVER = r"""
import json, os, sys
import mergekit_sae.cli, mergekit_sae.run, mergekit_sae.evaluate.resident
from mergekit_sae import faults
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.environ.update(request["env"])
        faults.reset()
        try:
            mergekit_sae.cli.main(request["argv"], prog_name="mergekit-sae")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])), flush=True)
"""


@pytest.fixture(scope="module")
def driver() -> Iterator[Callable[..., int]]:
    """Run ``mergekit-sae ARGV`` in a fresh process (forked); return its exit code."""
    server = subprocess.Popen(
        [sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=ENV, text=True,
    )  # fmt: skip

    def run_driver(*argv: str, fault: str = "") -> int:
        server.stdin.write(json.dumps({"argv": list(argv), "env": {faults.ENV: fault}}) + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    yield run_driver
    server.stdin.close()
    server.wait(timeout=60)


@dataclass
class Reference:
    recipe: Path
    out: Path
    trace: list[str]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """The uninterrupted run and the fault points it reached, in order."""
    root = tmp_path_factory.mktemp("faults")
    parents = [tiny_llama(root / "p0", 30, tied=True), tiny_llama(root / "p1", 31, tied=True)]
    data = recipe_data(
        parents,
        task_files(root / "data"),
        steps=2,
        sae={"archive_size": 3, "children_per_step": 2},
        test_baselines=[],
    )
    recipe = root / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    trace: list[str] = []
    original = faults.point
    faults.point = trace.append
    try:
        run(parse_recipe(data), root / "whole", progress=False)
    finally:
        faults.point = original
    return Reference(recipe, root / "whole", trace)


def restart(trace: list[str], killed_at: int) -> int | None:
    """Where in the trace a process resumed after a kill at ``killed_at`` starts (None: the
    checkpoint on disk is the finished one, so a resume does nothing)."""
    saved = [i for i in range(killed_at + 1) if trace[i] == "checkpoint.history"]
    if not saved:
        return 0
    done = next(i for i in range(saved[-1], len(trace)) if trace[i] == "checkpoint.saved")
    if "finish.state" in trace[: saved[-1]]:
        return None
    return done + 1


def arrival(trace: list[str], start: int, index: int) -> int:
    """The arrival number of trace[index] counted from ``start``."""
    return trace[start : index + 1].count(trace[index])


def pick_moments(trace: list[str], count: int) -> list[int]:
    """``count`` trace indices: every point at least once, the rest spread over the run."""
    chosen: set[int] = set()
    for number, name in enumerate(dict.fromkeys(trace)):
        places = [i for i, seen in enumerate(trace) if seen == name]
        chosen.add(places[(number * 7) % len(places)])
    spread = iter(round(k * (len(trace) - 1) / (4 * count)) for k in range(4 * count))
    while len(chosen) < count:
        chosen.add(next(spread))
    return sorted(chosen)[:count]


def chains(trace: list[str], moments: list[int], length: int) -> list[list[tuple[int, int]]]:
    """Split the moments (in trace order) into chains of (index, arrival) a process can reach.

    A moment joins a chain when the chain's last kill leaves a resume that reaches it (not
    after the finished checkpoint, not a rename counted twice by a journal's roll-forward).
    """
    open_chains: list[list[tuple[int, int]]] = []
    for index in moments:
        for chain in open_chains:
            last = chain[-1][0]
            start = restart(trace, last)
            repeated = trace[last] == trace[index] == "atomic.files.rename"
            reachable = start is not None and start <= index and index > last
            if len(chain) < length and reachable and not repeated:
                chain.append((index, arrival(trace, start, index)))
                break
        else:
            open_chains.append([(index, arrival(trace, 0, index))])
    return open_chains


def default_sigint() -> None:
    """Give the child the default SIGINT action, as a terminal's Ctrl-C finds it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mergekit_sae.cli", *arguments(recipe, out, *extra)]


def arguments(recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["evolve", str(recipe), str(out), "-q", *extra]


def assert_whole(out: Path) -> None:
    """No file of OUT/ (temporaries aside) is truncated: each parses as its format says."""
    for path in sorted(out.rglob("*")):
        if not path.is_file() or any(is_leftover(p) for p in path.relative_to(out).parts):
            continue
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    handle.get_tensor(key)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                json.loads(line)
        elif path.suffix in (".yml", ".yaml"):
            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif path.suffix == ".png":
            assert path.read_bytes().endswith(PNG_END), path
        elif path.name == "README.md":
            assert path.read_text(encoding="utf-8").startswith("---\n"), path


def assert_no_leftovers(out: Path) -> None:
    left = [p for p in out.rglob("*") if is_leftover(p.name) or p.name.endswith(".tmp")]
    assert not left, left


def assert_same_run(reference: Reference, out: Path) -> None:
    """Same model bits, same history and test report as the uninterrupted run."""
    assert_identical(reference.out, out)
    whole, resumed = load_state(reference.out), load_state(out)
    assert resumed is not None and resumed.finished
    drop = {"seconds"}
    assert [r.model_dump(exclude=drop) for r in resumed.history] == [
        r.model_dump(exclude=drop) for r in whole.history
    ]
    assert [r.model_dump() for r in resumed.results] == [r.model_dump() for r in whole.results]


def test_the_reference_run_reaches_every_fault_point(reference: Reference) -> None:
    assert set(reference.trace) == set(faults.POINTS)


def test_kill_at_twenty_moments_then_resume_is_bit_identical(
    reference: Reference, driver: Callable[..., int], tmp_path: Path
) -> None:
    trace = reference.trace
    plan = chains(trace, pick_moments(trace, KILLS), CHAIN_LENGTH)
    tried = identical = 0
    for number, chain in enumerate(plan):
        out = tmp_path / f"chain{number}"
        for position, (index, count) in enumerate(chain):
            extra = ("--resume",) if position else ()
            code = driver(
                *arguments(reference.recipe, out, *extra), fault=f"{trace[index]}:{count}"
            )
            assert code == -signal.SIGKILL, (trace[index], count, code)
            tried += 1
            assert_whole(out)
        assert driver(*arguments(reference.recipe, out, "--resume")) == 0
        assert_whole(out)
        assert_no_leftovers(out)
        assert_same_run(reference, out)
        identical += len(chain)
    print(
        f"\nkill points tried: {tried}; recoveries bit-identical: {identical}; chains {len(plan)}"
    )
    assert tried == identical == KILLS
    assert {trace[i] for chain in plan for i, _ in chain} == set(faults.POINTS)


def test_ctrl_c_prints_one_line_and_resume_is_bit_identical(
    reference: Reference, tmp_path: Path
) -> None:
    out = tmp_path / "interrupted"
    env = {**ENV, faults.ENV: "score:2:int"}
    done = subprocess.run(
        command(reference.recipe, out),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=default_sigint,  # a suite started in the background inherits SIGINT ignored
    )
    assert done.returncode == 130
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted; continue with --resume"
    assert done.stderr.count("interrupted") == 1
    assert done.stdout == ""
    assert load_state(out) is not None
    subprocess.run(command(reference.recipe, out, "--resume"), env=ENV, check=True, timeout=300)
    assert_no_leftovers(out)
    assert_same_run(reference, out)
