"""The testbed's models: a tiny Llama (or Qwen3) pretrained on generic text, two experts from it.

The base reads worked calculations and English statements and questions about the world; it
knows arithmetic, the solution format and the facts, but has never seen a word problem or a
question in another language. Each expert continues from the base on one task with a small
learning rate, so both stay near the base and a merge of them is meaningful.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence

import torch

from mergekit_sae.testbed.config import StageConfig, TestbedConfig
from mergekit_sae.testbed.data import TestbedData
from mergekit_sae.testbed.math_task import arithmetic_documents
from mergekit_sae.testbed.multilingual_task import english_documents, english_questions
from mergekit_sae.testbed.train import Example, train

Log = Callable[[str], None]


def new_model(config: TestbedConfig, tokenizer):
    """A randomly initialised causal LM of `config.architecture`, sized by `config` (seeded by
    `config.seed`): Llama with untied embeddings, or Qwen3 with tied ones."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(config.seed)
    if config.architecture == "qwen3":
        head_dim = config.hidden_size // config.num_heads
        qwen3 = Qwen3Config(**settings, head_dim=head_dim, tie_word_embeddings=True)
        return Qwen3ForCausalLM(qwen3).eval()
    return LlamaForCausalLM(LlamaConfig(**settings, tie_word_embeddings=False)).eval()


def mixture(sources: Sequence[tuple[float, Callable[[], Example]]], rng: random.Random):
    """A batch drawer that takes each example from a source chosen with the given weights."""
    weights = [w for w, _ in sources]
    draws = [d for _, d in sources]

    def draw_batch(n: int) -> list[Example]:
        return [rng.choices(draws, weights)[0]() for _ in range(n)]

    return draw_batch


def sampler(items: Sequence[Example], rng: random.Random) -> Callable[[], Example]:
    """Draw one of `items` uniformly at random."""
    return lambda: rng.choice(items)


def trained(model, tokenizer, draw_batch, stage: StageConfig, seed: int, log: Log | None = None):
    """A copy of `model` trained by `stage` (the argument itself is left untouched)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    train(model, tokenizer, draw_batch, stage, log=log)
    return model


def pretrain_base(config: TestbedConfig, data: TestbedData, log: Log | None = None):
    """The base: full-text loss on worked calculations and English facts and questions."""
    rng = random.Random(config.seed + 1)
    arithmetic = arithmetic_documents(rng, config.max_operand)
    english = english_documents(data.world, rng)
    draw = mixture([(0.5, lambda: ("", next(arithmetic))), (0.5, lambda: ("", next(english)))], rng)
    model = new_model(config, data.tokenizer)
    return trained(model, data.tokenizer, draw, config.base, config.seed + 1, log)


def math_examples(data: TestbedData) -> list[Example]:
    """Training word problems with their worked solutions as targets."""
    return [(item["prompt"], item["solution"]) for item in data.splits["math"]["train"]]


def multilingual_examples(data: TestbedData) -> list[Example]:
    """Training questions with their right choice as target."""
    items = data.splits["multilingual"]["train"]
    return [(item["prompt"], item["choices"][item["label"]]) for item in items]


def finetune_math(config: TestbedConfig, data: TestbedData, base, log: Log | None = None):
    """The math expert: loss on the worked solution of training word problems, with a small
    share of multilingual questions (`math_expert_cross_share`), so that, like real experts,
    it keeps a little of the other skill."""
    rng = random.Random(config.seed + 2)
    share = config.math_expert_cross_share
    draw = mixture(
        [
            (1.0 - share, sampler(math_examples(data), rng)),
            (share, sampler(multilingual_examples(data), rng)),
        ],
        rng,
    )
    return trained(base, data.tokenizer, draw, config.math_expert, config.seed + 2, log)


def finetune_multilingual(config: TestbedConfig, data: TestbedData, base, log: Log | None = None):
    """The multilingual expert: loss on the right choice of training questions, with a share
    of English questions mixed in so the base's English knowledge stays usable, and a small
    share of word problems (`multilingual_expert_cross_share`)."""
    rng = random.Random(config.seed + 3)
    replay = english_questions(data.world)
    share = config.multilingual_expert_cross_share
    draw = mixture(
        [
            (1.0 - config.english_replay - share, sampler(multilingual_examples(data), rng)),
            (config.english_replay, sampler(replay, rng)),
            (share, sampler(math_examples(data), rng)),
        ],
        rng,
    )
    return trained(base, data.tokenizer, draw, config.multilingual_expert, config.seed + 3, log)
