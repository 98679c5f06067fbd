"""The ``mergekit-sae`` command: wires subcommands that live beside the code they drive.

Subcommands are imported only when invoked, so ``mergekit-sae --help`` stays fast.
"""

from __future__ import annotations

import importlib

import click

# name -> ("module:attribute", one-line help shown by `mergekit-sae --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("mergekit_sae.merge_cli:merge", "Run a MergeKit YAML recipe (sae_evolve included)."),
    "testbed": ("mergekit_sae.testbed.cli:testbed", "Build and inspect the embedded tiny testbed."),
    "evolve": ("mergekit_sae.evolve.cli:evolve", "Run the sparsity-aware evolutionary search."),
    "publish": ("mergekit_sae.evolve.publish:publish", "Upload an evolved model to the Hub."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        module_name, attr = SUBCOMMANDS[cmd_name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="mergekit-sae")
def main() -> None:
    """Sparsity-Aware Evolution (SAE) for model merging, inside MergeKit.

    Recipes with `merge_method: sae_evolve` also run with plain `mergekit-yaml`.
    """


if __name__ == "__main__":
    main()
