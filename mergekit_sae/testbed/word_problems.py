"""GSM8K-style word problems for the real-model testbed: two or three steps, `#### N` answers.

Written in ordinary English for a pretrained tokenizer: each problem mixes a product with a
sum or a difference, and its worked solution states one equation per step on a single line
(the evaluator stops at the first newline), then `#### N`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from mergekit_sae.testbed.math_task import apply, distinct_splits
from mergekit_sae.testbed.vocab import ANSWER_MARK

NAMES = (("Tom", "he"), ("Sam", "he"), ("Ben", "he"), ("Max", "he"), ("Leo", "he"),
         ("Amy", "she"), ("Eva", "she"), ("Mia", "she"), ("Zoe", "she"),
         ("Ann", "she"))  # fmt: skip
ITEMS = ("apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps", "cookies")
PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Template:
    """One problem shape: the text, how its numbers are drawn, and the steps that solve it."""

    text: str
    # draws (a, b, c) from an rng; every intermediate result must come out non-negative
    draw: Callable[[random.Random], tuple[int, int, int]]
    # each step is (left operand, operator, right operand) over names a, b, c and results x, y
    steps: tuple[tuple[str, str, str], ...]


def _factors_and_small(rng: random.Random) -> tuple[int, int, int]:
    """Two factors 2-9 and a number 1-20."""
    return rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)


def _change(rng: random.Random) -> tuple[int, int, int]:
    """A count 2-9, a price 2-9 and a payment that covers the cost (up to 20 more)."""
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return a, b, a * b + rng.randint(0, 20)


def _counts(rng: random.Random) -> tuple[int, int, int]:
    """A count 10-40, a count 2-20 and a count 1 up to their sum."""
    a, b = rng.randint(10, 40), rng.randint(2, 20)
    return a, b, rng.randint(1, a + b)


TEMPLATES: tuple[Template, ...] = (
    Template("{Name} has {a} bags with {b} {item} in each. {Pron} gives away {c} {item}. "
             "How many {item} does {pron} have left?",
             lambda rng: _with_limit(rng, _factors_and_small, lambda a, b, c: a * b >= c),
             (("a", "*", "b"), ("x", "-", "c"))),
    Template("{Name} buys {a} {item} that cost {b} dollars each and pays with {c} dollars. "
             "How many dollars of change does {pron} get?",
             _change, (("a", "*", "b"), ("c", "-", "x"))),
    Template("{Name} has {a} {item}. {Pron} buys {b} more and then gives {c} to {Other}. "
             "How many {item} does {pron} have now?",
             _counts, (("a", "+", "b"), ("x", "-", "c"))),
    Template("{Name} packs {a} boxes of {b} {item} each and finds {c} more. "
             "How many {item} does {pron} have in all?",
             _factors_and_small, (("a", "*", "b"), ("x", "+", "c"))),
    Template("{Name} has {a} {item} and {Other} has {b} times as many. They give {c} away. "
             "How many {item} do they have together now?",
             lambda rng: _with_limit(rng, _factors_and_small, lambda a, b, c: a + a * b >= c),
             (("a", "*", "b"), ("a", "+", "x"), ("y", "-", "c"))),
)  # fmt: skip


def _with_limit(rng, draw, ok) -> tuple[int, int, int]:
    """Draw with `draw` until `ok(a, b, c)` holds."""
    while True:
        numbers = draw(rng)
        if ok(*numbers):
            return numbers


def worked_solution(template: Template, a: int, b: int, c: int) -> tuple[str, int]:
    """The one-line solution (one equation per step, then `#### N`) and the final number."""
    values = {"a": a, "b": b, "c": c}
    parts = []
    for (left, op, right), result in zip(template.steps, ("x", "y", "z"), strict=False):
        values[result] = apply(op, values[left], values[right])
        parts.append(f"{values[left]} {op} {values[right]} = {values[result]}.")
    answer = values[("x", "y", "z")[len(template.steps) - 1]]
    return " ".join([*parts, f"{ANSWER_MARK} {answer}"]), answer


def word_problem(rng: random.Random) -> dict:
    """One problem item: prompt, answer and worked solution (the training target)."""
    template = rng.choice(TEMPLATES)
    (name, pron), (other, _) = rng.sample(NAMES, 2)
    a, b, c = template.draw(rng)
    question = template.text.format(
        Name=name, Pron=pron.capitalize(), pron=pron, Other=other, item=rng.choice(ITEMS),
        a=a, b=b, c=c,
    )  # fmt: skip
    solution, answer = worked_solution(template, a, b, c)
    return {"prompt": PROMPT.format(question=question), "answer": str(answer), "solution": solution}


def word_problem_splits(rng: random.Random, n_train: int, n_test: int):
    """Distinct word problems split into disjoint (train, test) lists."""
    return distinct_splits(lambda: word_problem(rng), n_train, n_test, what="word problems")
