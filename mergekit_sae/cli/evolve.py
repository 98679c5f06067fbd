"""``mergekit-sae evolve RECIPE.yml OUT/``: run or resume the sparsity-aware evolutionary search."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sae.cli.progress import silence_progress_bars
from mergekit_sae.errors import UsageError


@click.command(name="evolve")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in OUT.")
@click.option("--force", is_flag=True, help="Delete a previous run in OUT and start over.")
@click.option(
    "--stop-after",
    type=click.IntRange(min=0),
    default=None,
    help="Stop once this step is checkpointed (continue later with --resume).",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept pickle weights (.bin, .pt, .pth), which can run code when loaded "
    "(as recipe field allow_pickle: true).",
)
@click.option(
    "--tensorboard",
    metavar="DIR",
    default=None,
    help="Log every step to TensorBoard in DIR (as recipe field tracking.tensorboard).",
)
@click.option(
    "--wandb",
    "wandb_project",
    metavar="PROJECT",
    default=None,
    help="Log every step to the Weights & Biases project PROJECT (as tracking.wandb.project).",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Record each step's peak memory and per-model times in history.jsonl "
    "(as recipe field profile: true).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary.")
def evolve(
    recipe: Path,
    out: Path,
    resume: bool,
    force: bool,
    stop_after: int | None,
    allow_pickle: bool,
    tensorboard: str | None,
    wandb_project: str | None,
    profile: bool,
    quiet: bool,
) -> None:
    """Evolve a merge of the recipe's models into OUT (model, recipe, history, plots, card)."""
    from mergekit_sae.outputs.summary import summary
    from mergekit_sae.recipe.loading import load_recipe
    from mergekit_sae.run import run

    if resume and force:
        raise UsageError("--resume and --force exclude each other")
    if quiet:
        silence_progress_bars()
    parsed = load_recipe(recipe)
    if allow_pickle:
        parsed = parsed.model_copy(update={"allow_pickle": True})
    if profile:
        parsed = parsed.model_copy(update={"profile": True})
    if tensorboard is not None or wandb_project is not None:
        from mergekit_sae.outputs.tracking import with_tracking

        parsed = with_tracking(parsed, tensorboard, wandb_project)
    state = run(
        parsed,
        out,
        source=str(recipe),
        resume=resume,
        force=force,
        progress=not quiet,
        stop_after=stop_after,
    )
    if quiet:
        return
    if state.finished:
        click.echo(summary(state, [task.name for task in parsed.tasks]))
        click.echo(f"\nwrote {out}")
    else:
        click.echo(f"stopped after step {state.step}; continue with --resume")
