"""The testbed's word-level vocabulary and tokenizer: every word and every number is one token."""

from __future__ import annotations

import random
from collections.abc import Iterable

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
ANSWER_MARK = "####"
PUNCTUATION = (".", ",", "?", ":", "+", "-", "=", ANSWER_MARK)
# One token per number, so arithmetic is a lookup over tokens rather than over digits.
MAX_NUMBER = 100
NUMBERS = tuple(str(n) for n in range(MAX_NUMBER + 1))
# Split on whitespace, then isolate punctuation ("####" stays whole) so "7." reads as "7", ".".
_SPLIT_PATTERN = r"####|[^\w\s]"

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def invented_words(
    rng: random.Random, count: int, taken: set[str], *, syllables=(2, 3)
) -> list[str]:
    """Draw `count` new pronounceable words (consonant-vowel syllables) not already in `taken`."""
    words: list[str] = []
    while len(words) < count:
        n = rng.randint(*syllables)
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def words_of(texts: Iterable[str]) -> set[str]:
    """Collect the whitespace-separated words of `texts`."""
    return {word for text in texts for word in text.split()}


def build_vocab(words: Iterable[str]) -> dict[str, int]:
    """Map specials, numbers, punctuation, then the other words (sorted) to ids."""
    fixed = [*SPECIAL_TOKENS, *NUMBERS, *PUNCTUATION]
    rest = sorted(set(words) - set(fixed))
    return {word: i for i, word in enumerate([*fixed, *rest])}


def build_tokenizer(vocab: dict[str, int], model_max_length: int):
    """Build a `PreTrainedTokenizerFast` over a word-level vocabulary that adds BOS in front."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_SPLIT_PATTERN), "isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )
