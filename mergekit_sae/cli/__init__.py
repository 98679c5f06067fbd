"""The ``mergekit-sae`` command: every subcommand is one module of this package (``cli/``), or a
plug-in's click command from the entry-point group ``mergekit_sae.commands``.

Subcommands are imported only when invoked, so ``mergekit-sae --help`` stays fast. Every
error reaches the user through one funnel (:meth:`LazyGroup.invoke`): the package's own
errors (``mergekit_sae.errors``) as one line ``error: ...`` with exit code 1 (2 for usage
errors), anything else as its type and first line with a hint to rerun with ``--debug``,
which shows the full traceback instead.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from mergekit_sae import plugins
from mergekit_sae.errors import MergekitSaeError, is_out_of_space

# name -> ("module:attribute", one-line help shown by `mergekit-sae --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("mergekit_sae.cli.merge:merge", "Run a MergeKit YAML recipe (sae_evolve included)."),
    "testbed": ("mergekit_sae.cli.testbed:testbed", "Build and inspect the testbeds."),
    "evolve": ("mergekit_sae.cli.evolve:evolve", "Run the sparsity-aware evolutionary search."),
    "publish": ("mergekit_sae.cli.publish:publish", "Upload an evolved model to the Hub."),
    "export": ("mergekit_sae.cli.export:export_command", "Rebuild any candidate of a run."),
    "scf-rkl": ("mergekit_sae.cli.scf_rkl:scf_rkl", "SCF-RKL: functional importance, threshold."),
    "compare": ("mergekit_sae.cli.compare:compare", "Compare searches and one-shot merges."),
    "landscape": ("mergekit_sae.cli.landscape:landscape", "Loss and convexity maps of models."),
}


def plugin_commands() -> dict[str, Any]:
    """Commands other packages declare (entry-point group ``mergekit_sae.commands``)."""
    return {e.name: e for e in plugins.declared(plugins.COMMANDS) if e.name not in SUBCOMMANDS}


def command_help(name: str) -> str:
    """The one-line help of a command (a plug-in's is its value, so --help loads nothing)."""
    if name in SUBCOMMANDS:
        return SUBCOMMANDS[name][1]
    return f"(plug-in: {plugin_commands()[name].value})"


class CommandError(click.ClickException):
    """An error as the command line shows it: ``error: message`` on stderr, then exit."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class Interrupted(click.ClickException):
    """Ctrl-C: one line on stderr (no ``error:`` prefix, no traceback), exit code 130."""

    exit_code = 130

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), err=True, file=file)


def format_exception(error: BaseException, resume_hint: str = "") -> CommandError:
    """The one-line report of an exception: known errors whole, others short with a hint.

    A full disk is reported as such (with ``resume_hint`` when the command can resume).
    """
    if is_out_of_space(error):
        text = str(error) if isinstance(error, MergekitSaeError) else f"no space left ({error})"
        return CommandError(f"{text}; free some space{resume_hint}")
    if isinstance(error, MergekitSaeError):
        return CommandError(str(error), error.exit_code)
    lines = str(error).strip().splitlines()
    first = f": {lines[0]}" if lines else ""
    more = " ..." if len(lines) > 1 else ""
    return CommandError(
        f"{type(error).__name__}{first}{more}\n(an unexpected error; rerun with "
        "`mergekit-sae --debug ...` for the traceback)"
    )


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use, with the error funnel."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; turn an exception into one ``error:`` line unless --debug."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            raise Interrupted(f"interrupted{self._resume_hint(ctx, 'continue')}") from None
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            raise format_exception(error, self._resume_hint(ctx, "then continue")) from error

    def _resume_hint(self, ctx: click.Context, verb: str) -> str:
        """``; VERB with --resume`` when the running subcommand has a --resume option."""
        name = ctx.invoked_subcommand
        command = self.get_command(ctx, name) if name else None
        resumable = command is not None and any(p.name == "resume" for p in command.params)
        return f"; {verb} with --resume" if resumable else ""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*SUBCOMMANDS, *plugin_commands()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in SUBCOMMANDS:
            module_name, attr = SUBCOMMANDS[cmd_name][0].split(":")
            return getattr(importlib.import_module(module_name), attr)
        entry = plugin_commands().get(cmd_name)
        return plugins.load(entry) if entry is not None else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, command_help(name)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="mergekit-sae")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def main(debug: bool) -> None:
    """Sparsity-Aware Evolution (SAE) for model merging, inside MergeKit.

    Recipes with `merge_method: sae_evolve` also run with plain `mergekit-yaml`.
    """
