"""Streaming merges: one output tensor at a time through MergeKit's loader and a registered method.

Inputs are read with ``mergekit.io.LazyTensorLoader`` (one tensor resident per input), merged
with ``mergekit.merge_methods.merge_tensors`` and the method named by a :class:`MergeRecord`,
handed to an optional sink (the resident scoring model) and written straight to safetensors
shards (``mergekit_sae.merging.shard_writer``) in a temporary folder swapped into place only when
complete (``mergekit_sae.atomic``). Memory stays at a few tensors whatever the model size;
the written tensors are exactly what the same MergeKit stage produces.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mergekit.io import LazyTensorLoader, ShardedTensorIndex

from mergekit_sae import faults
from mergekit_sae.atomic import atomic_dir, fsync_dir, publish_dir
from mergekit_sae.dtypes import DTYPES, dtype_name, known_dtype_name, torch_dtype
from mergekit_sae.errors import MergeInputError
from mergekit_sae.merging.per_tensor import resolve_parameters
from mergekit_sae.merging.shard_writer import StreamingShardWriter
from mergekit_sae.methods import register_all
from mergekit_sae.records import MergeRecord
from mergekit_sae.sparsity import EMPTY_STATS, SparsityStats, sparsity_stats
from mergekit_sae.weight_files import check_model_files

TensorSink = Callable[[str, torch.Tensor], None]

# Files copied from a reference model so that a merged directory loads with transformers.
CONFIG_FILES = ("config.json", "generation_config.json")
DEFAULT_SHARD_SIZE = 5 * 1000**3
PREFETCH = True  # read the next tensor while the current one is merged (tests turn it off)
MAPPED_LIMIT = 64 * 2**20  # bytes read from an open shard before read_tensor closes it
_mapped_bytes: weakref.WeakKeyDictionary[LazyTensorLoader, int] = weakref.WeakKeyDictionary()
_DTYPES = DTYPES  # the name earlier code imported
__all__ = ["MergeInputError", "dtype_name", "fsync_dir", "publish_dir", "stream_merge"]


@dataclass
class MergeOutcome:
    """What a streaming merge produced: global sparsity statistics and where its time went."""

    stats: SparsityStats = EMPTY_STATS
    seconds: dict[str, float] = field(default_factory=lambda: {"merge": 0.0, "write": 0.0})


def open_model(path: Path) -> LazyTensorLoader:
    """A lazy loader over a model directory's safetensors (or .bin) shards.

    The weight files are verified first
    (:func:`~mergekit_sae.weight_files.check_model_files`:
    headers against file sizes), so a truncated or corrupt file fails as one MergeInputError
    naming it. Pickle weights pass here: whether they are allowed is decided when the run's
    inputs are resolved.
    """
    check_model_files(path, allow_pickle=True)
    try:
        return LazyTensorLoader(ShardedTensorIndex.from_disk(str(path)))
    except Exception as error:
        raise MergeInputError(
            f"{path}: the model weights cannot be read ({type(error).__name__}: {error})",
            file=path,
        ) from error


def tensor_names(loaders: Sequence[LazyTensorLoader], paths: Sequence[Path]) -> list[str]:
    """Tensor names shared by every model, in the first model's shard order; error on mismatch."""
    first = loaders[0].index.tensor_paths
    names = set(first)
    for loader, path in zip(loaders[1:], paths[1:], strict=False):
        other = set(loader.index.tensor_paths)
        if other != names:
            missing = sorted(names - other)[:3]
            extra = sorted(other - names)[:3]
            raise MergeInputError(
                f"{path} does not hold the same tensors as {paths[0]}: "
                f"missing {missing or 'none'}, extra {extra or 'none'}"
            )
    return sorted(names, key=lambda name: (first[name], name))


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model's tensors, read from the safetensors headers only."""
    from safetensors import safe_open

    index = open_model(path).index
    if not index.is_safetensors:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in index.shards:
        with safe_open(str(Path(index.base_path) / shard.filename), framework="pt") as handle:
            for name in shard.contained_keys:
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_compatible(paths: Sequence[Path]) -> None:
    """Raise naming the first tensor whose presence or shape differs between the models."""
    reference = tensor_shapes(paths[0])
    for path in paths[1:]:
        shapes = tensor_shapes(path)
        if not reference or not shapes:
            continue
        for name in sorted(set(reference) | set(shapes)):
            if name not in shapes or name not in reference:
                holder, other = (paths[0], path) if name in reference else (path, paths[0])
                raise MergeInputError(f"tensor {name!r} is in {holder} but not in {other}")
            if shapes[name] != reference[name]:
                raise MergeInputError(
                    f"tensor {name!r}: shape {shapes[name]} in {path} differs from "
                    f"{reference[name]} in {paths[0]}; the models cannot be merged"
                )


