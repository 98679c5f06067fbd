"""Answer extraction and comparison for exact-match tasks, following lm-eval's gsm8k filters."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# lm-eval gsm8k "strict-match": the number after "#### ".
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
# lm-eval gsm8k "flexible-extract": the last number-like run in the text (group_select: -1).
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# Characters lm-eval's gsm8k exact_match ignores before comparing.
_IGNORED = re.compile(r",|\$")


def extract_strict(text: str) -> str | None:
    """The answer after the first ``#### `` marker, or None when there is none."""
    match = STRICT_PATTERN.search(text)
    return match.group(1) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number in the text, or None when it holds no number."""
    matches = FLEXIBLE_PATTERN.findall(text)
    if not matches:
        return None
    return next(group for group in matches[-1] if group)


def extract_answer(text: str) -> str | None:
    """The strict ``#### N`` answer when present, else the flexible last number."""
    strict = extract_strict(text)
    return strict if strict is not None else extract_flexible(text)


def reference_answer(answer: str | int | float) -> str:
    """The target of an item: the text after ``####`` when the answer holds a full solution."""
    text = str(answer)
    return text.split("####")[-1].strip() if "####" in text else text.strip()


def normalize_number(text: str) -> Decimal | None:
    """Parse a number, ignoring thousands commas, a dollar sign and a trailing period."""
    cleaned = _IGNORED.sub("", text.strip()).rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def answers_match(predicted: str | None, reference: str) -> bool:
    """True when both parse to the same number (so "1,000" == "1000.0"), else exact text match."""
    if predicted is None:
        return False
    a, b = normalize_number(predicted), normalize_number(reference)
    if a is not None and b is not None:
        return a == b
    return predicted.strip() == reference.strip()
