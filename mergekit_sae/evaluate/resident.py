"""One model held in memory for scoring many candidates: weights are copied in, not reloaded."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from mergekit_sae.errors import WeightLoadError
from mergekit_sae.evaluate.device import fitting_batch_size, resolve_device, resolve_dtype
from mergekit_sae.weight_files import SAFETENSORS, weight_files


class ResidentModel:
    """A causal LM and its tokenizer, loaded once; :meth:`load_weights` swaps in new weights."""

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        dtype=None,
        *,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, default_dtype = resolve_device(device)
        self.dtype = resolve_dtype(dtype, default_dtype)
        self.path = Path(path)
        remote = {"trust_remote_code": bool(trust_remote_code)}  # off unless the recipe asks
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, **remote)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype, **remote)
        self.model.to(self.device).eval()
        # sequences per forward that fit the device's free memory (None on CPU: task defaults)
        self.batch_size = fitting_batch_size(self.model, self.device)

    def load_weights(self, source: Mapping[str, Tensor] | str | Path) -> None:
        """Copy a state dict, a safetensors file or a model folder into the parameters in place.

        Every name and shape is checked before anything is copied, so a rejected source leaves
        the model unchanged. Tied tensors (e.g. embed_tokens and lm_head) need only one name.
        """
        copy_weights(self.model, source)


def copy_weights(model: torch.nn.Module, source: Mapping[str, Tensor] | str | Path) -> None:
    """Copy weights from source into model's existing tensors (see ResidentModel.load_weights)."""
    what = "state dict" if isinstance(source, Mapping) else str(source)
    shapes, get = _open_source(source)
    targets = model.state_dict()
    groups = _tied_groups(targets)
    check_fits(shapes, targets, what)
    missing = [names[0] for names in groups if not any(n in shapes for n in names)]
    if missing:
        raise WeightLoadError(
            f"{what}: {len(missing)} tensor(s) of the model are missing: {_sample(missing)}"
        )
    plan = []
    for names in groups:
        present = [n for n in names if n in shapes]
        _check_tied(present, get, what)
        plan.append((present[0], names[0]))
    with torch.no_grad():
        for source_name, target_name in plan:
            targets[target_name].copy_(get(source_name))


def check_fits(
    shapes: Mapping[str, tuple[int, ...]], targets: Mapping[str, Tensor], what: str
) -> None:
    """Require every named tensor to exist in targets with the same shape, naming the culprit."""
    unexpected = sorted(set(shapes) - set(targets))
    if unexpected:
        raise WeightLoadError(
            f"{what}: {len(unexpected)} tensor(s) the model does not have: {_sample(unexpected)}"
        )
    for name, shape in shapes.items():
        if tuple(shape) != tuple(targets[name].shape):
            raise WeightLoadError(
                f"{what}: tensor {name} has shape {tuple(shape)}, "
                f"the model expects {tuple(targets[name].shape)}"
            )


def _check_tied(names: list[str], get: Callable[[str], Tensor], what: str) -> None:
    """Tensors given under several names of one tied group must be equal."""
    if len(names) < 2:
        return
    first = get(names[0])
    for alias in names[1:]:
        if not torch.equal(get(alias).to(first.dtype), first):
            raise WeightLoadError(
                f"{what}: {names[0]} and {alias} are tied in the model but differ in the source"
            )


def _tied_groups(state: Mapping[str, Tensor]) -> list[list[str]]:
    """Names of the model's state grouped by shared storage (tied weights share one group)."""
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    return list(groups.values())


def _sample(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def _open_source(
    source: Mapping[str, Tensor] | str | Path,
) -> tuple[dict[str, tuple[int, ...]], Callable[[str], Tensor]]:
    """Shapes of the source's tensors, and a reader that fetches one tensor by name.

    The reader opens the tensor's file for each read: safetensors returns views of a map of
    the whole file, so a file held open would keep every page read so far in the process's
    RSS, a second copy of the model beside the resident one.
    """
    if isinstance(source, Mapping):
        shapes = {name: tuple(t.shape) for name, t in source.items()}
        return shapes, source.__getitem__
    files = _safetensors_files(Path(source))
    shapes, location = {}, {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in location:
                    raise WeightLoadError(
                        f"tensor {name} appears in both {location[name]} and {file}"
                    )
                shapes[name] = tuple(f.get_slice(name).get_shape())
                location[name] = file

    def read(name: str) -> Tensor:
        with safe_open(location[name], framework="pt") as handle:
            return handle.get_tensor(name)

    return shapes, read


def _safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a weights file or a model folder (those MergeKit would read)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightLoadError(f"{path} is not a .safetensors file")
        return [path]
    if not path.is_dir():
        raise WeightLoadError(f"weights source {path} does not exist")
    files = weight_files(path)
    if not files or files[0].suffix != ".safetensors":
        raise WeightLoadError(
            f"{path} holds no safetensors weights (expected {SAFETENSORS} or its .index.json)"
        )
    return files
