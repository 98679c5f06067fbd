"""The global sparsity of each ``sae_evolve`` model, which a per-tensor kernel cannot see.

``sparsity_scope: global`` needs each model's ``global_sparsity``. When a recipe omits it,
:func:`complete_global_sparsity` computes it by streaming the model's tensors (pruned at the
model's ``density``, as the merge will) and fills it into the configuration, so that the
completed recipe reproduces the merge with plain ``mergekit-yaml``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.io.tasks import LoaderCache

from mergekit_sae.errors import RecipeError
from mergekit_sae.merging.stream import read_tensor
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
