"""``mergekit-sae compare RECIPE OUT``: every search and one-shot merge at equal evaluations."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from mergekit_sae.cli.progress import silence_progress_bars
from mergekit_sae.compare.plan import DEFAULT_METHODS, ONE_SHOTS, searches
from mergekit_sae.errors import UsageError

# Options that change how a comparison runs, not what it computes: left out of the record.
HOW_TO_RUN = ("--resume", "--force", "--quiet", "-q")


def command_line() -> str:
    """The command as typed, without the options that only say how to run it."""
    words = sys.argv[sys.argv.index("compare") :] if "compare" in sys.argv else ["compare"]
    return "mergekit-sae " + shlex.join(w for w in words if w not in HOW_TO_RUN)


@click.command(name="compare")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--methods",
    default=DEFAULT_METHODS,
    show_default=True,
    help=f"Comma-separated searches ({', '.join(searches())}) and one-shot merges "
    f"({', '.join(ONE_SHOTS)}).",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Run every method with seeds 0..N-1.",
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=None,
    help="Fitness evaluations per search (default: what the recipe's SAE run uses).",
)
@click.option(
    "--sweep",
    "sweeps",
    multiple=True,
    metavar="FIELD=V1,V2,...",
    help="Also run SAE with a recipe field (dotted path, e.g. sae.schedule.t0=2,6) set to each "
    "value; repeatable.",
)
@click.option(
    "--tensorboard",
    metavar="DIR",
    default=None,
    help="Log every run to TensorBoard under DIR/<method>/seed<k> (overlaid).",
)
@click.option(
    "--wandb",
    "wandb_project",
    metavar="PROJECT",
    default=None,
    help="Log every run to the W&B project PROJECT, grouped by comparison.",
)
@click.option("--resume", is_flag=True, help="Continue the comparison in OUT.")
@click.option("--force", is_flag=True, help="Delete a previous comparison in OUT and start over.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no table.")
def compare(
    recipe: Path,
    out: Path,
    methods: str,
    seeds: int,
    budget: int | None,
    sweeps: tuple[str, ...],
    tensorboard: str | None,
    wandb_project: str | None,
    resume: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Compare searches and one-shot merges on RECIPE's models and tasks, writing into OUT.

    Every search gets the same number of fitness evaluations; every method's answer is then
    scored on the test splits. Writes OUT/results.csv, OUT/results.md (mean ± std over seeds
    and a paired comparison of SAE against each method) and OUT/progress.png, with each run
    in OUT/<method>/seed<k>/. A stopped comparison continues with --resume.
    """
    from mergekit_sae.compare.plan import parse_methods, parse_sweep
    from mergekit_sae.compare.run import Comparison
    from mergekit_sae.compare.run import compare as run_compare

    if resume and force:
        raise UsageError("--resume and --force exclude each other")
    if quiet:
        silence_progress_bars()
    comparison = Comparison(
        recipe=recipe,
        methods=parse_methods(methods),
        seeds=seeds,
        budget=budget,
        sweeps=[parse_sweep(s) for s in sweeps],
        command=command_line(),
        tensorboard=tensorboard,
        wandb_project=wandb_project,
    )
    run_compare(comparison, out, resume=resume, force=force, progress=not quiet)
    if not quiet:
        click.echo((out / "results.md").read_text(encoding="utf-8"))
        click.echo(f"wrote {out}")
