"""Cheap checks of a model folder's weight files, before anything loads them.

The files checked are the ones MergeKit's loader reads: ``model.safetensors`` (or the shards its
``.index.json`` lists), else ``pytorch_model.bin`` (or its shards). A safetensors file is
checked without reading its tensors: the 8-byte header length, the JSON header, and the data
size the header implies against the file's size, so a truncated or corrupt file fails with one
line naming it instead of a deserializer traceback. Pickle files (``.bin``, ``.pt``, ``.pth``)
can run code when loaded and are refused unless allowed. This module imports nothing heavy.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from mergekit_sae.errors import MergeInputError

SAFETENSORS = "model.safetensors"
PICKLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
ALLOW_PICKLE_ENV = "MERGEKIT_SAE_ALLOW_PICKLE"
# A safetensors header beyond this is corrupt (the format caps it at 100 MB).
MAX_HEADER = 100_000_000
# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def pickle_allowed_by_env() -> bool:
    """Whether ``MERGEKIT_SAE_ALLOW_PICKLE`` allows pickle weights (for MergeKit runs)."""
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def conversion_hint(folder: Path) -> str:
    """How to turn a pickle checkpoint into safetensors, as one shell line."""
    return (
        'convert it to safetensors with: python -c "from transformers import '
        f"AutoModelForCausalLM as M; M.from_pretrained('{folder}')"
        f".save_pretrained('{folder}', safe_serialization=True)\""
    )


def refuse_pickle(folder: Path, files: list[Path]) -> MergeInputError:
    """The error for a model whose only weights are pickle files."""
    names = ", ".join(f.name for f in files[:3])
    return MergeInputError(
        f"{folder}: holds only pickle weights ({names}); loading a pickle can run arbitrary "
        f"code, so it is refused. {conversion_hint(folder)}; or allow it explicitly "
        f"(mergekit-sae evolve --allow-pickle, recipe field allow_pickle: true, or "
        f"{ALLOW_PICKLE_ENV}=1 for mergekit-yaml)",
        file=files[0],
    )


def check_safetensors(path: Path) -> list[str]:
    """Verify a safetensors file's header against its size; return its tensor names.

    Raises MergeInputError naming the file and what is wrong (unreadable, too short, header
    length beyond the file, header not JSON, tensor entries inconsistent, size mismatch).
    """

    def bad(problem: str) -> MergeInputError:
        return MergeInputError(f"{path}: {problem}", file=path)

    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, too short for a safetensors header (truncated?)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise bad(
                    f"header length {length} bytes does not fit in the file's {size} bytes "
                    "(truncated or not a safetensors file)"
                )
            raw = handle.read(length)
    except OSError as error:
        raise bad(f"cannot be read ({error.strerror or error})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"the safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("the safetensors header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        end = max(end, _entry_end(name, entry, bad))
    expected = 8 + length + end
    if expected != size:
        state = "truncated" if size < expected else "longer than its header says"
        raise bad(
            f"{state}: the header implies {expected} bytes ({end} of tensor data), "
            f"the file has {size}"
        )
    return [name for name in header if name != "__metadata__"]


def _entry_end(name: str, entry: object, bad) -> int:
    """The end offset of one tensor's data, after checking the entry is consistent."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
        count = math.prod(int(n) for n in shape)
        begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError):
        raise bad(f"tensor {name!r}: malformed header entry {entry!r}") from None
    width = DTYPE_BYTES.get(str(dtype))
    if width is not None and end - begin != count * width:
        raise bad(
            f"tensor {name!r}: {end - begin} bytes of data for shape {list(shape)} of {dtype} "
            f"({count * width} expected)"
        )
    if begin < 0 or end < begin:
        raise bad(f"tensor {name!r}: invalid data offsets [{begin}, {end}]")
    return end


def indexed_shards(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise MergeInputError(
            f"{index}: not a readable shard index ({type(error).__name__}: {error})", file=index
        ) from None
    shards = [index.parent / str(name) for name in names]
    for shard in shards:
        if not shard.is_file():
            raise MergeInputError(f"{index} names shard {shard.name}, which is missing", file=shard)
    return shards


def weight_files(folder: Path) -> list[Path]:
    """The weight files MergeKit would read from ``folder`` (safetensors first)."""
    for name in (SAFETENSORS, PICKLE):
        index = folder / f"{name}.index.json"
        if index.is_file():
            return indexed_shards(index)
        if (folder / name).is_file():
            return [folder / name]
    return []


def check_model_files(folder: str | Path, *, allow_pickle: bool = False) -> list[Path]:
    """Verify the weight files of a model folder; return them.

    Raises MergeInputError naming the file: no weights, a missing shard, a truncated or
    corrupt safetensors file, or pickle weights when ``allow_pickle`` is false.
    """
    folder = Path(folder)
    files = weight_files(folder)
    pickles = sorted(p for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not files:
        if pickles and not allow_pickle:
            raise refuse_pickle(folder, pickles)
        raise MergeInputError(
            f"{folder}: no model weights found (expected {SAFETENSORS} or its .index.json)",
            file=folder,
        )
    if files[0].suffix != ".safetensors":
        if not allow_pickle:
            raise refuse_pickle(folder, files)
        return files
    for path in files:
        check_safetensors(path)
    return files
