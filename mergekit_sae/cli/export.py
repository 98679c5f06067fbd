"""``mergekit-sae export OUT CANDIDATE MODEL_DIR``: any candidate of a run as a model folder."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sae.errors import UsageError


@click.command(name="export")
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("candidate")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default=None, help="Merge device (default: the run's recipe device).")
@click.option("--force", is_flag=True, help="Replace MODEL_DIR when it is not empty.")
def export_command(
    out: Path, candidate: str, model_dir: Path, device: str | None, force: bool
) -> None:
    """Rebuild candidate CANDIDATE (a member id, e.g. m0012) of the run in OUT into MODEL_DIR."""
    if model_dir.exists() and any(model_dir.iterdir()) and not force:
        raise UsageError(f"{model_dir} is not empty; pass --force to replace it")
    from mergekit_sae.outputs.export import export  # MergeKit and torch: not for --help

    export(out, candidate, model_dir, device=device)
    click.echo(f"wrote {model_dir}")
