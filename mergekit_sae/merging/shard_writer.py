"""A safetensors writer that puts each tensor on disk as it comes, holding none in memory.

MergeKit's ``TensorWriter`` keeps a whole shard (up to its 5 GB default) in memory until the
shard is full; beside a resident scoring model that is one more copy of the model. This
writer gives each shard file a header area big enough for any of the tensors it may hold
(reserved from their names), writes every tensor's bytes straight after it, and fills the
header in when the shard closes; the unused room is JSON whitespace, which safetensors
itself pads with. Shard names, the index file and the split rule are MergeKit's: a tensor
that would take a non-empty shard past ``max_shard_size`` opens the next one. It writes into
a staged folder (``mergekit_sae.atomic.atomic_dir``), which syncs and publishes it whole.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES  # name -> torch dtype

MAX_DIMS = 8  # dimensions a tensor may have: the header room is reserved for this many
_DIGITS = 20  # digits of the largest 64-bit size or offset
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_METADATA = {"format": "pt"}
PREFIX, EXTENSION = "model", "safetensors"


def header_room(names: Iterable[str]) -> int:
    """Bytes of header that hold the entries of any subset of ``names`` (8-byte aligned)."""
    widest = max(len(name) for name in _NAMES.values())
    entry = {
        "dtype": "D" * widest,
        "shape": [10**_DIGITS - 1] * MAX_DIMS,
        "data_offsets": [10**_DIGITS - 1] * 2,
    }
    room = len(json.dumps({"__metadata__": _METADATA}))
    room += sum(len(json.dumps({name: entry})) for name in names)
    return -(-room // 8) * 8


class StreamingShardWriter:
    """Write named tensors into ``out_path`` as MergeKit-named safetensors shards."""

    def __init__(self, out_path: Path, names: Iterable[str], max_shard_size: int) -> None:
        self.out_path = Path(out_path)
        self.out_path.mkdir(parents=True, exist_ok=True)
        self.names = set(names)
        self.room = header_room(self.names)
        self.max_shard_size = max_shard_size
        self.shards: list[dict[str, dict[str, object]]] = []
        self.weight_map: dict[str, int] = {}
        self.total_size = 0
        self._file: BinaryIO | None = None
        self._size = 0

    def save_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` to the current shard (opening the next one when it would overflow)."""
        if name not in self.names or name in self.weight_map:
            what = "was already written" if name in self.weight_map else "was not announced"
            raise ValueError(f"tensor {name!r} {what}: the shard header has no room for it")
        if tensor.dim() > MAX_DIMS or tensor.dtype not in _NAMES:
            raise ValueError(
                f"tensor {name!r}: {tensor.dim()} dimensions of {tensor.dtype}; safetensors "
                f"shards here hold at most {MAX_DIMS} dimensions of {sorted(_NAMES.values())}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        full = self._size + data.nbytes > self.max_shard_size
        if self._file is not None and self.shards[-1] and full:  # MergeKit's rule
            self._close_shard()
        if self._file is None:
            self._open_shard()
        self._file.write(memoryview(data))  # type: ignore[union-attr]
        self.shards[-1][name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._size, self._size + data.nbytes],
        }
        self.weight_map[name] = len(self.shards) - 1
        self._size += data.nbytes
        self.total_size += data.nbytes

    def finalize(self) -> None:
        """Close the last shard, give the shards their final names and write the index."""
        if self._file is not None:
            self._close_shard()
        count = len(self.shards)
        final = [shard_name(index, count) for index in range(count)]
        for index, name in enumerate(final):
            os.replace(self._path(index), self.out_path / name)
        if count > 1:
            index_file = self.out_path / f"{PREFIX}.{EXTENSION}.index.json"
            weight_map = {name: final[shard] for name, shard in self.weight_map.items()}
            content = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            index_file.write_text(json.dumps(content, indent=2))

    def _path(self, index: int) -> Path:
        return self.out_path / f"{PREFIX}-{index + 1}.{EXTENSION}"

    def _open_shard(self) -> None:
        self.shards.append({})
        self._file = open(self._path(len(self.shards) - 1), "wb")  # noqa: SIM115 - kept open
        self._file.seek(8 + self.room)
        self._size = 0

    def _close_shard(self) -> None:
        assert self._file is not None
        header = json.dumps({"__metadata__": _METADATA, **self.shards[-1]}).encode()
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.room) + header.ljust(self.room, b" "))
        self._file.close()
        self._file = None


def shard_name(index: int, count: int) -> str:
    """MergeKit's (and Hugging Face's) name of shard ``index`` of ``count``."""
    if count == 1:
        return f"{PREFIX}.{EXTENSION}"
    return f"{PREFIX}-{index + 1:05d}-of-{count:05d}.{EXTENSION}"
