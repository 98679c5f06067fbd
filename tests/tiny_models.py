"""One builder of tiny random Llama models, shared by every test module."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


def make_llama(seed: int, *, matrix_std: float | None = None, **config) -> LlamaForCausalLM:
    """A seeded random LlamaForCausalLM (TINY_LLAMA updated by `config`), in eval mode.

    `matrix_std` redraws every 2-d weight from N(0, matrix_std): larger weights than the
    default init give sharper, more varied outputs.
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config}))
    if matrix_std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.normal_(0, matrix_std)
    return model.eval()
