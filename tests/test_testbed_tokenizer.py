"""The testbed tokenizer: one token per number and word, special tokens, a lossless round trip."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mergekit_sae.testbed.vocab import MAX_NUMBER, build_tokenizer, build_vocab

WORDS = ["tom", "has", "apples", "how", "many", "?", "kalu", "vemo"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tokenizer after a save_pretrained / AutoTokenizer.from_pretrained round trip."""
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(build_vocab(WORDS), model_max_length=64).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_every_number_is_one_token(tokenizer):
    for n in range(MAX_NUMBER + 1):
        ids = tokenizer(str(n), add_special_tokens=False)["input_ids"]
        assert len(ids) == 1
        assert tokenizer.convert_ids_to_tokens(ids) == [str(n)]
        assert ids[0] != tokenizer.unk_token_id


def test_round_trip_of_a_problem(tokenizer):
    text = "tom has 12 apples . how many apples ? 12 + 7 = 19 . #### 19"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len(text.split())
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_punctuation_is_split_from_words(tokenizer):
    spaced = tokenizer("tom has 7 . #### 7 ?", add_special_tokens=False)["input_ids"]
    glued = tokenizer("tom has 7.####7?", add_special_tokens=False)["input_ids"]
    assert glued == spaced


def test_special_tokens_and_unknown_words(tokenizer):
    assert {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token} == {
        "<pad>",
        "<s>",
        "</s>",
    }
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    ids = tokenizer("tom zzzq", add_special_tokens=False)["input_ids"]
    assert ids[1] == tokenizer.unk_token_id


def test_vocabulary_ids_do_not_depend_on_word_order():
    assert build_vocab(WORDS) == build_vocab(list(reversed(WORDS)))
