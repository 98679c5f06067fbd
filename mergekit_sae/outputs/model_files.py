"""The model files of OUT/: weights, index and configuration of the final model, and the
first parent's tokenizer, replaced as one set (``atomic.replace_files``)."""

from __future__ import annotations

from pathlib import Path

from mergekit_sae.atomic import replace_files
from mergekit_sae.merging.stream import CONFIG_FILES

WEIGHT_SUFFIXES = (".safetensors", ".bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def model_files(folder: Path) -> list[Path]:
    """The weight shards, weight index and configuration files of a model folder."""
    names = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in WEIGHT_INDEXES)
    ]
    return names + [folder / n for n in CONFIG_FILES if (folder / n).is_file()]


def write_model(best_dir: Path, tokenizer_dir: Path, out: Path) -> list[Path]:
    """Replace the model files in OUT/ by the best model's and the tokenizer, as one set.

    Model and tokenizer files of an earlier write that the new set lacks (other shards) go.
    """
    sources = model_files(best_dir)
    sources += [tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    old = [p.name for p in model_files(out)] if out.is_dir() else []
    old += [n for n in TOKENIZER_FILES if (out / n).is_file()]
    return replace_files(out, sources, remove=old)
