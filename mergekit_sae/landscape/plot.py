"""Heatmaps of a landscape: one column per model, the loss on one shared colour scale, and a
second row of convexity (fixed scale [0, 0.5], bright = balanced curvature) when computed.

Built with matplotlib's object API on the Agg canvas (no pyplot state), as the run plots are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mergekit_sae.atomic import write_file
from mergekit_sae.landscape.hessian import CONVEXITY_MAX


def grids(points: Sequence[Mapping[str, Any]], labels: Sequence[str], size: int, key: str):
    """One (beta, alpha) array of ``key`` per model label."""
    out = {label: np.full((size, size), np.nan) for label in labels}
    for p in points:
        out[p["model"]][p["j"], p["i"]] = p[key]
    return out


def landscape_figure(
    points: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    size: int,
    span: float,
    with_convexity: bool,
) -> Figure:
    """The figure: a loss row (and a convexity row) of heatmaps over (alpha, beta)."""
    rows = [("loss", "answer loss (NLL / token)", "viridis")]
    if with_convexity:
        rows.append(("convexity", "convexity |l_min| / |l_max|", "magma"))
    figure = Figure(figsize=(3.2 * len(labels) + 1.2, 3.0 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(labels), squeeze=False)
    extent = (-span, span, -span, span)
    for r, (key, title, cmap) in enumerate(rows):
        maps = grids(points, labels, size, key)
        if key == "convexity":
            vmin, vmax = 0.0, CONVEXITY_MAX
        else:
            stacked = np.stack(list(maps.values()))
            vmin, vmax = float(np.nanmin(stacked)), float(np.nanmax(stacked))
        image = None
        for c, label in enumerate(labels):
            ax = axes[r][c]
            image = ax.imshow(
                maps[label],
                origin="lower",
                extent=extent,
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                aspect="equal",
                interpolation="nearest",
            )
            finite = maps[label][np.isfinite(maps[label])]
            if key == "loss" and finite.size == maps[label].size and np.ptp(finite) > 0:
                ax.contour(maps[label], levels=8, colors="white", linewidths=0.5, extent=extent)
            ax.set_title(label if r == 0 else f"{label} (convexity)", fontsize=9)
            ax.set_xlabel("alpha")
            if c == 0:
                ax.set_ylabel("beta")
        figure.colorbar(image, ax=list(axes[r]), label=title, shrink=0.9)
    return figure


def write_landscape_png(
    path: str | Path, points, labels, size: int, span: float, with_convexity: bool
) -> Path:
    """Draw the figure and write it atomically as a PNG."""
    figure = landscape_figure(points, labels, size, span, with_convexity)
    return write_file(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
