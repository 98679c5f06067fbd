"""Generation-stability metrics (repetition rate, distinct-n) against hand-counted texts."""

from __future__ import annotations

import pytest

from mergekit_sae.evaluate.repetition import distinct_n, loops, ngrams, repetition_rate


def test_ngrams_split_on_whitespace_and_overlap():
    assert ngrams("a  b\nc d", 2) == [("a", "b"), ("b", "c"), ("c", "d")]
    assert ngrams("a b", 3) == []
    with pytest.raises(ValueError, match="n-gram size"):
        ngrams("a", 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7 7 7 7 7", True),  # "7 7 7" at positions 0, 1, 2
        ("7 7 7 7", False),  # "7 7 7" twice only
        ("a b a b a b a", True),  # "a b a" at 0, 2, 4
        ("a b a b a b", False),  # "a b a" and "b a b" twice each
        ("the sky is blue and the grass is green", False),
        ("a a", False),  # fewer tokens than n
        ("", False),
    ],
)
def test_loops_with_default_trigrams_three_times(text, expected):
    assert loops(text) is expected


def test_loops_with_other_n_and_threshold():
    assert loops("x y z x y z", threshold=2)
    assert not loops("x y z x y z")
    assert loops("the cat the dog the", n=1)
    assert not loops("the cat the dog", n=1)
    with pytest.raises(ValueError, match="threshold of at least 2"):
        loops("a a a", threshold=1)


def test_repetition_rate_is_the_share_of_looping_texts():
    texts = ["7 7 7 7 7", "a b c", "", "a b a b a b a b"]
    assert repetition_rate(texts) == 0.5
    assert repetition_rate(texts, n=1, threshold=2) == 0.5  # "a b c" and "" have no repeat
    assert repetition_rate(["a b a b"], n=2, threshold=2) == 1.0
    assert repetition_rate([]) == 0.0


def test_distinct_n_counts_over_all_texts_without_crossing_them():
    assert distinct_n(["a b a", "a c"], 1) == pytest.approx(3 / 5)  # a, b, c of 5 tokens
    assert distinct_n(["a b a", "a c"], 2) == 1.0  # (a b), (b a), (a c)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["a b", "b a"], 2) == 1.0  # no bigram (b, b) across the two texts
    assert distinct_n(["a", ""], 2) == 0.0
    assert distinct_n([], 1) == 0.0
