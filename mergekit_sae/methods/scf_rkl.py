"""SCF-RKL (Sparse Complementary Fusion with reverse KL): per-tensor importance, mask, fusion.

One anchor (MergeKit's ``base_model``, whose behaviour is kept) and donors k = 1..K. For one
tensor, with every row (the output dimension; a 1-d tensor is one row) turned into a
distribution over its coordinates:

    p_k   = |w_k| / sum_row |w_k|        (distribution "abs")   or softmax(|w_k| / T)
    r_k,i = (p_k,i + eps) * log((p_k,i + eps) / (p_anchor,i + eps))     (reverse-KL term)
    best_i, k*_i = max_k r_k,i            (ties: the first donor)
    mask  = the round(density * numel) largest best_i                   ("local")
          | best_i >= threshold                                         ("global")
    merged = anchor + scale * mask * (theta_{k*} - anchor)

Invariants: density 0 returns the anchor itself (bit for bit); with scale 1 every selected
position holds its donor's value exactly (no round trip through the delta); the kept count of
a local selection is exactly round(density * numel) (Python rounding, half to even). With a
functional importance file (``importance: PATH``) r_k is read from the file instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from mergekit.merge_methods import PerNonBase, TensorGroup, merge_method
from mergekit.merge_methods.base import BasePolicy, InputContract
from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from torch import Tensor

from mergekit_sae.errors import MergeInputError
from mergekit_sae.methods.kernel import check_tensors, compute_dtype, input_label, promoted_dtype
from mergekit_sae.sparsity import magnitude_prune

METHOD_NAME = "scf_rkl"
WEIGHTS = "weights"  # the data-free importance; any other `importance` value is a file path
EMBEDDING_NAMES: tuple[str, ...] = ("embed_tokens", "lm_head", "wte")

TensorRole = Literal["embedding", "vector", "matrix"]


def _named(parameter: str) -> WrapValidator:
    """A pydantic wrapper that prefixes a parameter's validation errors with its name."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as error:
            problems = "; ".join(item["msg"] for item in error.errors())
            raise ValueError(
                f"{METHOD_NAME} parameter `{parameter}`: {problems} (got {value!r})"
            ) from None

    return WrapValidator(validate)


# Parameter domains, declared once and used in the kernel signature (and by the CLI).
Distribution = Literal["abs", "softmax"]
Selection = Literal["local", "global"]
Density = Annotated[float, Field(ge=0.0, le=1.0), _named("density")]
Scale = Annotated[float, Field(allow_inf_nan=False), _named("scale")]
Temperature = Annotated[float, Field(gt=0.0, allow_inf_nan=False), _named("temperature")]
Epsilon = Annotated[float, Field(gt=0.0, lt=1.0), _named("epsilon")]
Threshold = Annotated[float | None, Field(allow_inf_nan=False), _named("threshold")]
ImportanceSource = Annotated[str, Field(min_length=1), _named("importance")]
DistributionParam = Annotated[Distribution, _named("distribution")]
SelectionParam = Annotated[Selection, _named("selection")]


def tensor_role(name: str, tensor: Tensor) -> TensorRole:
    """`embedding` (a dotted name part in EMBEDDING_NAMES), `vector` (<= 1-d), else `matrix`."""
    if any(part in EMBEDDING_NAMES for part in name.split(".")):
        return "embedding"
    return "vector" if tensor.dim() <= 1 else "matrix"


def is_merged(role: TensorRole, *, merge_embeddings: bool, merge_norms: bool) -> bool:
    """Whether a tensor of this role is fused (True) or kept from the anchor (False)."""
    if role == "embedding":
        return merge_embeddings
    if role == "vector":
        return merge_norms
    return True


def _rows(tensor: Tensor) -> Tensor:
    """View a tensor as (rows, coordinates): one row per output index, a vector as one row."""
    if tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def row_distribution(
    tensor: Tensor, distribution: Distribution = "abs", temperature: float = 1.0
) -> Tensor:
    """Each row's magnitudes as a distribution over its coordinates, in the tensor's shape.

    abs: |w| / sum_row |w| (an all-zero row becomes uniform); softmax: softmax(|w| / T).
    """
    magnitude = _rows(tensor).abs()
    if distribution == "softmax":
        return torch.softmax(magnitude / temperature, dim=1).reshape(tensor.shape)
    if distribution != "abs":
        raise ValueError(f"unknown distribution {distribution!r}; expected abs or softmax")
    total = magnitude.sum(dim=1, keepdim=True)
    uniform = torch.full_like(total, 1.0 / max(magnitude.shape[1], 1))
    spread = magnitude / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, spread, uniform).reshape(tensor.shape)