def check_shapes(name: str, tensors: Sequence[torch.Tensor], paths: Sequence[Path]) -> None:
    """Raise naming the tensor and both shapes when the inputs' shapes differ."""
    for tensor, path in zip(tensors[1:], paths[1:], strict=False):
        if tensor.shape != tensors[0].shape:
            raise MergeInputError(
                f"tensor {name!r}: shape {tuple(tensor.shape)} in {path} differs from "
                f"{tuple(tensors[0].shape)} in {paths[0]}; the models cannot be merged"
            )


def method_parameters(record: MergeRecord, ids: Sequence[str]) -> dict[str, object]:
    """``merge_tensors`` parameters of a record: shared values, and per-model values by input id.

    An input that does not set a per-model parameter gets the method's default for it, as in a
    MergeKit YAML stage.
    """
    from mergekit.merge_methods import get

    defaults = {p.name: p for p in get(record.method).spec.input_parameters}
    parameters: dict[str, object] = dict(record.parameters)
    for name in sorted({key for item in record.inputs for key in item.parameters}):
        values = {}
        for input_id, item in zip(ids, record.inputs, strict=False):
            if name in item.parameters:
                values[input_id] = item.parameters[name]
            elif name in defaults and not defaults[name].required:
                values[input_id] = defaults[name].default
        parameters[name] = values
    return parameters


def merge_tensor(
    record: MergeRecord,
    name: str,
    tensors: Sequence[torch.Tensor],
    parameters: dict[str, object],
    ids: Sequence[str],
    base_index: int | None,
) -> torch.Tensor:
    """Merge one tensor of every input (and the base, last) with the record's registered method.

    Inputs keep the dtype they are stored in (the method promotes them); the result is cast to
    ``record.dtype``, as MergeKit does for a stage with ``out_dtype`` set.
    """
    from mergekit.merge_methods import merge_tensors

    if not tensors[0].is_floating_point():
        return tensors[0]
    return merge_tensors(
        tensors,
        record.method,
        parameters=parameters,
        ids=ids,
        base_index=base_index,
        name=name,
        out_dtype=torch_dtype(record.dtype),
    )


def read_tensor(loader: LazyTensorLoader, name: str, device: str = "cpu") -> torch.Tensor:
    """One tensor of a model, through its loader, with the loader's shard closed again once
    ``MAPPED_LIMIT`` bytes were read from it.

    safetensors maps a whole shard into memory and the tensors it returns are views of that
    map, so an open shard keeps every page read so far in the process's RSS: over a merge,
    each input's full size. Closing it bounds that (the pages stay in the page cache; a
    reopen costs a header parse, which is why it is not done after every tensor). Pickle
    shards are kept open, as reopening one re-reads its whole index.
    """
    tensor = loader.get_tensor(name, device=device)
    if loader.index.is_safetensors:
        read = _mapped_bytes.get(loader, 0) + tensor.numel() * tensor.element_size()
        if read >= MAPPED_LIMIT:
            loader.flush()
            read = 0
        _mapped_bytes[loader] = read
    return tensor


def read_ahead(
    loaders: Sequence[LazyTensorLoader], names: Sequence[str], device: str
) -> Iterator[list[torch.Tensor]]:
    """Every input's tensor of each name in order; with ``PREFETCH`` the next name's tensors
    are read on a background thread while the caller merges the current ones."""

    def read(name: str) -> list[torch.Tensor]:
        return [read_tensor(loader, name, device) for loader in loaders]

    if not PREFETCH:
        yield from (read(name) for name in names)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergekit-sae-read") as pool:
        pending = pool.submit(read, names[0]) if names else None
        for index in range(len(names)):
            tensors = pending.result()
            if index + 1 < len(names):
                pending = pool.submit(read, names[index + 1])
            yield tensors


def copy_config(reference: Path, out_dir: Path) -> None:
    """Copy the configuration files that make a weights directory a loadable model."""
    for filename in CONFIG_FILES:
        if (reference / filename).is_file():
            shutil.copy2(reference / filename, out_dir / filename)


def stats_reference(prune_target: str, base: Path | None) -> Path | None:
    """The model sparsity is measured against: the base when the recipe prunes task vectors."""
    return base if prune_target == "delta" else None


