"""An edit's predicted reach against its measured effect (``keyscope reach``).

Each point is a corpus position: its edit strength ``s(k)`` (predicted, before the edit is applied) against
the KL divergence of its next-token distribution (unedited ‖ edited), measured with the edit applied. The
positions the scan ranked highest (predicted reached) are drawn apart from the random positions; filled
markers are the positions that actually changed (KL above the threshold, or a flipped top-1), the dashed line
is the threshold, and the subject's own perturbed forms are ticked on the strength axis for scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def reach_figure(top_strength: Sequence[float], top_kl: Sequence[float], top_changed: Sequence[bool],
                 random_strength: Sequence[float], random_kl: Sequence[float], random_changed: Sequence[bool],
                 kl_threshold: float | None = None, form_strengths: Sequence[float] = (), title: str = "",
                 floor: float = 1e-9) -> Figure:
    """Scatter of predicted ``s(k)`` (x) against measured KL (y, log scale, values below ``floor`` drawn at
    it) for the top positions and the random ones; changed positions filled, the rest hollow; the KL
    threshold dashed; ``form_strengths`` (the subject's forms) as ticks along the bottom."""
    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups = (("top (predicted reached)", top_strength, top_kl, top_changed, "tab:red"),
              ("random positions", random_strength, random_kl, random_changed, "tab:blue"))
    for label, strength, kl, changed, colour in groups:
        x = np.asarray(strength, dtype=float)
        y = np.maximum(np.asarray(kl, dtype=float), floor)
        hit = np.asarray(changed, dtype=bool)
        if x.size == 0:
            continue
        ax.scatter(x[hit], y[hit], color=colour, s=24, label=f"{label}, changed ({int(hit.sum())}/{x.size})")
        ax.scatter(x[~hit], y[~hit], facecolors="none", edgecolors=colour, s=24,
                   label=f"{label}, unchanged ({int((~hit).sum())}/{x.size})")
    if kl_threshold is not None and np.isfinite(kl_threshold):
        ax.axhline(max(kl_threshold, floor), color="grey", linestyle="--", linewidth=1,
                   label=f"changed: KL > {kl_threshold:.2g} (or top-1 flip)")
    forms = np.asarray(form_strengths, dtype=float)
    if forms.size:  # ticks along the bottom edge: x in data, y in axes coordinates
        ax.plot(forms, np.full(forms.size, 0.02), "|", color="tab:green", markersize=12,
                transform=ax.get_xaxis_transform(), label=f"the subject's own forms (n={forms.size})")
    ax.set_yscale("log")
    ax.set_xlabel("predicted edit strength s(k)")
    ax.set_ylabel("measured KL(unedited ‖ edited) of the next token")
    if title:
        ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return fig


def reach_edits_figure(top_kl_median: Sequence[float], random_kl_median: Sequence[float], title: str = "",
                       floor: float = 1e-9) -> Figure:
    """One point per edit: the median KL of its random positions (x) against that of its top positions (y),
    log-log with the diagonal; points above it are edits whose predicted reach changed the model more than
    random text."""
    fig = Figure(figsize=(5.2, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.maximum(np.asarray(random_kl_median, dtype=float), floor)
    y = np.maximum(np.asarray(top_kl_median, dtype=float), floor)
    above = y > x
    ax.scatter(x[above], y[above], color="tab:red", s=20, label=f"top above random ({int(above.sum())}/{x.size})")
    ax.scatter(x[~above], y[~above], color="tab:blue", s=20,
               label=f"top at or below random ({int((~above).sum())}/{x.size})")
    if x.size:
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("median KL, random positions")
    ax.set_ylabel("median KL, top positions by s(k)")
    if title:
        ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    return fig