def reverse_kl_terms(p_donor: Tensor, p_anchor: Tensor, epsilon: float = 1e-12) -> Tensor:
    """Pointwise reverse-KL terms (q + eps) * log((q + eps) / (p + eps)), q the donor."""
    q = p_donor + epsilon
    return q * (torch.log(q) - torch.log(p_anchor + epsilon))


def weight_importance(
    donor: Tensor,
    anchor: Tensor,
    *,
    distribution: Distribution = "abs",
    temperature: float = 1.0,
    epsilon: float = 1e-12,
) -> Tensor:
    """Data-free importance of every coordinate: the donor's reverse-KL term against the anchor."""
    return reverse_kl_terms(
        row_distribution(donor, distribution, temperature),
        row_distribution(anchor, distribution, temperature),
        epsilon,
    )


def best_donor(importances: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per coordinate, the highest importance and the index of its donor (ties: first donor)."""
    best = importances[0].clone()
    choice = torch.zeros(best.shape, dtype=torch.int64, device=best.device)
    for index, importance in enumerate(importances[1:], start=1):
        higher = importance > best
        best = torch.where(higher, importance, best)
        choice.masked_fill_(higher, index)
    return best, choice


def top_fraction_mask(scores: Tensor, density: float) -> Tensor:
    """Boolean mask of the round(density * numel) largest scores (ties: earlier positions first).

    Uses `sparsity.magnitude_prune` (exact count, any tensor size) on a positive,
    order-preserving shift of the scores in float64 (scores - min + span).
    """
    n = scores.numel()
    k = round(density * n)
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    wide = scores.to(torch.float64)
    low = wide.min()
    span = wide.max() - low
    keys = wide - low + (span if bool(span > 0) else torch.ones_like(span))
    return magnitude_prune(keys, k / n) != 0


def _check_options(density: float, threshold: float | None, scale: float, name: str) -> None:
    """Domain checks for direct calls (the MergeKit kernel validates them through pydantic)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(
            f"{name}: {METHOD_NAME} parameter `density` must be in [0, 1], got {density}"
        )
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"{name}: {METHOD_NAME} parameter `threshold` must be finite")
    if not math.isfinite(scale):
        raise ValueError(f"{name}: {METHOD_NAME} parameter `scale` must be finite, got {scale}")


def _check_importances(
    importances: Sequence[Tensor], shape: torch.Size, labels: Sequence[str], name: str
) -> None:
    """Require one finite importance tensor per donor, shaped like the tensor."""
    if len(importances) != len(labels):
        raise ValueError(f"{name}: {len(importances)} importance tensors for {len(labels)} donors")
    for label, importance in zip(labels, importances, strict=True):
        if importance.shape != shape:
            raise ValueError(
                f"{name}: importance of {label} has shape {tuple(importance.shape)}, "
                f"the tensor has {tuple(shape)}"
            )
        if not bool(torch.isfinite(importance).all()):
            raise ValueError(f"{name}: importance of {label} has NaN or Inf values")


def fuse(anchor: Tensor, donors: Sequence[Tensor], mask: Tensor, choice: Tensor, scale: float):
    """anchor + scale * mask * (donor_choice - anchor); with scale 1 the donors' exact values."""
    if scale == 1.0:
        out = anchor.clone()
        for index, donor in enumerate(donors):
            out = torch.where(mask & (choice == index), donor, out)
        return out
    delta = torch.zeros_like(anchor)
    for index, donor in enumerate(donors):
        delta = torch.where(mask & (choice == index), donor - anchor, delta)
    return anchor + scale * delta


def scf_rkl_tensor(
    anchor: Tensor,
    donors: Sequence[Tensor],
    *,
    importances: Sequence[Tensor] | None = None,
    density: float = 0.1,
    scale: float = 1.0,
    distribution: Distribution = "abs",
    temperature: float = 1.0,
    epsilon: float = 1e-12,
    threshold: float | None = None,
    name: str = "tensor",
    labels: Sequence[str] | None = None,
) -> Tensor:
    """Fuse the donors' most important coordinates into the anchor (module docstring).

    `importances` (one per donor, e.g. functional scores) replace the data-free reverse-KL
    terms; `threshold` switches from the local top-density selection to a fixed cut-off.
    Computes in float32 (float64 for float64 inputs); returns the inputs' promoted dtype.
    """
    labels = list(labels) if labels is not None else [f"donor {i}" for i in range(len(donors))]
    if not donors:
        raise ValueError(f"{name}: {METHOD_NAME} needs at least one donor besides the anchor")
    _check_options(density, threshold, scale, name)
    check_tensors([anchor, *donors], ["base_model (anchor)", *labels], name)
    if importances is not None:
        _check_importances(importances, anchor.shape, labels, name)
    if threshold is None and round(density * anchor.numel()) == 0:
        return anchor
    out_dtype = promoted_dtype([anchor, *donors])
    dtype = compute_dtype([anchor, *donors])
    base = anchor.to(dtype)
    parts = [donor.to(dtype) for donor in donors]
    if importances is None:
        importances = [
            weight_importance(
                part, base, distribution=distribution, temperature=temperature, epsilon=epsilon
            )
            for part in parts
        ]
    best, choice = best_donor([importance.to(dtype) for importance in importances])
    mask = top_fraction_mask(best, density) if threshold is None else best >= threshold
    if scale == 1.0:  # select in the output dtype so selected values are the donors' bits
        return fuse(anchor.to(out_dtype), [d.to(out_dtype) for d in donors], mask, choice, 1.0)
    return fuse(base, parts, mask, choice, scale).to(out_dtype)


