"""Model-wide helpers for `scf_rkl`: functional importance from calibration data, global threshold.

Functional importance of donor k (one safetensors file per donor, same tensor names):

    KL(theta) = mean over calibration tokens t of KL(p_theta(. | x<t) || p_donor(. | x<t))
    score_i   = -g_i * (theta_donor,i - theta_anchor,i),   g = grad KL at theta = anchor

the first-order decrease of KL when coordinate i moves from the anchor's value to the donor's.
Memory: the donor runs first (forward only) and its next-token log-probabilities are kept on
the CPU (tokens x vocabulary x 4 bytes); then the donor is dropped and the anchor runs one
forward and one backward pass per batch with every parameter requiring grad, so the peak is
one model, its gradients and those log-probabilities. Donor weights for the delta are read one
tensor at a time from the donor's checkpoint.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from mergekit_sae.methods.scf_rkl import (
    METHOD_NAME,
    WEIGHTS,
    best_donor,
    is_merged,
    read_importance,
    tensor_role,
    weight_importance,
)

SIDECAR = "importance.json"
RECIPE_COPY = "recipe.yml"


class ScfRklRecipeError(ValueError):
    """A recipe that the scf_rkl helpers cannot use; the message names the recipe and field."""


@dataclass(frozen=True)
class Roles:
    """The anchor and donors of an scf_rkl recipe, as written in it."""

    anchor: str
    donors: tuple[str, ...]
    raw: dict = field(repr=False)


def read_roles(recipe_path: str | Path) -> Roles:
    """Parse an scf_rkl recipe: `base_model` is the anchor, every other `models` entry a donor."""
    recipe_path = Path(recipe_path)
    raw = yaml.safe_load(recipe_path.read_text())
    if not isinstance(raw, dict) or raw.get("merge_method") != METHOD_NAME:
        raise ScfRklRecipeError(f"{recipe_path}: merge_method must be {METHOD_NAME}")
    anchor = raw.get("base_model")
    if not anchor:
        raise ScfRklRecipeError(f"{recipe_path}: base_model (the anchor) is required")
    if "slices" in raw or "modules" in raw:
        raise ScfRklRecipeError(f"{recipe_path}: only `models:` recipes are supported here")
    donors = tuple(m["model"] for m in raw.get("models") or [] if m["model"] != anchor)
    if not donors:
        raise ScfRklRecipeError(f"{recipe_path}: models: needs at least one donor")
    return Roles(str(anchor), tuple(str(d) for d in donors), raw)


def load_prompts(path: str | Path, items: int | None, seed: int = 0) -> list[str]:
    """The `prompt` of each JSONL item (a seeded subsample of `items` of them)."""
    from mergekit_sae.evaluate.data import TaskDataError, load_jsonl, subsample

    records = subsample(load_jsonl(path), items, seed)
    prompts = []
    for index, record in enumerate(records):
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt:
            raise TaskDataError(f"{path}: calibration item {index} has no string 'prompt'")
        prompts.append(prompt)
    return prompts


def tokenize_batches(
    tokenizer: Any, prompts: Sequence[str], batch_size: int, max_length: int
) -> list[dict[str, Tensor]]:
    """Padded, truncated batches of input_ids and attention_mask."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return [
        dict(
            tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
        )
        for start in range(0, len(prompts), batch_size)
    ]


def _wide(tensor: Tensor) -> Tensor:
    """float32, or float64 when the tensor already is (half precision is widened)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def next_token_kl(logits: Tensor, target_log_probs: Tensor, mask: Tensor) -> Tensor:
    """Sum over positions with mask 1 of KL(softmax(logits) || exp(target_log_probs))."""
    log_p = torch.log_softmax(_wide(logits), dim=-1)
    per_token = (log_p.exp() * (log_p - target_log_probs.to(log_p.device))).sum(dim=-1)
    return (per_token * mask.to(per_token.dtype)).sum()


def _forward(model: torch.nn.Module, batch: Mapping[str, Tensor], device: torch.device) -> Tensor:
    """Logits of one batch."""
    inputs = {key: value.to(device) for key, value in batch.items()}
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


@torch.no_grad()
def target_log_probs(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    device: torch.device,
    progress: Callable[[Iterable], Iterable] = iter,
) -> list[Tensor]:
    """The donor's next-token log-probabilities for every batch, float32 (or 64) on the CPU."""
    return [
        torch.log_softmax(_wide(_forward(model, batch, device)), dim=-1).cpu()
        for batch in progress(batches)
    ]


