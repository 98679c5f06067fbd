"""The accuracy-sparsity Pareto front over every candidate a run scored, evicted ones included.

A candidate is a member with training scores (``Member.scores``, its task-weighted mean
``Member.performance`` = ``train_mean``) and a fraction of zeros (``Member.zero_fraction``).
One candidate dominates another when it is at least as good in both (higher ``train_mean``,
more zeros) and strictly better in one; the front is the set no candidate dominates.

Scores are used as recorded: a member's scores come from the items of the step that last
scored it (``Member.scored_at``), and a search that resamples items every step (SAE) scores
members of different steps on different items, so the front compares some candidates on
different items. That is also why the final model is chosen by training scores only: the
test split is held out for reporting.

At the end, at most ``pareto_max`` front members are scored on the test splits. When the front
is larger, the kept ones are: the final model, the front's most accurate and its sparsest
member, then, one at a time, the member farthest (in rank along the front, ordered by zeros)
from those already kept, so the kept members spread evenly over the trade-off.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from mergekit_sae.atomic import write_text
from mergekit_sae.outputs.plots import save_figure
from mergekit_sae.records import Member, performance

PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"
EPSILON = 1e-12  # slack for float rounding when comparing a mean with best - tolerance


@dataclass(frozen=True)
class Point:
    """One scored candidate: its id, the step its scores are from, zeros and training means."""

    candidate: str
    step: int
    zeros: float
    train_mean: float
    train: Mapping[str, float]


def points(members: Mapping[str, Member]) -> list[Point]:
    """Every member with training scores, in order of creation."""
    return [
        Point(m.id, m.scored_at or 0, m.zero_fraction, float(m.performance), dict(m.scores))
        for m in members.values()
        if m.scores and m.performance is not None
    ]


def dominates(a: Point, b: Point) -> bool:
    """Whether ``a`` is at least as accurate and as sparse as ``b`` and better in one."""
    at_least = a.train_mean >= b.train_mean and a.zeros >= b.zeros
    return at_least and (a.train_mean > b.train_mean or a.zeros > b.zeros)


def front(candidates: Sequence[Point]) -> list[Point]:
    """The non-dominated candidates, densest (most accurate) first; equal points all stay."""
    kept = [p for p in candidates if not any(dominates(q, p) for q in candidates)]
    return sorted(kept, key=lambda p: (p.zeros, -p.train_mean, p.candidate))


def sparsest_within(points_on_front: Sequence[Point], tolerance: float) -> Point:
    """The sparsest point whose training mean is within ``tolerance`` accuracy points (0-100)
    of the highest; ties go to the more accurate, then the earlier candidate."""
    if not points_on_front:
        raise ValueError("the front is empty: no candidate was scored")
    top = max(p.train_mean for p in points_on_front)
    eligible = [p for p in points_on_front if p.train_mean >= top - tolerance / 100 - EPSILON]
    return max(eligible, key=lambda p: (p.zeros, p.train_mean, _order(p)))


def _order(point: Point) -> int:
    """Earlier candidates rank higher on ties (``m0003`` before ``m0010``)."""
    digits = "".join(c for c in point.candidate if c.isdigit())
    return -int(digits) if digits else 0


def cap(points_on_front: Sequence[Point], limit: int, keep: Sequence[str] = ()) -> list[Point]:
    """At most ``limit`` front points: ``keep`` ids, the two ends, then evenly spread ones.

    Returned in front order (by zeros).
    """
    ordered = list(points_on_front)
    if len(ordered) <= limit:
        return ordered
    ids = [p.candidate for p in ordered]
    chosen: list[int] = []
    for index in [*(ids.index(k) for k in keep if k in ids), 0, len(ordered) - 1]:
        if index not in chosen and len(chosen) < limit:
            chosen.append(index)
    while len(chosen) < limit:
        rest = [i for i in range(len(ordered)) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(abs(i - j) for j in chosen), -i)))
    return [ordered[i] for i in sorted(chosen)]


def score_front(
    kept: Sequence[Point],
    members: Mapping[str, Member],
    known: Mapping[str, Mapping[str, float]],
    score: Callable[[str], Mapping[str, float]],
) -> dict[str, dict[str, float]]:
    """Test scores of the kept points: ``known`` ones as given, others by ``score(id)``.

    Each member's ``test_scores`` is set.
    """
    scores = {}
    for point in kept:
        found = known.get(point.candidate)
        scores[point.candidate] = dict(found if found is not None else score(point.candidate))
        members[point.candidate].test_scores = scores[point.candidate]
    return scores


def csv_text(
    points_on_front: Sequence[Point],
    test: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str],
    weights: Mapping[str, float],
) -> str:
    """``pareto.csv``: one row per front point; per task its test score, then its train score.

    Points beyond the cap (not scored on the test splits) have empty test cells.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["candidate", "step", "zeros", "train_mean", "test_mean", *tasks]
        + [f"train_{task}" for task in tasks]
    )
    for point in points_on_front:
        scores = test.get(point.candidate)
        tested = (
            [repr(performance(scores, weights))] + [repr(scores[task]) for task in tasks]
            if scores is not None
            else [""] * (1 + len(tasks))
        )
        writer.writerow(
            [point.candidate, point.step, repr(point.zeros), repr(point.train_mean)]
            + tested
            + [repr(point.train[task]) for task in tasks]
        )
    return buffer.getvalue()


def plot_front(
    candidates: Sequence[Point], points_on_front: Sequence[Point], chosen: str | None
) -> Figure:
    """All candidates in grey, the front as a highlighted line, the final model as a star."""
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.scatter(
        [p.zeros for p in candidates],
        [p.train_mean for p in candidates],
        color="0.7",
        s=14,
        label=f"candidates ({len(candidates)})",
    )
    axes.plot(
        [p.zeros for p in points_on_front],
        [p.train_mean for p in points_on_front],
        color="tab:red",
        marker="o",
        label=f"Pareto front ({len(points_on_front)})",
    )
    for point in points_on_front:
        axes.annotate(
            point.candidate,
            (point.zeros, point.train_mean),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    marked = [p for p in candidates if p.candidate == chosen]
    if marked:
        axes.scatter(
            [marked[0].zeros],
            [marked[0].train_mean],
            marker="*",
            s=220,
            color="tab:blue",
            zorder=3,
            label=f"final model ({chosen})",
        )
    axes.set(
        xlabel="fraction of zeros",
        ylabel="training mean (as recorded)",
        title="Accuracy-sparsity Pareto front",
    )
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def write_front(
    out: Path,
    candidates: Sequence[Point],
    points_on_front: Sequence[Point],
    test: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str],
    weights: Mapping[str, float],
    chosen: str | None,
) -> list[Path]:
    """Write ``OUT/pareto.csv`` (every front member) and ``OUT/pareto.png``."""
    table = write_text(out / PARETO_CSV, csv_text(points_on_front, test, tasks, weights))
    image = save_figure(plot_front(candidates, points_on_front, chosen), out / PARETO_PNG)
    return [Path(table), Path(image)]
