"""The rules of natural niches (M2N2, Abrantes et al. 2025), shared by the M2N2 and SAE searches.

Pure functions of per-item score rows (one row per archive member, all tasks in one row, see
:func:`flat_items`), so each can be checked by hand:

- resource competition: :func:`shared_fitness`, :func:`item_fitness` (f_ij = w_j s_ij / z_j^alpha,
  z_j the column total, 0 replaced by 1);
- mate selection: :func:`first_parent_probabilities`, :func:`attraction` and
  :func:`second_parent_probabilities`, drawn with :func:`draw`; :func:`select_parents` wires
  M2N2's rule (first by shared fitness, second by attraction);
- archive update: :func:`archive_slot` (the child joins; the lowest shared fitness leaves),
  :func:`place_child` (the archive and its rows updated in place);
- split-point crossover units and SLERP's per-tensor ``t``: :func:`crossover_units`,
  :func:`draw_crossover`, :func:`crossover_t`, :func:`crossover_record`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from mergekit_sae.merging.per_tensor import conditional, layer_of
from mergekit_sae.records import MergeInput, MergeRecord

# Substrings of non-layer tensor names that sit on the input side of the decoder stack.
INPUT_SIDE = ("embed", "wte", "wpe")


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


def first_parent_probabilities(fitness: Sequence[float]) -> list[float]:
    """Probability of each member to be the first parent: proportional to shared fitness.

    All zero (nobody solves any item): uniform.
    """
    total = sum(fitness)
    if total <= 0:
        return [1.0 / len(fitness)] * len(fitness)
    return [f / total for f in fitness]


def attraction(matrix: Sequence[Sequence[float]], first: int) -> list[float]:
    """Attraction of each member to the first parent: sum_j max(0, f_ij - f_first,j).

    High for members that do well where the first parent does badly; 0 for the first parent.
    """
    anchor = matrix[first]
    return [sum(max(0.0, f - a) for f, a in zip(row, anchor, strict=True)) for row in matrix]


def second_parent_probabilities(scores: Sequence[float], first: int) -> list[float]:
    """Probability of each member to be the second parent, proportional to ``scores``.

    The first parent has probability 0; when no other member scores above 0, uniform over the
    others.
    """
    others = [0.0 if i == first else max(0.0, s) for i, s in enumerate(scores)]
    total = sum(others)
    if total <= 0:
        share = 1.0 / (len(scores) - 1)
        return [0.0 if i == first else share for i in range(len(scores))]
    return [s / total for s in others]


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


def select_parents(
    scores: Sequence[Sequence[float]],
    item_weights: Sequence[float],
    alpha: float,
    rng: random.Random,
    *,
    use_attraction: bool = True,
) -> tuple[int, int]:
    """Indices (first, second) of the parents among the archive rows ``scores`` (two draws).

    First by shared fitness; second by attraction to the first (``use_attraction``) or by
    shared fitness; never the same member twice.
    """
    if len(scores) < 2:
        raise ValueError("mate selection needs at least two archive members")
    fitness = shared_fitness(scores, alpha, item_weights)
    first = draw(first_parent_probabilities(fitness), rng)
    if use_attraction:
        pull = attraction(item_fitness(scores, alpha, item_weights), first)
    else:
        pull = fitness
    second = draw(second_parent_probabilities(pull, first), rng)
    return first, second


def archive_slot(
    scores: Sequence[Sequence[float]],
    child: Sequence[float],
    capacity: int,
    alpha: float,
    item_weights: Sequence[float],
) -> int | None:
    """Where a child goes in the archive whose rows are ``scores``.

    ``len(scores)`` (append) while the archive is not full; once full, the slot of the member
    of archive + child with the lowest shared fitness (earliest on ties, the child last), or
    None when that member is the child itself.
    """
    if len(scores) < capacity:
        return len(scores)
    worst = worst_index(shared_fitness([*scores, child], alpha, item_weights))
    return None if worst == len(scores) else worst


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
