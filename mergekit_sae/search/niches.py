"""The rules of natural niches (M2N2, Abrantes et al. 2025), shared by the M2N2 and SAE searches.

Pure functions of per-item score rows (one row per archive member, all tasks in one row, see
:func:`flat_items`), so each can be checked by hand (only :func:`read_units` reads a file):

- resource competition: :func:`shared_fitness`, :func:`item_fitness` (f_ij = w_j s_ij / z_j^alpha,
  z_j the column total, 0 replaced by 1);
- mate selection: :func:`choose_parents` (first by a total score, second by :func:`attraction`
  to the first), with :func:`selection_probabilities` (positive part, -inf excluded, uniform
  fallback) drawn with :func:`draw`; :func:`select_parents` is M2N2's rule (the total score
  is the shared fitness);
- archive update: :func:`eviction_slot` (the child joins; the lowest total leaves),
  :func:`archive_slot` M2N2's (by shared fitness), :func:`place_child` (the archive and its
  rows updated in place);
- split-point crossover units and SLERP's per-tensor ``t``: :func:`crossover_units` (of the
  run's models: :func:`read_units`), :func:`draw_crossover`, :func:`crossover_t`,
  :func:`crossover_record`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergekit_sae.merging.per_tensor import conditional, layer_of
from mergekit_sae.merging.stream import open_model, tensor_names
from mergekit_sae.records import MergeInput, MergeRecord
from mergekit_sae.search.base import Driver

# Substrings of non-layer tensor names that sit on the input side of the decoder stack.
INPUT_SIDE = ("embed", "wte", "wpe")
EXCLUDED = float("-inf")  # a total score that is never drawn and leaves first (SAE's cap)


def shared_fitness(
    scores: Sequence[Sequence[float]], alpha: float, item_weights: Sequence[float] | None = None
) -> list[float]:
    """M2N2 resource competition: f_i = sum_j w_j s_ij / (sum_k s_kj)^alpha.

    Column totals of zero are replaced by 1 (nobody solves the item, nobody gains); ``alpha``
    0 gives the plain weighted sum. ``item_weights`` default to 1 per item.
    """
    if not scores:
        return []
    width = len(scores[0])
    if any(len(row) != width for row in scores):
        raise ValueError("every model needs a score for every item")
    weights = list(item_weights) if item_weights is not None else [1.0] * width
    totals = [sum(row[j] for row in scores) for j in range(width)]
    shares = [w / ((t if t != 0 else 1.0) ** alpha) for w, t in zip(weights, totals, strict=True)]
    return [sum(s * share for s, share in zip(row, shares, strict=True)) for row in scores]


def flat_items(
    item_scores: Mapping[str, Sequence[float]], task_weights: Mapping[str, float]
) -> tuple[list[float], list[float]]:
    """Per-item scores of all tasks in one row, and the weight that makes their sum the mean.

    Item j of task t weighs w_t / (n_t * sum of weights), so the weighted sum of the row is
    the task-weighted mean of the task accuracies (the performance).
    """
    total = sum(task_weights[t] for t in item_scores)
    row: list[float] = []
    weights: list[float] = []
    for task in sorted(item_scores):
        values = list(item_scores[task])
        row += values
        weights += [task_weights[task] / (len(values) * total)] * len(values)
    return row, weights


def item_shares(
    scores: Sequence[Sequence[float]], alpha: float, item_weights: Sequence[float]
) -> list[float]:
    """w_j / z_j^alpha per item, z_j the column total (0 replaced by 1), as in shared_fitness."""
    width = len(item_weights)
    totals = [sum(row[j] for row in scores) for j in range(width)]
    return [
        w / ((t if t != 0 else 1.0) ** alpha) for w, t in zip(item_weights, totals, strict=True)
    ]


def item_fitness(
    scores: Sequence[Sequence[float]], alpha: float, item_weights: Sequence[float]
) -> list[list[float]]:
    """The matrix f_ij = w_j s_ij / z_j^alpha (row sums: the shared fitness)."""
    shares = item_shares(scores, alpha, item_weights)
    return [[s * share for s, share in zip(row, shares, strict=True)] for row in scores]


def worst_index(values: Sequence[float]) -> int:
    """Index of the lowest value; on ties the earliest in archive order."""
    return min(range(len(values)), key=lambda i: (values[i], i))


def best_index(values: Sequence[float]) -> int:
    """Index of the highest value; on ties the earliest in archive order."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def attraction(matrix: Sequence[Sequence[float]], first: int) -> list[float]:
    """Attraction of each member to the first parent: sum_j max(0, f_ij - f_first,j).

    High for members that do well where the first parent does badly; 0 for the first parent.
    """
    anchor = matrix[first]
    return [sum(max(0.0, f - a) for f, a in zip(row, anchor, strict=True)) for row in matrix]


def draw(probabilities: Sequence[float], rng: random.Random) -> int:
    """An index drawn with the given probabilities (one ``rng.random()``); never one of p 0."""
    u = rng.random() * sum(probabilities)
    cumulative = 0.0
    last = None
    for index, p in enumerate(probabilities):
        if p <= 0:
            continue
        cumulative += p
        last = index
        if u < cumulative:
            return index
    if last is None:
        raise ValueError("no index has a positive probability")
    return last  # u rounded up to the total


