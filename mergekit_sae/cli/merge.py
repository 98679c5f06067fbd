"""`mergekit-sae merge RECIPE OUT`: run a MergeKit recipe, filling in what plain MergeKit cannot.

A per-tensor merge method cannot see the whole model, so `sparsity_scope: global` needs each
model's `global_sparsity`. When the recipe omits it, this command computes it by streaming the
model's tensors (pruned at the model's `density`, as the merge will) and writes the completed
recipe into the output, so plain `mergekit-yaml` reproduces the result. Output is atomic.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions, add_merge_options

from mergekit_sae.errors import RecipeError
from mergekit_sae.sparsity import model_sparsity, prune

_SCALARS = (bool, int, float, str)


def _mentions(setting: Any, value: str) -> bool:
    """Whether a parameter setting (scalar, gradient or filter list) can resolve to `value`."""
    if isinstance(setting, ConditionalParameter):
        return _mentions(setting.value, value)
    if isinstance(setting, list):
        return any(_mentions(item, value) for item in setting)
    return setting == value


def _scalar(setting: Any, field: str, model: ModelReference, default: Any) -> Any:
    """A setting that must be one plain value to compute global sparsity; else a clear error."""
    if setting is None:
        return default
    if isinstance(setting, _SCALARS):
        return setting
    raise RecipeError(
        f"cannot compute global_sparsity for {model}: `{field}` varies across tensors; "
        "set that model's `global_sparsity` in the recipe",
        field=field,
    )


def _floating_tensors(
    model: ModelReference, base: ModelReference | None, dtype: torch.dtype | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Stream (tensor, base tensor or None) pairs of a model's floating-point weights."""
    from mergekit_sae.merging.stream import read_tensor

    loader = LoaderCache().get(model)
    base_loader = LoaderCache().get(base) if base is not None else None
    for name in sorted(loader.index.tensor_paths):
        tensor = read_tensor(loader, name)
        if not tensor.is_floating_point():
            continue
        if dtype is not None:
            tensor = tensor.to(dtype)
        base_tensor = None
        if base_loader is not None:
            base_tensor = read_tensor(base_loader, name).to(tensor.dtype)
        yield tensor, base_tensor


def _global_sparsity(
    model: ModelReference,
    params: Mapping[str, Any],
    shared: Mapping[str, Any],
    base: ModelReference | None,
    config: MergeConfiguration,
) -> float:
    """The model's sparsity over all its tensors, after the density pruning the merge applies."""
    density = _scalar(params.get("density", shared.get("density")), "density", model, 1.0)
    measure = _scalar(shared.get("sparsity_measure"), "sparsity_measure", model, "zero_count")
    target = _scalar(shared.get("prune_target"), "prune_target", model, "weights")
    if target == "delta" and base is None:
        raise RecipeError("prune_target 'delta' needs a base_model", field="base_model")
    dtype = dtype_from_name(config.dtype) if config.dtype else None

    def pruned() -> Iterator[torch.Tensor]:
        for tensor, base_tensor in _floating_tensors(model, base, dtype):
            work = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
            if target == "delta":
                work = work - base_tensor.to(work.dtype)
            yield prune(work, float(density))

    return model_sparsity(pruned(), measure)


def complete_global_sparsity(config: MergeConfiguration) -> bool:
    """Add `global_sparsity` to each sae_evolve model that needs and lacks it; True if changed."""
    shared = config.parameters or {}
    if config.merge_method != "sae_evolve" or not _mentions(shared.get("sparsity_scope"), "global"):
        return False
    if config.models is None:
        raise RecipeError(
            "global sparsity is computed only for recipes with a `models:` list; "
            "set `global_sparsity` per model for slice or module recipes",
            field="models",
        )
    changed = False
    for model_in in config.models:
        params = dict(model_in.parameters or {})
        is_reference = params.get("dense_reference") is True
        if model_in.model == config.base_model or is_reference or "global_sparsity" in params:
            continue
        params["global_sparsity"] = _global_sparsity(
            model_in.model, params, shared, config.base_model, config
        )
        model_in.parameters = params
        changed = True
    return changed


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
    import mergekit.merge

    from mergekit_sae.merging.recipes import load_stages, run_recipe, validate_stage
    from mergekit_sae.merging.run_guard import run_merge_atomic
    from mergekit_sae.methods import register_all

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
