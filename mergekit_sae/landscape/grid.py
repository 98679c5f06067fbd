"""The resumable grid run: every model's loss (and curvature) at every grid point.

Layout of OUT/: ``landscape.csv`` and ``landscape.png`` (written whole at the end), and
``.work/options.json`` (what the run computes) with ``.work/points.jsonl`` (one finished point
per line, rewritten whole after each point with :func:`mergekit_sae.atomic.write_text`). A
rerun with the same options skips the finished points; a rerun with other options is refused
unless ``force`` clears ``.work/``. Points are visited model by model, alpha-major; the CSV
lists them in that order, so a resumed run writes the same CSV as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mergekit_sae.atomic import write_text
from mergekit_sae.errors import OutputFolderError, UsageError
from mergekit_sae.landscape.directions import draw_directions, filter_normalize, point
from mergekit_sae.landscape.hessian import LossFn, convexity, curvature

WORK = ".work"
OPTIONS_FILE = "options.json"
POINTS_FILE = "points.jsonl"
CSV_FILE = "landscape.csv"
PNG_FILE = "landscape.png"


@dataclass(frozen=True)
class Entry:
    """One model of the map: a label and a loader of (parameters, loss function)."""

    label: str
    load: Callable[[], tuple[dict[str, torch.Tensor], LossFn]]


@dataclass(frozen=True)
class GridSettings:
    """The grid and what is computed at each point."""

    grid: int = 11
    span: float = 1.0
    seed: int = 0
    convexity: bool = False
    hessian_params: tuple[str, ...] = ()  # fnmatch patterns; empty: every parameter
    eig_tol: float = 1e-3
    eig_maxiter: int | None = None

    def axis(self) -> list[float]:
        """The alpha (and beta) values: ``grid`` points evenly spaced on [-span, span]."""
        return [float(v) for v in np.linspace(-self.span, self.span, self.grid)]


def columns(settings: GridSettings) -> list[str]:
    """The CSV columns."""
    extra = ["lambda_min", "lambda_max", "convexity"] if settings.convexity else []
    return ["model", "alpha", "beta", "loss", *extra]


def hessian_subset(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The parameters the Hessian is taken over: those matching a pattern (all when none)."""
    from fnmatch import fnmatchcase

    if not patterns:
        return list(names)
    chosen = [n for n in names if any(fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise UsageError(f"--hessian-params {unmatched[0]!r} matches no parameter")
    return chosen


def prepare(out: Path, options: Mapping[str, Any], *, force: bool) -> list[dict]:
    """Make OUT/.work for these options; return the points an earlier run finished."""
    work = out / WORK
    saved = work / OPTIONS_FILE
    if force and work.exists():
        shutil.rmtree(work)
    if saved.is_file():
        old = json.loads(saved.read_text(encoding="utf-8"))
        if old != json.loads(json.dumps(options)):
            changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
            raise OutputFolderError(
                f"{out} holds a landscape run with other options ({', '.join(changed)}); "
                "rerun with the same options to resume, or pass --force to start over",
                file=out,
            )
        points_file = work / POINTS_FILE
        if not points_file.is_file():
            return []
        lines = points_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    write_text(saved, json.dumps(options, indent=2, sort_keys=True) + "\n")
    return []


def run_grid(
    entries: Sequence[Entry],
    out: Path,
    settings: GridSettings,
    options: Mapping[str, Any],
    *,
    force: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Compute the missing points of every model, then write the CSV; return all points."""
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise UsageError(f"model labels must differ: {labels}")
    done = prepare(
        out, {**options, "grid": _settings_dict(settings), "models": labels}, force=force
    )
    finished = {(p["model"], p["i"], p["j"]) for p in done}
    axis = settings.axis()
    total = len(entries) * len(axis) ** 2
    raw = None
    with tqdm(total=total, initial=len(finished), unit="point", disable=not progress) as bar:
        for entry in entries:
            todo = [
                (i, j)
                for i in range(len(axis))
                for j in range(len(axis))
                if (entry.label, i, j) not in finished
            ]
            if not todo and raw is not None:
                continue
            params, loss_fn = entry.load()
            if raw is None:
                raw = draw_directions(params, settings.seed)
            d1, d2 = (filter_normalize(d, params) for d in raw)
            subset = hessian_subset(list(params), settings.hessian_params)
            bar.set_description(entry.label)
            for i, j in todo:
                values = _point_values(
                    loss_fn, point(params, d1, d2, axis[i], axis[j]), subset, settings
                )
                done.append({"model": entry.label, "i": i, "j": j, **values})
                write_text(out / WORK / POINTS_FILE, "".join(json.dumps(p) + "\n" for p in done))
                bar.update()
            del params, loss_fn
    ordered = sorted(done, key=lambda p: (labels.index(p["model"]), p["i"], p["j"]))
    write_text(out / CSV_FILE, to_csv(ordered, settings))
    return ordered


def _point_values(loss_fn: LossFn, params, subset, settings: GridSettings) -> dict[str, float]:
    """The loss at one point, with its extreme eigenvalues and convexity when asked."""
    if not settings.convexity:
        with torch.no_grad():
            return {"loss": float(loss_fn(params))}
    found = curvature(
        loss_fn,
        params,
        subset,
        tol=settings.eig_tol,
        maxiter=settings.eig_maxiter,
        seed=settings.seed,
    )
    return {
        "loss": found.loss,
        "lambda_min": found.lambda_min,
        "lambda_max": found.lambda_max,
        "convexity": convexity(found.lambda_min, found.lambda_max),
    }


def to_csv(points: Sequence[Mapping[str, Any]], settings: GridSettings) -> str:
    """The CSV text of the points (alpha and beta from the grid indices)."""
    axis = settings.axis()
    names = columns(settings)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for p in points:
        row = {**p, "alpha": axis[p["i"]], "beta": axis[p["j"]]}
        writer.writerow([row[name] for name in names])
    return buffer.getvalue()


def _settings_dict(settings: GridSettings) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(settings)
    data["hessian_params"] = list(settings.hessian_params)
    return data
