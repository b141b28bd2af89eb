"""Figure 5 of "Keys to Robust Edits": ROME's edited values are "loud voices".

The distribution over edits of the value norm at the edited key ``k*`` before the edit, ``‖W k* (+ b)‖``,
and after it, ``‖v*‖`` (``v*`` the value the rank-one update installs at ``k*``). Norms spread over orders of
magnitude, so the x axis is logarithmic; each histogram's median is drawn and given in the legend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

COLOURS = {"before": "#1f77b4", "after": "#d62728"}


def value_norms(before: Sequence[float], after: Sequence[float], title: str = "") -> Figure:
    """Histograms of ``‖v‖`` before (``before``, ``(n,)``) and after (``after``, ``(n,)``) the edits on shared
    log-spaced bins, with dashed lines at the medians; the legend gives the medians and the median ratio."""
    before = np.asarray(before, dtype=float)
    after = np.asarray(after, dtype=float)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    values = np.concatenate([before, after])
    values = values[np.isfinite(values) & (values > 0)]
    lo, hi = (values.min(), values.max()) if values.size else (1e-2, 1e2)
    lo, hi = (lo / 1.5, hi * 1.5) if hi > lo else (lo / 2, lo * 2)
    bins = np.geomspace(lo, hi, 40)
    series = (("before", before, r"before: $\|W k^* (+b)\|$"), ("after", after, r"after: $\|v^*\|$"))
    for name, v, label in series:
        v = v[np.isfinite(v) & (v > 0)]
        if not v.size:
            continue
        median = float(np.median(v))
        ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.35, color=COLOURS[name],
                label=f"{label} (median {median:.3g})")
        ax.hist(v, bins=bins, histtype="step", color=COLOURS[name])
        ax.axvline(median, color=COLOURS[name], lw=1.0, ls="--")
    ax.set_xscale("log")
    if before.size and after.size and before.size == after.size:
        ratio = float(np.median(after / before))
        ax.plot([], [], " ", label=f"median ratio after/before: {ratio:.3g}")
    ax.set_xlabel(r"value norm at the edited key $k^*$")
    ax.set_ylabel("edits")
    ax.set_title(title or "Value norms before and after ROME edits")
    ax.legend(fontsize=8, frameon=False)
    return fig
