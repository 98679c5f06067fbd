"""The GSM8K-style math task: two-step word problems whose solution ends in `#### N`."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from mergekit_sae.testbed.vocab import ANSWER_MARK

NAMES = (("tom", "he"), ("sam", "he"), ("ben", "he"), ("max", "he"),
         ("amy", "she"), ("eva", "she"), ("lia", "she"), ("zoe", "she"))  # fmt: skip
ITEMS = ("apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps")

# (template, first operation, second operation); a, b, c are the numbers in order of appearance.
TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("{name} has {a} {item} . {pron} buys {b} more and gives {c} away . "
     "how many {item} does {pron} have ?", "+", "-"),
    ("{name} had {a} {item} . {pron} lost {b} and found {c} . "
     "how many {item} does {pron} have ?", "-", "+"),
    ("a box has {a} {item} . {name} puts in {b} and takes out {c} . "
     "how many {item} are in the box ?", "+", "-"),
    ("{name} has {a} {item} and {other} has {b} . they give {c} away . "
     "how many {item} do they have ?", "+", "-"),
)  # fmt: skip


def apply(op: str, x: int, y: int) -> int:
    """Apply `+`, `-` or `*`."""
    if op == "*":
        return x * y
    return x + y if op == "+" else x - y


def solution(a: int, b: int, c: int, op1: str, op2: str) -> tuple[str, int]:
    """The worked solution (one equation per step, then `#### N`) and the final number."""
    x = apply(op1, a, b)
    y = apply(op2, x, c)
    return f"{a} {op1} {b} = {x} . {x} {op2} {c} = {y} . {ANSWER_MARK} {y}", y


def random_problem(rng: random.Random, max_operand: int) -> dict:
    """Draw one problem with every intermediate result non-negative."""
    template, op1, op2 = rng.choice(TEMPLATES)
    (name, pron), (other, _) = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    while True:
        a, b, c = (rng.randint(1, max_operand) for _ in range(3))
        x = apply(op1, a, b)
        if x >= 0 and apply(op2, x, c) >= 0:
            break
    prompt = template.format(name=name, pron=pron, other=other, item=item, a=a, b=b, c=c)
    worked, answer = solution(a, b, c, op1, op2)
    return {"prompt": prompt, "answer": str(answer), "solution": worked}


def distinct_splits(
    draw: Callable[[], dict], n_train: int, n_test: int, *, what: str, hint: str = ""
):
    """Draw items until `n_train + n_test` distinct prompts, split into (train, test) lists."""
    seen: dict[str, dict] = {}
    for _ in range(50 * (n_train + n_test)):
        if len(seen) == n_train + n_test:
            break
        item = draw()
        seen.setdefault(item["prompt"], item)
    else:
        raise ValueError(f"could not draw {n_train + n_test} distinct {what}{hint}")
    items = list(seen.values())
    return items[:n_train], items[n_train:]


def math_splits(rng: random.Random, n_train: int, n_test: int, max_operand: int):
    """Draw distinct problems and split them into disjoint (train, test) lists."""
    return distinct_splits(
        lambda: random_problem(rng, max_operand),
        n_train,
        n_test,
        what="math problems",
        hint=f" with max_operand={max_operand}; lower math_train/math_test or raise max_operand",
    )


def random_chain(rng: random.Random, max_operand: int) -> str:
    """A worked two-step calculation on random numbers, in the format of a solution."""
    while True:
        a, b, c = (rng.randint(1, max_operand) for _ in range(3))
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        if apply(op1, a, b) >= 0 and apply(op2, apply(op1, a, b), c) >= 0:
            return solution(a, b, c, op1, op2)[0]


def arithmetic_documents(rng: random.Random, max_operand: int) -> Iterator[str]:
    """Generic arithmetic text for pretraining: worked calculations without a word problem."""
    while True:
        yield random_chain(rng, max_operand)
