"""Sequential editing: each metric against the number of edits, one line per method (``keyscope sequential``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def sequential(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float | None]]]],
               labels: Mapping[str, str] | None = None, title: str = "") -> Figure:
    """One panel per metric of ``curves`` (``{metric: {method: [(n_edits, value), …]}}``, fractions; ``None`` for
    no value), each method a line in percent against the number of edits."""
    metrics = list(curves)
    columns = min(4, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / columns)
    fig = Figure(figsize=(3.0 * columns, 2.5 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    colours = {}
    for ax, metric in zip(axes.flat, metrics):
        for method, points in curves[metric].items():
            x = np.array([n for n, _ in points], dtype=float)
            y = np.array([np.nan if v is None else 100 * v for _, v in points], dtype=float)
            colour = colours.setdefault(method, f"C{len(colours)}")
            ax.plot(x, y, marker="o", ms=3, color=colour, label=method)
        ax.set_title((labels or {}).get(metric, metric), fontsize=9)
        ax.set_xlabel("edits", fontsize=8)
        ax.set_ylim(-2, 102)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    axes.flat[0].set_ylabel("%", fontsize=8)
    axes.flat[0].legend(fontsize=7, frameon=False)
    fig.suptitle(title or "Sequential editing: earlier edits kept, neighbours kept", fontsize=10)
    return fig
