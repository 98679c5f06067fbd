"""Tiny models and a word-level tokenizer for the evaluate tests (built in memory, no downloads)."""

from __future__ import annotations

import torch
from tiny_models import make_llama
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["\n", "####", "Q:", "A:", "what", "is", "plus", "minus", "the", "colour", "of"]
WORDS += ["sky", "grass", "snow", "blue", "green", "white", "red", "le", "la", "ciel", "herbe"]
VOCAB = SPECIALS + WORDS + [str(n) for n in range(30)]


def make_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A word-level tokenizer: words split on spaces, newline kept as its own token."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side=padding_side,
    )


def random_llama(seed: int = 0, *, tie: bool = False, layers: int = 2) -> LlamaForCausalLM:
    """A random tiny Llama over VOCAB (fp32, eval mode)."""
    return make_llama(
        seed,
        matrix_std=0.3,
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def bigram_llama(transitions: dict[str, str], default: str = "\n") -> LlamaForCausalLM:
    """A Llama whose greedy next token depends only on the last token, as transitions says.

    Attention and MLP outputs are zeroed, so the last hidden state is the (one-hot) embedding of
    the current token, and lm_head maps it to the chosen successor with a large margin.
    """
    size = len(VOCAB)
    config = LlamaConfig(
        vocab_size=size,
        hidden_size=size,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    index = {w: i for i, w in enumerate(VOCAB)}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(size))
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for word in VOCAB:
            successor = transitions.get(word, default)
            model.lm_head.weight[index[successor], index[word]] = 10.0
    return model.eval()
