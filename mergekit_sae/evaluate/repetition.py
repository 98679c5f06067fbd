"""Generation-stability metrics: how often outputs fall into loops, and how varied they are.

Texts are split into tokens on whitespace (``str.split``), so the numbers do not depend on the
model's tokenizer and compare across models.

- A text *loops* when some n-gram of its tokens (``n=3`` by default) occurs at least
  ``threshold`` times (3 by default; occurrences may overlap). ``"7 7 7 7 7"`` loops (the
  3-gram ``7 7 7`` occurs 3 times), so does ``"a b a b a b a b"`` (``a b a`` occurs 3 times);
  a text with fewer than ``n`` tokens never loops. ``repetition_rate`` is the fraction of
  texts that loop (the measure behind SCF-RKL's "repetition rate").
- ``distinct_n`` is the number of distinct n-grams over all texts divided by the total number
  of n-grams over all texts (Li et al. 2016's corpus-level distinct-n).

Both are 0.0 when there is nothing to count (no texts, or no n-grams).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

DEFAULT_N = 3
DEFAULT_THRESHOLD = 3


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The n-grams of a text's whitespace tokens, in order (overlapping)."""
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    tokens = text.split()
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def loops(text: str, n: int = DEFAULT_N, threshold: int = DEFAULT_THRESHOLD) -> bool:
    """True when some n-gram of the text occurs at least `threshold` times."""
    if threshold < 2:
        raise ValueError(f"a loop needs a threshold of at least 2 occurrences, got {threshold}")
    counts = Counter(ngrams(text, n))
    return bool(counts) and max(counts.values()) >= threshold


def repetition_rate(
    texts: Sequence[str], n: int = DEFAULT_N, threshold: int = DEFAULT_THRESHOLD
) -> float:
    """Fraction of the texts that loop (see :func:`loops`); 0.0 for no texts."""
    if not texts:
        return 0.0
    return sum(loops(text, n, threshold) for text in texts) / len(texts)


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all texts divided by all n-grams; 0.0 when there are none."""
    grams = [gram for text in texts for gram in ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else 0.0