def kl_gradients(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Tensor],
    device: torch.device,
    progress: Callable[[Iterable], Iterable] = iter,
) -> tuple[dict[str, Tensor], float]:
    """Gradient of the token-mean KL(p_model || p_target) wrt every parameter, and that KL."""
    n_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    params = dict(model.named_parameters())
    for parameter in params.values():
        parameter.requires_grad_(True)
        parameter.grad = None
    total = 0.0
    for batch, target in progress(list(zip(batches, targets, strict=True))):
        loss = next_token_kl(_forward(model, batch, device), target, batch["attention_mask"])
        (loss / n_tokens).backward()
        total += float(loss.detach())
    grads = {
        name: _wide(p.grad if p.grad is not None else torch.zeros_like(p)).cpu()
        for name, p in params.items()
    }
    for parameter in params.values():
        parameter.grad = None
        parameter.requires_grad_(False)
    return grads, total / max(n_tokens, 1)


def functional_scores(
    grads: Mapping[str, Tensor], anchor: Mapping[str, Tensor], donor_tensor: Callable[[str], Tensor]
) -> dict[str, Tensor]:
    """score = -g * (donor - anchor) per parameter, float32 (donor read one tensor at a time)."""
    scores = {}
    for name, grad in grads.items():
        delta = donor_tensor(name).float() - anchor[name].float().cpu()
        if delta.shape != grad.shape:
            raise ValueError(
                f"{name}: donor has shape {tuple(delta.shape)}, anchor {tuple(grad.shape)}"
            )
        scores[name] = (-grad * delta).contiguous()
    return scores


