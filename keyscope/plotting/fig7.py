"""Figure 7 of "Keys to Robust Edits": every Table 1 metric of ROME+REP against the gate threshold τ.

One fitted adaptor per edit is evaluated at each τ (no retraining); ROME alone is drawn as dotted
horizontal lines in the same colours for reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

LABELS = {
    "success": "Success", "locality": "Locality",
    "rephrase_id": "Rephrase ID", "shuffle_id": "Shuffle ID", "long_id": "Long ID",
    "rephrase_ood": "Rephrase OOD", "shuffle_ood": "Shuffle OOD", "long_ood": "Long OOD",
}


def tau_sweep(taus: Sequence[float], metrics: Mapping[str, Sequence[float | None]],
              baseline: Mapping[str, float | None] | None = None, title: str = "") -> Figure:
    """Lines of ``metrics[name]`` ``(len(taus),)`` (fractions; ``None`` for metrics without prompts) against
    ``taus``, in percent; ``baseline`` (ROME alone) as dotted lines."""
    fig = Figure(figsize=(7.2, 4.2), layout="constrained")
    ax = fig.add_subplot()
    colours = iter(["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"])
    x = np.asarray(taus, dtype=float)
    for name, values in metrics.items():
        colour = next(colours)
        y = np.array([np.nan if v is None else 100 * v for v in values], dtype=float)
        style = "-" if not name.endswith("_ood") else "--"
        ax.plot(x, y, style, marker="o", ms=3, color=colour, label=LABELS.get(name, name))
        if baseline is not None and baseline.get(name) is not None:
            ax.axhline(100 * baseline[name], color=colour, lw=0.8, ls=":")
    ax.set_xlabel(r"gate threshold $\tau$")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title or r"ROME+REP against the gate threshold $\tau$ (dotted: ROME)")
    ax.legend(fontsize=7, ncol=2, frameon=False, loc="lower left")
    return fig
