"""Tiny models, tasks and a fake evaluator for the evolve tests (built on the fly, no downloads)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tiny_models import make_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mergekit_sae.merging.stream import open_model

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "\n", "Q:", "A:", "####", "yes", "no", "red", "blue"]
VOCAB = WORDS + [str(n) for n in range(20)]
# The fake evaluator reads these tensors: task "a" the first, task "b" the second.
PROBE = {
    "a": "model.layers.0.mlp.up_proj.weight",
    "b": "model.layers.1.self_attn.q_proj.weight",
}


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread (tiny tensors: thread start-up dominates on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB (words split on spaces)."""
    word_level = models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>")
    tok = Tokenizer(word_level)
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_llama(path: Path, seed: int, *, tied: bool = False, vocab_extra: int = 0) -> Path:
    """Save a random 2-layer Llama (hidden 16) with its tokenizer under path.

    ``vocab_extra`` adds embedding rows beyond the tokenizer's vocabulary (a resized expert).
    """
    model = make_llama(
        seed,
        matrix_std=0.5,
        vocab_size=len(VOCAB) + vocab_extra,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, items: Sequence[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def task_files(root: Path) -> dict[str, Path]:
    """Small multiple-choice and exact-match train/test files."""
    colours = [
        {"prompt": f"Q: {n} A:", "choices": ["red", "blue", "yes"], "label": n % 3}
        for n in range(20)
    ]
    sums = [{"prompt": f"Q: {n} {n} A:", "answer": str(min(2 * n, 19))} for n in range(20)]
    return {
        "mc_train": write_jsonl(root / "mc" / "train.jsonl", colours[:14]),
        "mc_test": write_jsonl(root / "mc" / "test.jsonl", colours[14:]),
        "em_train": write_jsonl(root / "em" / "train.jsonl", sums[:14]),
        "em_test": write_jsonl(root / "em" / "test.jsonl", sums[14:]),
    }


def recipe_data(models: Sequence[Path], files: Mapping[str, Path], **overrides: Any) -> dict:
    """A small valid recipe over the tiny models and task files."""
    data: dict[str, Any] = {
        "models": [str(m) for m in models],
        "tasks": [
            {
                "name": "colours",
                "type": "multiple_choice",
                "train": str(files["mc_train"]),
                "test": str(files["mc_test"]),
                "subsample": 6,
            },
            {
                "name": "sums",
                "type": "generate_exact_match",
                "train": str(files["em_train"]),
                "test": str(files["em_test"]),
                "subsample": 4,
                "max_new_tokens": 2,
            },
        ],
        "steps": 3,
        "sae": {"archive_size": 4, "children_per_step": 2},
        "dtype": "float32",
        "device": "cpu",
    }
    data.update(overrides)
    return data


def deep_lineage_recipe(models: Sequence[str]) -> dict:
    """A recipe for FakeEvaluator ("lm_eval" tasks a and b) whose best member has a lineage
    of several merges: sparse members win (no cap on their zeros)."""
    return {
        "models": list(models),
        "tasks": [{"name": name, "type": "lm_eval", "subsample": 12} for name in "ab"],
        "steps": 4,
        "sae": {
            "archive_size": 4,
            "children_per_step": 2,
            "sparsity_term": {"weight": 2.0, "max_zeros": None},
        },
        "dtype": "float32",
        "device": "cpu",
    }


def run_fake(data: Mapping[str, Any], out: Path, **options: Any):
    """A whole evolve run of a recipe, scored by a FakeEvaluator, without progress bars."""
    from mergekit_sae.recipe.loading import parse_recipe
    from mergekit_sae.run import run

    return run(
        parse_recipe(dict(data)),
        out,
        progress=False,
        make_evaluator=lambda recipe, inputs: FakeEvaluator(),
        **options,
    )


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def assert_identical(first: Path, second: Path) -> None:
    """Two model directories hold the same tensor names, dtypes and bits."""
    a, b = load_weights(first), load_weights(second)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


class FakeEvaluator:
    """Scores from the weights themselves: task t on items I is the fraction of i in I with
    PROBE[t].flatten()[i] > 0, so pruning (zeros) lowers the score and each subsample differs."""

    task_names = ("a", "b")

    def __init__(self, n_items: int = 40):
        self.n_items = n_items
        self.current: dict[str, torch.Tensor] = {}
        self.scored = 0

    def items(self, task: str, split: str) -> list[int]:
        return list(range(self.n_items)) if split == "train" else list(range(self.n_items, 80))

    def receive(self, name: str, tensor: torch.Tensor) -> None:
        if name in PROBE.values():
            self.current[name] = tensor.detach().clone()

    def load(self, path: Path) -> None:
        loader = open_model(path)
        self.current = {name: loader.get_tensor(name) for name in PROBE.values()}

    def score_items(self, items: Mapping[str, Sequence[int]]) -> dict[str, list[float]]:
        """Per-item scores (one fitness evaluation, counted in ``scored``)."""
        self.scored += 1
        return {
            task: probe_items(self.current[PROBE[task]], list(ids)) for task, ids in items.items()
        }

    def score(self, items: Mapping[str, Sequence[int]]) -> dict[str, float]:
        """Task scores (the final test report); not counted in ``scored``."""
        return {
            task: probe_score(self.current[PROBE[task]], list(ids)) for task, ids in items.items()
        }


def probe_items(tensor: torch.Tensor, ids: Sequence[int]) -> list[float]:
    """Whether each chosen flat position holds a positive value (1.0) or not (0.0)."""
    flat = tensor.flatten()
    return [float(flat[i % flat.numel()] > 0) for i in ids]


def probe_score(tensor: torch.Tensor, ids: Sequence[int]) -> float:
    """Fraction of the chosen flat positions holding a positive value."""
    values = probe_items(tensor, ids)
    return sum(values) / len(values)