def stage_inputs(
    record: MergeRecord, folder_of: Callable[[str], Path], base: Path | None
) -> tuple[list[Path], Path | None]:
    """The input folders of a recorded stage (members through ``folder_of``, original models
    by name) and its base: the base member, else ``base`` when the stage names the recipe's."""
    inputs = [
        folder_of(item.member) if item.member is not None else Path(str(item.model))
        for item in record.inputs
    ]
    if record.base_member is not None:
        return inputs, folder_of(record.base_member)
    return inputs, base if record.base_model is not None else None


def stream_merge(
    record: MergeRecord,
    inputs: Sequence[Path],
    base: Path | None,
    out_dir: Path | None,
    *,
    device: str = "cpu",
    sink: TensorSink | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    stats_base: Path | None = None,
) -> MergeOutcome:
    """Merge ``inputs`` (in ``record.inputs`` order) tensor by tensor into ``out_dir``, atomically.

    ``base`` is the record's base model directory (given to the method as the base input).
    Each merged tensor goes to ``sink`` (when given) before it is written. ``out_dir`` appears
    only once every shard and the configuration are written; an existing ``out_dir`` (left
    by an interrupted step) is replaced; ``out_dir`` None merges into the sink only. Sparsity
    statistics are taken of the merged tensors, or of merged - ``stats_base`` when given.
    """
    register_all()
    if len(inputs) != len(record.inputs):
        raise ValueError(f"{len(record.inputs)} merge inputs recorded, {len(inputs)} given")
    paths = [*inputs, *([base] if base is not None else [])]
    ids = [f"input{i}" for i in range(len(inputs))] + (["base"] if base is not None else [])
    base_index = len(inputs) if base is not None else None
    loaders = [open_model(path) for path in paths]
    names = tensor_names(loaders, paths)
    parameters = method_parameters(record, ids)

    reference = None
    if stats_base is not None and stats_base != base:
        reference = open_model(stats_base)
    outcome = MergeOutcome()
    with _staged_output(out_dir) as tmp_dir:
        writer = None
        if tmp_dir is not None:
            writer = StreamingShardWriter(tmp_dir, names, shard_size)
        reads = read_ahead(loaders, names, device)  # the next tensor is read during a merge
        for name in names:
            start = time.perf_counter()
            tensors = next(reads)
            check_shapes(name, tensors, paths)
            merged = merge_tensor(
                record, name, tensors, resolve_parameters(parameters, name), ids, base_index
            )
            if sink is not None:
                sink(name, merged)
            if merged.is_floating_point():
                measured = merged
                if stats_base is not None:
                    origin = (
                        tensors[base_index] if reference is None else read_tensor(reference, name)
                    )
                    measured = merged - origin.to(device=merged.device, dtype=merged.dtype)
                outcome.stats = outcome.stats.merged(sparsity_stats(measured))
            middle = time.perf_counter()
            if writer is not None:
                writer.save_tensor(name, merged)  # the writer copies it to the CPU
            faults.point("merge.tensor")
            outcome.seconds["merge"] += middle - start
            outcome.seconds["write"] += time.perf_counter() - middle
        start = time.perf_counter()
        if writer is not None and tmp_dir is not None:
            faults.point("merge.finalize")
            writer.finalize()
            copy_config(inputs[0], tmp_dir)
    outcome.seconds["write"] += time.perf_counter() - start
    return outcome


@contextlib.contextmanager
def _staged_output(out_dir: Path | None) -> Iterator[Path | None]:
    """A temporary folder swapped into ``out_dir`` on success (None when there is no output)."""
    if out_dir is None:
        yield None
        return
    with atomic_dir(out_dir, flush_while_writing=True) as staged:
        yield staged


def model_stats(path: Path, base: Path | None = None) -> SparsityStats:
    """Global sparsity statistics of a model on disk (of model - base when a base is given)."""
    loaders = [open_model(path)] + ([open_model(base)] if base is not None else [])
    paths = [path] + ([base] if base is not None else [])
    stats = EMPTY_STATS
    for name in tensor_names(loaders, paths):
        tensor = read_tensor(loaders[0], name)
        if not tensor.is_floating_point():
            continue
        if base is not None:
            reference = read_tensor(loaders[1], name)
            check_shapes(name, [tensor, reference], paths)
            tensor = tensor.to(torch.float32) - reference.to(torch.float32)
        stats = stats.merged(sparsity_stats(tensor))
    return stats


def model_dtype(path: Path) -> str:
    """The dtype a model's configuration declares (``float32`` when it declares none)."""
    config_path = path / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return known_dtype_name(name)
