"""Tiny random Llama checkpoints and recipe helpers shared by the method tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny_models import make_llama

# three layers and grouped-query attention, so gradients and filters have something to select
METHOD_LLAMA = dict(num_hidden_layers=3, num_key_value_heads=1)


def build_tiny_llama(path: Path, seed: int, zero_fraction: float = 0.0, **overrides) -> Path:
    """Save a random LlamaForCausalLM (safetensors); optionally zero a fraction of each weight."""
    model = make_llama(seed, **{**METHOD_LLAMA, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
            if zero_fraction:
                parameter.mul_(torch.rand_like(parameter) >= zero_fraction)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model (single or sharded safetensors)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def save_weights(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Overwrite a saved single-shard model's weights."""
    (shard,) = sorted(Path(path).glob("*.safetensors"))
    save_file(dict(tensors), shard, metadata={"format": "pt"})


def write_recipe(path: Path, recipe: Mapping) -> Path:
    """Write a recipe mapping as YAML."""
    path.write_text(yaml.safe_dump(dict(recipe), sort_keys=False))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run a console entry point in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-c", _ENTRY, *args], capture_output=True, text=True, timeout=300
    )


_ENTRY = (
    "import sys; from importlib.metadata import entry_points; "
    "name = sys.argv.pop(1); "
    "(ep,) = [e for e in entry_points(group='console_scripts') if e.name == name]; "
    "sys.exit(ep.load()())"
)