def read_importance(path: str | Path, name: str, shape: torch.Size, label: str) -> Tensor:
    """Read one tensor of an importance file lazily; errors name the file, tensor and model."""
    from safetensors import safe_open

    path = Path(path)
    where = f"{name}: importance of {label}"
    if not path.is_file():
        raise MergeInputError(
            f"{where}: importance file {path} does not exist (parameter `importance` is "
            f"'{WEIGHTS}' or a safetensors file written by `mergekit-sae scf-rkl importance`)"
        )
    with safe_open(str(path), framework="pt") as handle:
        if name not in handle.keys():  # noqa: SIM118 - safe_open handles have no __contains__
            raise MergeInputError(f"{where}: importance file {path} has no tensor {name!r}")
        tensor = handle.get_tensor(name)
    if tuple(tensor.shape) != tuple(shape):
        raise MergeInputError(
            f"{where}: tensor {name!r} in {path} has shape {tuple(tensor.shape)}, "
            f"the model's has {tuple(shape)}"
        )
    return tensor


def _importance_mode(sources: Sequence[str], name: str) -> str:
    """`weights` when every donor uses the data-free importance, `file` when every donor has one."""
    kinds = {WEIGHTS if source == WEIGHTS else "file" for source in sources}
    if len(kinds) > 1:
        raise ValueError(
            f"{name}: every donor needs the same kind of `importance` (all '{WEIGHTS}' or all "
            f"files), got {list(sources)}; the two scales are not comparable"
        )
    return kinds.pop()


def _check_selection(selection: Selection, threshold: float | None, name: str) -> None:
    """`global` needs a threshold and `local` must not have one."""
    if selection == "global" and threshold is None:
        raise ValueError(
            f"{name}: selection 'global' needs the model-wide `threshold`; compute it with "
            "`mergekit-sae scf-rkl threshold RECIPE OUT_RECIPE`"
        )
    if selection == "local" and threshold is not None:
        raise ValueError(f"{name}: `threshold` is used only with `selection: global`")


@merge_method(
    name=METHOD_NAME,
    pretty_name="Sparse Complementary Fusion with reverse KL",
    reference_url="https://arxiv.org/abs/2602.11717",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def scf_rkl_merge(
    group: TensorGroup,
    importance: PerNonBase[ImportanceSource] = WEIGHTS,
    density: Density = 0.1,
    scale: Scale = 1.0,
    distribution: DistributionParam = "abs",
    temperature: Temperature = 1.0,
    epsilon: Epsilon = 1e-12,
    selection: SelectionParam = "local",
    threshold: Threshold = None,
    merge_embeddings: bool = False,
    merge_norms: bool = False,
) -> Tensor:
    """MergeKit adapter: the base model is the anchor, every other model a donor."""
    name = group.metadata.name or "tensor"
    anchor = group.base.tensor
    donors = group.non_base
    _check_selection(selection, threshold, name)
    role = tensor_role(name, anchor)
    if not donors or not is_merged(
        role, merge_embeddings=merge_embeddings, merge_norms=merge_norms
    ):
        return anchor
    labels = [input_label(entry.id) for entry in donors]
    sources = [importance[entry.id] for entry in donors]
    importances = None
    if _importance_mode(sources, name) == "file":
        importances = [
            read_importance(source, name, anchor.shape, label)
            for source, label in zip(sources, labels, strict=True)
        ]
    return scf_rkl_tensor(
        anchor,
        [entry.tensor for entry in donors],
        importances=importances,
        density=density,
        scale=scale,
        distribution=distribution,
        temperature=temperature,
        epsilon=epsilon,
        threshold=threshold if selection == "global" else None,
        name=name,
        labels=labels,
    ).to(anchor.dtype)
