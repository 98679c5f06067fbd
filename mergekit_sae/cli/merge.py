"""`mergekit-sae merge RECIPE OUT`: run a MergeKit recipe, filling in what plain MergeKit cannot.

For ``sae_evolve`` with ``sparsity_scope: global``, each model's missing ``global_sparsity`` is
computed (:mod:`mergekit_sae.merging.global_sparsity`) and written into the completed recipe in
the output, so plain ``mergekit-yaml`` reproduces the result. Output is atomic.
"""

from __future__ import annotations

from pathlib import Path

import click
import mergekit.merge
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions, add_merge_options

from mergekit_sae.merging.global_sparsity import complete_global_sparsity
from mergekit_sae.merging.recipes import load_stages, run_recipe, validate_stage
from mergekit_sae.merging.run_guard import run_merge_atomic
from mergekit_sae.methods import register_all


@click.command("merge")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@add_merge_options
def merge(merge_options: MergeOptions, recipe: Path, out: Path) -> None:
    """Run the MergeKit YAML RECIPE into the directory OUT (written atomically).

    For sae_evolve with `sparsity_scope: global`, each model's missing `global_sparsity` is
    computed from its weights and recorded in OUT/mergekit_config.yml. A multi-stage recipe
    (`---`-separated, named stages, as `mergekit-sae evolve` writes) runs like
    `mergekit-multi`, with the stages kept in OUT.stages/ beside OUT.
    """
    register_all()
    merge_options.apply_global_options()
    stages = load_stages(recipe)
    if len(stages) > 1:
        run_recipe(recipe, out, options=merge_options)
        return
    source = recipe.read_text(encoding="utf-8")
    config = validate_stage(stages[0], str(recipe))
    LoaderCache().setup(options=merge_options)
    if complete_global_sparsity(config):
        source = config.to_yaml()
    run_merge_atomic(
        mergekit.merge.run_merge, config, str(out), options=merge_options, config_source=source
    )
