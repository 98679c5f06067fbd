"""The testbed's task data and tokenizer, drawn from the seed, and the JSONL files they go to."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from mergekit_sae.testbed.config import TestbedConfig
from mergekit_sae.testbed.math_task import math_splits
from mergekit_sae.testbed.multilingual_task import World, make_world, multilingual_splits
from mergekit_sae.testbed.vocab import build_tokenizer, build_vocab, words_of

# task name -> (evaluator type of mergekit_sae.evaluate, keys every item must carry)
TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "math": ("generate_exact_match", ("prompt", "answer")),
    "multilingual": ("multiple_choice", ("prompt", "choices", "label")),
}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class TestbedData:
    """Both tasks' splits, the world behind the multilingual task, and the shared tokenizer."""

    __test__ = False  # not a pytest class

    splits: dict[str, dict[str, list[dict]]]  # task -> split -> items
    world: World
    tokenizer: object  # a transformers PreTrainedTokenizerFast


def make_data(config: TestbedConfig) -> TestbedData:
    """Draw both tasks from `config.seed` and build a tokenizer covering every word they use."""
    rng = random.Random(config.seed)
    math_train, math_test = math_splits(
        rng, config.math_train, config.math_test, config.max_operand
    )
    world = make_world(rng, config.n_entities, config.n_test_entities, config.n_languages)
    ml_train, ml_test = multilingual_splits(world, rng, config.n_choices)
    texts = [item["prompt"] + " " + item["solution"] for item in math_train + math_test]
    tokenizer = build_tokenizer(build_vocab(words_of(texts) | world.words()), config.max_length)
    splits = {
        "math": {"train": math_train, "test": math_test},
        "multilingual": {"train": ml_train, "test": ml_test},
    }
    return TestbedData(splits, world, tokenizer)


def task_file(root: Path, task: str, split: str) -> Path:
    """Where a task's split lives under a testbed folder."""
    return root / "data" / task / f"{split}.jsonl"


def write_jsonl(path: Path, items: list[dict]) -> None:
    """Write one JSON object per line (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def write_splits(root: Path, splits: dict[str, dict[str, list[dict]]]) -> None:
    """Write each task's splits (task -> split -> items) as JSONL under `root/data/`."""
    for task, by_split in splits.items():
        for split, items in by_split.items():
            write_jsonl(task_file(root, task, split), items)


def task_specs(root: Path, options: dict[str, dict] | None = None) -> dict[str, dict]:
    """`mergekit_sae.evaluate.TaskSpec` fields of both tasks, with the JSONL paths under
    `root` and any per-task `options` (such as `max_new_tokens`)."""
    return {
        task: {
            "name": task,
            "type": kind,
            **{split: str(task_file(root, task, split)) for split in SPLITS},
            **(options or {}).get(task, {}),
        }
        for task, (kind, _) in TASKS.items()
    }
