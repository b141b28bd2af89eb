"""Figure 4 (left) of Yan et al., "Keys to Robust Edits": how strongly an edit would reach unrelated text.

For each edited subject, the top-k corpus positions by normalised edit strength ``kᵀC⁻¹k*/k*ᵀC⁻¹k*``
(subject occurrences masked) form the "unrelated neighbours" distribution; the strengths of the same
subject's rephrased forms (aliases in the same prompt) are drawn next to it for scale, with the edited key
itself at ``1``. Neighbours near or above the rephrase scores are contexts the edit would hit as hard as it
hits the subject's own paraphrases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _finite(values) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    return array[np.isfinite(array)]


def fig4_neighbors(
    neighbour_scores: Mapping[str, Sequence[float] | np.ndarray],
    rephrase_scores: Sequence[float] | np.ndarray | None = None,
    title: str | None = None,
    bins: int = 40,
) -> Figure:
    """Histograms (densities) of the top-k unrelated-neighbour scores under each exclusion filter (a mapping
    ``filter name -> scores``) and the same-subject rephrase scores (optional), with a dashed line at the
    edited key's own score ``1``.

    All inputs are 1-d arrays of normalised edit strengths; non-finite values are dropped.
    """
    neighbours = {name: _finite(values) for name, values in neighbour_scores.items()}
    rephrases = _finite(rephrase_scores) if rephrase_scores is not None else np.empty(0)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    everything = np.concatenate([*neighbours.values(), rephrases, [0.0, 1.0]])
    edges = np.histogram_bin_edges(everything, bins=bins)
    colours = ("tab:blue", "tab:purple", "tab:green", "tab:red")
    series = [(values, f"top-k corpus positions, {name} filter (n={values.size}, median "
                       f"{np.median(values) if values.size else float('nan'):.2f})", colours[i % len(colours)])
              for i, (name, values) in enumerate(neighbours.items())]
    series.append((rephrases, f"same subject, rephrased (n={rephrases.size}, median "
                              f"{np.median(rephrases) if rephrases.size else float('nan'):.2f})", "tab:orange"))
    for values, label, color in series:
        if values.size:
            ax.hist(values, bins=edges, density=True, alpha=0.45, color=color, label=label)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="edited key (= 1)")
    ax.set_xlabel(r"normalised edit strength  $k^\top C^{-1} k^* \,/\, k^{*\top} C^{-1} k^*$")
    ax.set_ylabel("density")
    ax.set_title(title or "Keys an edit reaches: corpus neighbours vs. rephrased subjects")
    ax.legend(fontsize="small", loc="upper left")
    return fig
