"""The error funnel of `mergekit-sae`: one `error:` line, exit codes, --debug for tracebacks."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from mergekit_sae import cli
from mergekit_sae.errors import RecipeError, UsageError

RAISED: dict[str, BaseException] = {}


@click.command("boom")
def boom() -> None:
    """Raise whatever the test put in RAISED."""
    raise RAISED["error"]


@pytest.fixture
def run(monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "boom", (f"{__name__}:boom", "raise"))

    def invoke(error: BaseException, *flags: str):
        RAISED["error"] = error
        return CliRunner().invoke(cli.main, [*flags, "boom"])

    return invoke


def test_a_known_error_is_one_line_and_exit_code_1(run):
    result = run(RecipeError("r.yml: steps: must be >= 1", file="r.yml", field="steps"))
    assert result.exit_code == 1
    assert result.output == "error: r.yml: steps: must be >= 1\n"


def test_a_usage_error_exits_with_2(run):
    result = run(UsageError("--resume and --force exclude each other"))
    assert result.exit_code == 2 and result.output.startswith("error: --resume and --force")


def test_an_unknown_error_is_short_with_a_debug_hint(run):
    result = run(RuntimeError("boom\nsecond line"))
    assert result.exit_code == 1
    assert result.output.startswith("error: RuntimeError: boom ...\n")
    assert "--debug" in result.output and "Traceback" not in result.output


def test_debug_lets_the_traceback_through(run):
    error = RuntimeError("boom")
    result = run(error, "--debug")
    assert result.exception is error
