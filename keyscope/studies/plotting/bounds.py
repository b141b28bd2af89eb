"""The lemmas on real edits: the edit strength α of each query against the measured change of its logits.

Left: robustness queries (Lemma 4.6) — rephrased, shuffled and long-context prompts of the edited subject —
α against the change of the new-vs-true log-probability gap, per method: an edit method filled (ROME: circles,
the next one, e.g. MEMIT: squares), its adaptor (``method+rep``) hollow with the same marker (α of the adapted
key). Right: specificity (Lemma 4.7) — neighbourhood prompts and corpus-scan prefixes — α
against the drop of the log-probability of their own unedited top-1 token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

COLOURS = {"rephrase": "#1f77b4", "shuffle": "#d62728", "long": "#2ca02c", "neighbourhood": "#9467bd",
           "corpus": "#ff7f0e"}
MARKERS = ("o", "s", "^", "D")


def alpha_scatter(rows: Sequence[dict], title: str = "", bases: Mapping[str, str | None] | None = None) -> Figure:
    """``rows``: dicts with ``method``, ``kind``, ``alpha`` and ``gap_change`` (robustness kinds) or
    ``own_logprob_change`` (specificity kinds), as :mod:`keyscope.evaluation.bounds` writes them. ``bases`` maps a method
    to the method whose edit it adapts (``None``: its own edit); an adaptor shares its base's marker, hollow."""
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    bases = dict(bases or {})
    roots = list(dict.fromkeys(bases.get(m) or m for m in methods))
    styles = [(m, MARKERS[roots.index(bases.get(m) or m) % len(MARKERS)], bases.get(m) is None) for m in methods]
    for ax, kinds, field, ylabel in (
        (left, ("rephrase", "shuffle", "long"), "gap_change", r"$\Delta$ [log P(new) − log P(true)]"),
        (right, ("neighbourhood", "corpus"), "own_logprob_change", r"$\Delta$ log P(own top-1)"),
    ):
        for kind in kinds:
            for method, marker, filled in styles:
                pts = [(r["alpha"], r[field]) for r in rows if r["kind"] == kind and r["method"] == method]
                if not pts:
                    continue
                x, y = np.asarray(pts, dtype=float).T
                ax.scatter(x, y, s=10, alpha=0.6, label=f"{kind} ({method})", marker=marker,
                           facecolors=COLOURS[kind] if filled else "none", edgecolors=COLOURS[kind], linewidths=0.7)
        ax.axvline(0, color="0.7", lw=0.6)
        ax.axvline(1, color="0.7", lw=0.6, ls="--")
        ax.axhline(0, color="0.7", lw=0.6)
        ax.set_xlabel(r"edit strength $\alpha = k^\top C^{-1}k^* / k^{*\top}C^{-1}k^*$" if bases in ([], ["rome"])
                      else r"edit strength $\alpha = \sum_l w_l s_l(k_l)$ (one layer: $k^\top C^{-1}k^* / k^{*\top}C^{-1}k^*$)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, frameon=False)
    left.set_title("robustness (Lemma 4.6)", fontsize=10)
    right.set_title("specificity (Lemma 4.7)", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
