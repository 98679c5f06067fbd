"""Model-wide helpers for `scf_rkl`: functional importance from calibration data, global threshold.

Functional importance of donor k (one safetensors file per donor, same tensor names):

    KL(theta) = mean over calibration tokens t of KL(p_theta(. | x<t) || p_donor(. | x<t))
    score_i   = -g_i * (theta_donor,i - theta_anchor,i),   g = grad KL at theta = anchor

the first-order decrease of KL when coordinate i moves from the anchor's value to the donor's.
Memory: the donor runs first (forward only) and its next-token log-probabilities are kept on
the CPU (tokens x vocabulary x 4 bytes); then the donor is dropped and the anchor's gradients
are computed one parameter group at a time (`granularity="layer"`: one group per decoder
layer plus one for the embeddings, final norm and head; only that group requires grad, every
calibration batch runs forward and backward, and the group's scores go straight to their place
in the output file, one tensor at a time, before the next group starts). The peak is one
model, one group's gradients, one batch's activations and those log-probabilities; the price
is one forward and backward pass per group and batch. `granularity="model"` is one pass with
every parameter requiring grad (peak: the model, all its gradients and the activations).
Both give the same scores: a parameter's gradient does not depend on which other parameters
require grad. Donor weights for the delta are read one tensor at a time from the donor's
checkpoint.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor

from mergekit_sae.atomic import write_file, write_text
from mergekit_sae.errors import RecipeError
from mergekit_sae.evaluate.data import TaskDataError, load_jsonl, subsample
from mergekit_sae.merging.per_tensor import layer_of
from mergekit_sae.merging.stream import read_tensor
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
Granularity = Literal["layer", "model"]
GRANULARITIES: tuple[str, ...] = ("layer", "model")
NON_LAYER_GROUP = "embeddings, final norm and head"


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
        raise RecipeError(f"{recipe_path}: merge_method must be {METHOD_NAME}")
    anchor = raw.get("base_model")
    if not anchor:
        raise RecipeError(f"{recipe_path}: base_model (the anchor) is required")
    if "slices" in raw or "modules" in raw:
        raise RecipeError(f"{recipe_path}: only `models:` recipes are supported here")
    entries = raw.get("models") or []
    if not all(isinstance(m, dict) and "model" in m for m in entries):
        raise RecipeError(f"{recipe_path}: every `models:` entry needs a `model:`")
    donors = tuple(m["model"] for m in entries if m["model"] != anchor)
    if not donors:
        raise RecipeError(f"{recipe_path}: models: needs at least one donor")
    return Roles(str(anchor), tuple(str(d) for d in donors), raw)


def load_prompts(path: str | Path, items: int | None, seed: int = 0) -> list[str]:
    """The `prompt` of each JSONL item (a seeded subsample of `items` of them)."""

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
    names: Iterable[str] | None = None,
) -> tuple[dict[str, Tensor], float]:
    """Gradient of the token-mean KL(p_model || p_target) wrt the parameters `names` (default:
    all), and that KL. Only those parameters require grad during the pass, so autograd keeps
    no gradient (and records no graph before their first use) for the others."""
    n_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    every = dict(model.named_parameters())
    params = every if names is None else {name: every[name] for name in names}
    for name, parameter in every.items():
        parameter.requires_grad_(name in params)
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
    for parameter in every.values():
        parameter.grad = None
        parameter.requires_grad_(False)
    return grads, total / max(n_tokens, 1)


def parameter_groups(names: Sequence[str], granularity: Granularity) -> list[tuple[str, list[str]]]:
    """(label, parameter names) of each gradient pass: one group of everything (`model`), or
    one per decoder layer in layer order then one of the non-layer tensors (`layer`)."""

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    if granularity == "model":
        return [("model", list(names))]
    layers: dict[int, list[str]] = {}
    rest = []
    for name in names:
        layer = layer_of(name)
        (rest if layer is None else layers.setdefault(layer, [])).append(name)
    groups = [(f"layer {index}", layers[index]) for index in sorted(layers)]
    return groups + ([(NON_LAYER_GROUP, rest)] if rest else [])


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
}


class ScoreFile:
    """A safetensors file laid out up front (names, shapes, one dtype) and filled tensor by
    tensor, so no more than one score tensor needs to be in memory. Readers see an ordinary
    safetensors file (8-byte header length, JSON header, contiguous little-endian data).
    Use as a context manager: leaving it without an error checks that every tensor came."""

    def __init__(self, path: Path, shapes: Mapping[str, torch.Size], dtype: torch.dtype, meta):
        self.dtype = dtype
        width = torch.empty((), dtype=dtype).element_size()
        header: dict[str, Any] = {"__metadata__": dict(meta)}
        self.offsets: dict[str, int] = {}
        self.shapes = dict(shapes)
        end = 0
        for name, shape in shapes.items():
            size = math.prod(shape) * width
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [end, end + size],
            }
            self.offsets[name] = end
            end += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.data_start = 8 + len(text)
        self.handle = open(path, "r+b")  # noqa: SIM115 - closed by close()
        self.handle.write(len(text).to_bytes(8, "little") + text)
        self.handle.truncate(self.data_start + end)
        self.missing = set(shapes)

    def write(self, name: str, tensor: Tensor) -> None:
        """Put one tensor's data in its place."""
        if tuple(tensor.shape) != tuple(self.shapes[name]):
            raise ValueError(f"{name}: score has shape {tuple(tensor.shape)}, not the model's")
        data = tensor.detach().to(self.dtype).contiguous().cpu()
        self.handle.seek(self.data_start + self.offsets[name])
        self.handle.write(data.view(-1).view(torch.uint8).numpy().data)
        self.missing.discard(name)

    def __enter__(self) -> ScoreFile:
        return self

    def __exit__(self, error_type, *_details) -> None:
        """Close the file; after a clean exit every tensor must have been written."""
        self.handle.close()
        if error_type is None and self.missing:
            raise RuntimeError(f"score file: tensors never written: {sorted(self.missing)[:5]}")


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
            return read_tensor(loader, name)
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