def _tensor_reader(path: str | Path) -> Callable[[str], Tensor]:
    """A function reading one named tensor of a checkpoint (lazily, with MergeKit's loader)."""
    from mergekit.io import LazyTensorLoader, ShardedTensorIndex

    loader = LazyTensorLoader(ShardedTensorIndex.from_disk(str(path)))

    def read(name: str) -> Tensor:
        try:
            return loader.get_tensor(name)
        except KeyError as error:
            raise KeyError(f"{path}: checkpoint has no tensor {name!r}") from error

    return read


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (getrusage maxrss), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_model(path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


@dataclass
class PassCounter:
    """Forward and backward passes run so far."""

    forward: int = 0
    backward: int = 0


def compute_importance(
    anchor_path: str,
    donor_paths: Sequence[str],
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    max_length: int = 256,
    progress: Callable[[Iterable, str], Iterable] | None = None,
) -> dict:
    """Write donor_<k>.safetensors (functional scores) and the JSON sidecar into `out_dir`."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from mergekit_sae.atomic import write_file, write_text

    started = time.perf_counter()
    show = progress or (lambda items, _desc: items)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(anchor_path)
    batches = tokenize_batches(tokenizer, prompts, batch_size, max_length)
    passes = PassCounter()
    donors = []
    anchor = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for index, donor_path in enumerate(donor_paths):
        donor = _load_model(donor_path, device, dtype)
        label = f"donor {index}"
        targets = target_log_probs(donor, batches, device, lambda b, label=label: show(b, label))
        passes.forward += len(batches)
        del donor
        if anchor is None:
            anchor = _load_model(anchor_path, device, dtype)
        grads, kl = kl_gradients(anchor, batches, targets, device, lambda b: show(b, "anchor"))
        passes.forward += len(batches)
        passes.backward += len(batches)
        del targets
        state = {name: p.detach() for name, p in anchor.named_parameters()}
        scores = functional_scores(grads, state, _tensor_reader(donor_path))
        del grads
        file = out_dir / f"donor_{index}.safetensors"
        metadata = {"format": "pt", "donor": str(donor_path)}
        write_file(file, lambda tmp, s=scores, m=metadata: save_file(s, str(tmp), metadata=m))
        donors.append({"model": str(donor_path), "file": str(file.resolve()), "kl": kl})
        del scores
    report = {
        "method": METHOD_NAME,
        "anchor": str(anchor_path),
        "donors": donors,
        "items": len(prompts),
        "tokens": sum(int(batch["attention_mask"].sum()) for batch in batches),
        "batches": len(batches),
        "batch_size": batch_size,
        "calibration_passes": {"forward": passes.forward, "backward": passes.backward},
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if device.type == "cuda":
        report["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    write_text(out_dir / SIDECAR, json.dumps(report, indent=2) + "\n")
    return report


def recipe_with(raw: Mapping, *, shared: Mapping | None = None, per_donor: Mapping | None = None):
    """A copy of a recipe mapping with shared parameters and per-donor parameters set."""
    recipe = json.loads(json.dumps(raw))  # a deep copy of plain YAML data
    recipe["parameters"] = {**(recipe.get("parameters") or {}), **(shared or {})}
    for entry in recipe.get("models") or []:
        values = (per_donor or {}).get(entry["model"])
        if values:
            entry["parameters"] = {**(entry.get("parameters") or {}), **values}
    return recipe


def _scalar(value: Any, field_name: str, default: Any) -> Any:
    """A recipe value that must be one number or string (not a gradient or filter list)."""
    if value is None:
        return default
    if isinstance(value, (list, dict)):
        raise ScfRklRecipeError(
            f"`{field_name}` must be a single value for a global threshold, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class ImportanceSettings:
    """The recipe values that decide which tensors are fused and how importance is computed."""

    density: float
    distribution: str
    temperature: float
    epsilon: float
    merge_embeddings: bool
    merge_norms: bool
    importance: tuple[str, ...]  # per donor


def importance_settings(roles: Roles) -> ImportanceSettings:
    """Read (and validate with the method's own parameter types) the recipe's settings."""
    from mergekit.merge_methods import get

    spec = {p.name: p for p in get(METHOD_NAME).spec.parameters}
    shared = roles.raw.get("parameters") or {}

    def value(name: str, source: Mapping) -> Any:
        return spec[name].validate(_scalar(source.get(name), name, spec[name].default))

    per_donor = {m["model"]: m.get("parameters") or {} for m in roles.raw.get("models") or []}
    importance = tuple(
        value("importance", {**shared, **per_donor.get(donor, {})}) for donor in roles.donors
    )
    return ImportanceSettings(
        density=value("density", shared),
        distribution=value("distribution", shared),
        temperature=value("temperature", shared),
        epsilon=value("epsilon", shared),
        merge_embeddings=value("merge_embeddings", shared),
        merge_norms=value("merge_norms", shared),
        importance=importance,
    )


def model_importances(roles: Roles, settings: ImportanceSettings) -> Iterator[tuple[str, Tensor]]:
    """(name, per-coordinate best importance) for every tensor the recipe fuses."""
    from mergekit.io import ShardedTensorIndex

    names = sorted(ShardedTensorIndex.from_disk(roles.anchor).tensor_paths)
    anchor = _tensor_reader(roles.anchor)
    donors = [_tensor_reader(path) for path in roles.donors]
    for name in names:
        base = anchor(name)
        merged = is_merged(
            tensor_role(name, base),
            merge_embeddings=settings.merge_embeddings,
            merge_norms=settings.merge_norms,
        )
        if not merged or not base.is_floating_point():
            continue
        parts = []
        for path, read, source in zip(roles.donors, donors, settings.importance, strict=True):
            if source == WEIGHTS:
                parts.append(
                    weight_importance(
                        read(name).float(),
                        base.float(),
                        distribution=settings.distribution,
                        temperature=settings.temperature,
                        epsilon=settings.epsilon,
                    )
                )
            else:
                parts.append(read_importance(source, name, base.shape, f"model {path}").float())
        yield name, best_donor(parts)[0]


def global_threshold(roles: Roles, settings: ImportanceSettings) -> tuple[float, int, int]:
    """The model-wide cut-off keeping round(density * N) of the N fused coordinates.

    Returns (threshold, kept target, N). Holds every fused tensor's importance in float32
    (4 bytes per fused parameter, plus the same again for the selection).
    """
    flat = torch.cat([scores.reshape(-1) for _, scores in model_importances(roles, settings)])
    total = flat.numel()
    keep = round(settings.density * total)
    if keep <= 0:
        return math.nextafter(float(flat.max()), math.inf), 0, total
    if keep >= total:
        return float(flat.min()), total, total
    value = torch.kthvalue(flat, total - keep + 1).values
    return float(value), keep, total
