"""``mergekit-sae landscape RECIPE OUT MODEL...``: loss and convexity maps of models."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sae.errors import UsageError


@click.command(name="landscape")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option(
    "--items",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="items drawn per task",
)
@click.option("--task", "task_names", multiple=True, help="only this recipe task (repeatable)")
@click.option(
    "--grid", type=click.IntRange(min=2), default=11, show_default=True, help="points per axis"
)
@click.option(
    "--span",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="alpha and beta run over [-span, span]",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="seeds the directions, the items and the eigensolver",
)
@click.option("--convexity", is_flag=True, help="also the extreme Hessian eigenvalues")
@click.option(
    "--hessian-params",
    multiple=True,
    metavar="GLOB",
    help="take the Hessian over the parameters matching GLOB only (repeatable)",
)
@click.option(
    "--eig-tol",
    type=click.FloatRange(min=0),
    default=1e-3,
    show_default=True,
    help="eigsh relative tolerance",
)
@click.option(
    "--eig-maxiter",
    type=click.IntRange(min=1),
    default=None,
    help="eigsh restart limit [default: scipy's]",
)
@click.option(
    "--answer-key",
    default="answer",
    show_default=True,
    help="item field holding a generation task's reference answer",
)
@click.option("--label", "labels", multiple=True, help="name of each model (one per MODEL)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch CPU threads [default: the recipe's]",
)
@click.option("--force", is_flag=True, help="discard a previous run in OUT/.work and start over")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def landscape(
    recipe: Path,
    out: Path,
    models: tuple[Path, ...],
    split: str,
    items: int,
    task_names: tuple[str, ...],
    grid: int,
    span: float,
    seed: int,
    convexity: bool,
    hessian_params: tuple[str, ...],
    eig_tol: float,
    eig_maxiter: int | None,
    answer_key: str,
    labels: tuple[str, ...],
    device: str,
    dtype: str,
    batch_size: int,
    threads: int | None,
    force: bool,
    quiet: bool,
) -> None:
    """Map the recipe tasks' answer loss of each MODEL along two shared random directions.

    Writes OUT/landscape.csv and OUT/landscape.png; a rerun with the same options resumes.
    """
    import torch

    from mergekit_sae.dtypes import torch_dtype
    from mergekit_sae.evaluate.device import resolve_device
    from mergekit_sae.landscape.grid import PNG_FILE, GridSettings, run_grid
    from mergekit_sae.landscape.models import model_entry, select_tasks, task_items, unique_labels
    from mergekit_sae.landscape.plot import write_landscape_png
    from mergekit_sae.recipe.loading import load_recipe, resolve_model

    parsed = load_recipe(recipe)
    if threads or parsed.threads:
        torch.set_num_threads(threads or parsed.threads)
    paths = [resolve_model(str(m), f"MODEL {m}", "command line") for m in models]
    if labels and len(labels) != len(paths):
        raise UsageError(f"--label was given {len(labels)} times for {len(paths)} models")
    names = list(labels) or unique_labels(paths)
    tasks = select_tasks(parsed.tasks, task_names)
    chosen = task_items(tasks, split, items, seed)
    dev, _ = resolve_device(device)
    entries = [
        model_entry(
            path,
            name,
            tasks,
            chosen,
            device=dev,
            dtype=torch_dtype(dtype),
            answer_key=answer_key,
            batch_size=batch_size,
        )
        for path, name in zip(paths, names, strict=True)
    ]
    settings = GridSettings(
        grid, span, seed, convexity, tuple(hessian_params), eig_tol, eig_maxiter
    )
    options = {
        "tasks": [t.model_dump(mode="json") for t in tasks],
        "split": split,
        "items": items,
        "answer_key": answer_key,
        "dtype": dtype,
        "model_paths": [str(p) for p in paths],
    }
    points = run_grid(entries, out, settings, options, force=force, progress=not quiet)
    write_landscape_png(out / PNG_FILE, points, names, grid, span, convexity)
    click.echo(f"wrote {out / 'landscape.csv'} and {out / PNG_FILE}")
