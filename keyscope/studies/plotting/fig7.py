"""Figure 7 of "Keys to Robust Edits": every Table 1 metric of ROME+REP against the gate threshold τ.

One fitted adaptor per edit is evaluated at each τ (no retraining); ROME alone is drawn as dotted
horizontal lines in the same colours for reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

#: One colour per metric family: a kind's ID (solid) and OOD (dashed) lines share it.
COLOURS = {"success": "#000000", "locality": "#7f7f7f", "rephrase": "#1f77b4", "shuffle": "#d62728",
           "shuffle_words": "#ff7f0e", "long": "#2ca02c"}


def _family(name: str) -> str:
    for suffix in ("_ood_new", "_ood", "_id"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def tau_sweep(taus: Sequence[float], metrics: Mapping[str, Sequence[float | None]],
              baseline: Mapping[str, float | None] | None = None, title: str = "",
              labels: Mapping[str, str] | None = None) -> Figure:
    """Lines of ``metrics[name]`` ``(len(taus),)`` (fractions; ``None`` for metrics without prompts) against
    ``taus``, in percent, labelled by ``labels``; out-of-domain metrics dashed, ``baseline`` (ROME alone) as
    dotted lines."""
    fig = Figure(figsize=(7.6, 4.4), layout="constrained")
    ax = fig.add_subplot()
    x = np.asarray(taus, dtype=float)
    for name, values in metrics.items():
        colour = COLOURS.get(_family(name), "#8c564b")
        y = np.array([np.nan if v is None else 100 * v for v in values], dtype=float)
        style = "--" if "_ood" in name else "-"
        ax.plot(x, y, style, marker="o", ms=3, color=colour, label=(labels or {}).get(name, name))
        if baseline is not None and baseline.get(name) is not None:
            ax.axhline(100 * baseline[name], color=colour, lw=0.8, ls=":")
    ax.set_xlabel(r"gate threshold $\tau$")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title or r"ROME+REP against the gate threshold $\tau$ (dotted: ROME)")
    ax.legend(fontsize=7, ncol=2, frameon=False, loc="lower left")
    return fig