def _donor_scores(
    file: Path,
    anchor: torch.nn.Module,
    donor_path: str,
    batches: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Tensor],
    groups: Sequence[tuple[str, list[str]]],
    device: torch.device,
    show: Callable[[Iterable, str], Iterable],
) -> float:
    """Fill `file` with one donor's scores, one gradient group at a time; returns the KL."""
    state = {name: p.detach() for name, p in anchor.named_parameters()}
    dtype = torch.promote_types(next(iter(state.values())).dtype, torch.float32)
    shapes = {name: tensor.shape for name, tensor in state.items()}
    kl = math.nan
    with ScoreFile(file, shapes, dtype, {"format": "pt", "donor": str(donor_path)}) as out:
        for label, names in groups:
            grads, group_kl = kl_gradients(
                anchor, batches, targets, device, lambda b, x=label: show(b, f"anchor, {x}"), names
            )
            kl = group_kl if math.isnan(kl) else kl  # the same KL in every group's pass
            # a fresh reader per group: the donor file is unmapped again when the group ends
            read = _tensor_reader(donor_path)
            for name in names:  # one score tensor at a time; each gradient freed once used
                one = {name: grads.pop(name)}
                out.write(name, functional_scores(one, state, read)[name])
            del read
    return kl


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
    granularity: Granularity = "model",
    progress: Callable[[Iterable, str], Iterable] | None = None,
) -> dict:
    """Write donor_<k>.safetensors (functional scores) and the JSON sidecar into `out_dir`.

    `granularity` picks the gradient passes (see the module docstring): `layer` for the least
    memory, `model` (one pass, the fastest) by default here; the CLI defaults to `layer`.
    """
    from transformers import AutoTokenizer

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    started = time.perf_counter()
    show = progress or (lambda items, _desc: items)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(anchor_path)
    batches = tokenize_batches(tokenizer, prompts, batch_size, max_length)
    passes = PassCounter()
    donors = []
    anchor = None
    groups: list[tuple[str, list[str]]] = []
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
            names = [name for name, _ in anchor.named_parameters()]
            groups = parameter_groups(names, granularity)
        file = out_dir / f"donor_{index}.safetensors"
        kls: list[float] = []
        fill = partial(
            _donor_scores,
            anchor=anchor,
            donor_path=donor_path,
            batches=batches,
            targets=targets,
            groups=groups,
            device=device,
            show=show,
        )
        write_file(file, lambda tmp, fill=fill, kls=kls: kls.append(fill(tmp)))
        kl = kls[0]
        passes.forward += len(groups) * len(batches)
        passes.backward += len(groups) * len(batches)
        del targets
        donors.append({"model": str(donor_path), "file": str(file.resolve()), "kl": kl})
    report = {
        "method": METHOD_NAME,
        "anchor": str(anchor_path),
        "donors": donors,
        "items": len(prompts),
        "tokens": sum(int(batch["attention_mask"].sum()) for batch in batches),
        "batches": len(batches),
        "batch_size": batch_size,
        "granularity": granularity,
        "gradient_groups": len(groups),
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
        raise RecipeError(
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
        try:
            return spec[name].validate(_scalar(source.get(name), name, spec[name].default))
        except ValueError as error:  # pydantic's, naming the value
            raise RecipeError(f"parameter `{name}`: {error}", field=name) from None

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