def selection_probabilities(values: Sequence[float], exclude: int | None = None) -> list[float]:
    """Probabilities proportional to the positive part of ``values``.

    Members at -inf (EXCLUDED) and ``exclude`` get 0. When no other member has a positive
    value: uniform over those not at -inf (all but ``exclude`` when every other one is).
    """
    allowed = [i != exclude and v != EXCLUDED for i, v in enumerate(values)]
    if not any(allowed):
        allowed = [i != exclude for i in range(len(values))]
    if not any(allowed):
        raise ValueError("no member can be drawn")
    positive = [max(0.0, v) if ok else 0.0 for v, ok in zip(values, allowed, strict=True)]
    total = sum(positive)
    if total > 0:
        return [p / total for p in positive]
    share = 1.0 / sum(allowed)
    return [share if ok else 0.0 for ok in allowed]


def choose_parents(
    rows: Sequence[Sequence[float]],
    item_weights: Sequence[float],
    totals: Sequence[float],
    alpha: float,
    rng: random.Random,
    *,
    matchmaker: bool = True,
) -> tuple[int, int]:
    """Indices (first, second): the first by total score, the second by attraction to the
    first (``matchmaker``) or by total score; two different members, none at -inf while
    others are left."""
    if len(rows) < 2:
        raise ValueError("mate selection needs at least two archive members")
    first = draw(selection_probabilities(totals), rng)
    if matchmaker:
        pull = attraction(item_fitness(rows, alpha, item_weights), first)
        pull = [EXCLUDED if t == EXCLUDED else p for p, t in zip(pull, totals, strict=True)]
    else:
        pull = list(totals)
    second = draw(selection_probabilities(pull, exclude=first), rng)
    return first, second


def select_parents(
    scores: Sequence[Sequence[float]],
    item_weights: Sequence[float],
    alpha: float,
    rng: random.Random,
    *,
    use_attraction: bool = True,
) -> tuple[int, int]:
    """M2N2's mate selection among the archive rows ``scores``: :func:`choose_parents` with
    the shared fitness as the total score."""
    fitness = shared_fitness(scores, alpha, item_weights)
    return choose_parents(scores, item_weights, fitness, alpha, rng, matchmaker=use_attraction)


def eviction_slot(totals: Sequence[float], capacity: int) -> int | None:
    """Where the child (the last of ``totals``: archive then child) goes.

    The archive's length (append) while it holds fewer than ``capacity``; once full, the slot
    of the lowest total (earliest on ties, the child last), or None when that is the child.
    """
    size = len(totals) - 1
    if size < capacity:
        return size
    worst = worst_index(totals)
    return None if worst == size else worst


def archive_slot(
    scores: Sequence[Sequence[float]],
    child: Sequence[float],
    capacity: int,
    alpha: float,
    item_weights: Sequence[float],
) -> int | None:
    """M2N2's archive update: :func:`eviction_slot` with the shared fitness of archive + child
    (rows ``scores`` and ``child``) as the totals."""
    return eviction_slot(shared_fitness([*scores, child], alpha, item_weights), capacity)


def place_child(
    archive: list[str], rows: dict[str, list[float]], child: str, row: list[float], slot: int | None
) -> str | None:
    """Put a child in the archive (in place) at the slot an archive rule chose: appended, in a
    dropped member's place (its row goes), or nowhere (None); returns the dropped member's id."""
    if slot is None:
        return None
    dropped = None
    if slot == len(archive):
        archive.append(child)
    else:
        dropped = archive[slot]
        archive[slot] = child
        del rows[dropped]
    rows[child] = row
    return dropped


def fate(slot: int | None, dropped: str | None) -> str:
    """A child's fate in words, for the history: rejected, joined or replaced <id>."""
    if slot is None:
        return "rejected"
    return f"replaced {dropped}" if dropped is not None else "joined"


def crossover_units(names: Sequence[str]) -> list[list[str]]:
    """The crossover units in model order: input embeddings, layer 0 .. L-1, everything else.

    Tensors outside the decoder layers whose names contain ``embed``/``wte``/``wpe`` come
    first; the others (final norm, ``lm_head``) last. Empty units are left out.
    """
    before, after = [], []
    layers: dict[int, list[str]] = {}
    for name in names:
        layer = layer_of(name)
        if layer is not None:
            layers.setdefault(layer, []).append(name)
        elif any(mark in name for mark in INPUT_SIDE):
            before.append(name)
        else:
            after.append(name)
    units = [before, *(layers[k] for k in sorted(layers)), after]
    return [unit for unit in units if unit]


def read_units(driver: Driver) -> list[list[str]]:
    """The crossover units of the run's models, read from the first parent's tensor names."""
    path = Path(driver.members[driver.parents[0]].path)
    return crossover_units(tensor_names([open_model(path)], [path]))


def draw_crossover(units: Sequence[Sequence[str]], rng: random.Random) -> tuple[int, float]:
    """(split unit, w): the unit holding a tensor drawn uniformly, and w ~ U(0, 1).

    Tensors of the units before the split unit take t = w, the others 1 - w.
    """
    count = sum(len(unit) for unit in units)
    position = rng.randrange(count)
    split = 0
    while position >= len(units[split]):
        position -= len(units[split])
        split += 1
    return split, rng.random()


def crossover_t(units: Sequence[Sequence[str]], split: int, w: float) -> dict[str, float]:
    """SLERP's t per tensor: w for the units before ``split``, 1 - w from it on."""
    return {
        name: (w if index < split else 1.0 - w) for index, unit in enumerate(units) for name in unit
    }


def crossover_record(
    first: str, second: str, units: Sequence[Sequence[str]], split: int, w: float, dtype: str
) -> MergeRecord:
    """The MergeKit ``slerp`` stage of a child: from parent ``first`` (the base) to ``second``."""
    return MergeRecord(
        method="slerp",
        inputs=[MergeInput(member=second)],
        base_member=first,
        parameters={"t": conditional(crossover_t(units, split, w))},
        dtype=dtype,
    )
