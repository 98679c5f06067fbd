"""`mergekit-sae scf-rkl`: the model-wide steps of an `scf_rkl` recipe that a per-tensor kernel
cannot do itself.

- ``importance RECIPE OUT_DIR``: functional importance from calibration prompts, one
  safetensors file per donor, a JSON sidecar, and OUT_DIR/recipe.yml pointing at the files;
  gradients layer by layer by default (``--granularity model``: one pass).
- ``threshold RECIPE OUT_RECIPE``: the model-wide cut-off for ``selection: global``, written
  into a copy of the recipe.

Both write recipes that plain ``mergekit-yaml`` runs (model paths resolve against the working
directory, as in MergeKit).
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml
from tqdm import tqdm

from mergekit_sae.atomic import write_text
from mergekit_sae.errors import UsageError


@click.group(name="scf-rkl")
def scf_rkl() -> None:
    """SCF-RKL helpers: functional importance and the global threshold."""


def _write_yaml(path: Path, recipe: dict) -> None:
    """Write a recipe mapping as YAML (atomically), creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(recipe, sort_keys=False))


@scf_rkl.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="calibration JSONL file; each line's `prompt` is used (e.g. a task's train split)",
)
@click.option("--items", type=int, default=64, show_default=True, help="calibration prompts")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the subsample")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True, help="tokens per prompt")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto: CUDA when present",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="model dtype [default: bfloat16 on CUDA, float32 on CPU]",
)
@click.option(
    "--granularity",
    type=click.Choice(["layer", "model"]),
    default="layer",
    show_default=True,
    help="gradients one decoder layer at a time (least memory, one pass per layer) "
    "or of the whole model in one pass (fastest, model-sized gradients)",
)
def importance(
    recipe: Path,
    out_dir: Path,
    data: Path,
    items: int,
    seed: int,
    batch_size: int,
    max_length: int,
    device: str,
    dtype: str | None,
    granularity: str,
) -> None:
    """Compute functional importance -g * delta of each donor into OUT_DIR."""
    from mergekit_sae.calibration.scf_rkl import (  # torch and transformers: not for --help
        RECIPE_COPY,
        SIDECAR,
        compute_importance,
        load_prompts,
        read_roles,
        recipe_with,
    )
    from mergekit_sae.evaluate.device import resolve_device, resolve_dtype

    if items < 1 or batch_size < 1 or max_length < 2:
        raise UsageError("--items and --batch-size must be >= 1, --max-length >= 2")
    roles = read_roles(recipe)
    try:
        torch_device, default_dtype = resolve_device(device)
    except ValueError as error:  # e.g. cuda asked for on a machine without a GPU
        raise UsageError(f"--device: {error}") from None
    prompts = load_prompts(data, items, seed)
    report = compute_importance(
        roles.anchor,
        roles.donors,
        prompts,
        out_dir,
        device=torch_device,
        dtype=resolve_dtype(dtype, default_dtype),
        batch_size=batch_size,
        max_length=max_length,
        granularity=granularity,
        progress=lambda batches, desc: tqdm(batches, desc=desc, leave=False),
    )
    per_donor = {d["model"]: {"importance": d["file"]} for d in report["donors"]}
    _write_yaml(out_dir / RECIPE_COPY, recipe_with(roles.raw, per_donor=per_donor))
    passes = report["calibration_passes"]
    click.echo(
        f"calibration: {report['items']} prompts, {report['tokens']} tokens, "
        f"{report['batches']} batches; passes: {passes['forward']} forward, "
        f"{passes['backward']} backward ({report['gradient_groups']} gradient group(s), "
        f"granularity {report['granularity']})"
    )
    for donor in report["donors"]:
        click.echo(f"{donor['model']}: KL(anchor || donor) = {donor['kl']:.6g} -> {donor['file']}")
    click.echo(
        f"{report['seconds']} s, peak RSS {report['peak_rss_mib']} MiB"
        + (f", peak CUDA {report['peak_cuda_mib']} MiB" if "peak_cuda_mib" in report else "")
    )
    click.echo(f"sidecar: {out_dir / SIDECAR}; recipe: {out_dir / RECIPE_COPY}")


@scf_rkl.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_recipe", type=click.Path(dir_okay=False, path_type=Path))
def threshold(recipe: Path, out_recipe: Path) -> None:
    """Compute the model-wide importance cut-off and write OUT_RECIPE with selection: global."""
    from mergekit_sae.calibration.scf_rkl import (  # torch: not for --help
        global_threshold,
        importance_settings,
        read_roles,
        recipe_with,
    )

    roles = read_roles(recipe)
    settings = importance_settings(roles)
    value, kept, total = global_threshold(roles, settings)
    shared = {"selection": "global", "threshold": value}
    _write_yaml(out_recipe, recipe_with(roles.raw, shared=shared))
    click.echo(
        f"threshold {value:.9g}: keeps >= {kept} of {total} fused coordinates "
        f"(density {settings.density}); recipe: {out_recipe}"
    )
