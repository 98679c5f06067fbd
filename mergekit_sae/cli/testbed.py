"""`mergekit-sae testbed`: build the embedded testbed and show what it holds."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def testbed() -> None:
    """The embedded tiny testbed: a Llama base, a math expert, a multilingual expert, tasks."""


@testbed.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("testbed"),
    show_default=True,
    help="folder to write the testbed to",
)
@click.option("--seed", type=int, default=None, help="seed of data and training [default: 0]")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML or JSON file with TestbedConfig fields (sizes, steps, learning rates)",
)
@click.option("--force", is_flag=True, help="rebuild even when OUT already holds a testbed")
@click.option(
    "--threads", type=int, default=None, help="torch CPU threads while building [default: 1]"
)
@click.option("--quiet", is_flag=True, help="print only the quality table")
def build(
    out: Path,
    seed: int | None,
    config_file: Path | None,
    force: bool,
    threads: int | None,
    quiet: bool,
) -> None:
    """Build the testbed into OUT (reused when already built with the same settings)."""
    from mergekit_sae.testbed.build import build_testbed
    from mergekit_sae.testbed.config import load_config
    from mergekit_sae.testbed.quality import format_table

    overrides = {k: v for k, v in (("seed", seed), ("threads", threads)) if v is not None}
    config = load_config(config_file, **overrides)
    log = None if quiet else (lambda message: click.echo(message, err=True))
    report = build_testbed(out, config, force=force, log=log)
    click.echo(format_table(report["accuracy"], report["quality_checks"]))
    click.echo(f"testbed: {out} (its build took {report['seconds']['total']} s)")


@testbed.command()
@click.argument("root", type=click.Path(path_type=Path), default=Path("testbed"))
def info(root: Path) -> None:
    """Show what the testbed at ROOT holds: models, task files and its quality table."""
    from mergekit_sae.testbed.build import load_report
    from mergekit_sae.testbed.quality import format_table

    report = load_report(root)
    config = report["config"]
    click.echo(
        f"testbed {root.absolute()} (seed {config['seed']}, "
        f"{report['parameters']:,} parameters per model)"
    )
    for name, folder in report["models"].items():
        click.echo(f"  model {name:13s} {root / folder}")
    for name, spec in report["tasks"].items():
        click.echo(
            f"  task  {name:13s} {spec['type']}: {root / spec['train']}, {root / spec['test']}"
        )
    click.echo("")
    click.echo(format_table(report["accuracy"], report["quality_checks"]))
