"""Figure 3 of "Keys to Robust Edits": how far a subject's key moves under perturbations.

Left: distribution of the normalised edit strength ``kᵀC⁻¹k_orig / k_origᵀC⁻¹k_orig`` per perturbation kind
against the random-other-subject baseline. Right: a 2-D PCA (in the whitened space) of one subject's keys
under every perturbation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

COLOURS = {
    "original": "#000000",
    "rephrase": "#1f77b4",
    "shuffle": "#d62728",
    "shuffle_words": "#ff7f0e",
    "long": "#2ca02c",
    "random": "#7f7f7f",
}
LABELS = {"rephrase": "rephrased subject", "shuffle": "shuffled subject tokens", "shuffle_words": "shuffled subject words",
          "long": "long context", "random": "other subject (baseline)", "original": "original prompt"}


def similarity_distributions(values: Mapping[str, Sequence[float]], title: str = "") -> Figure:
    """Histogram per perturbation kind of the normalised similarity to the original key (1 = full edit)."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    finite = np.concatenate([np.asarray(v, dtype=float) for v in values.values() if len(v)])
    lo, hi = np.quantile(finite, [0.005, 0.995]) if finite.size else (0.0, 1.0)
    lo, hi = min(lo, -0.1), max(hi, 1.1)
    bins = np.linspace(lo, hi, 50)
    for kind, v in values.items():
        v = np.clip(np.asarray(v, dtype=float), lo, hi)
        if v.size:
            ax.hist(v, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=COLOURS.get(kind),
                    label=f"{LABELS.get(kind, kind)} (median {np.median(v):.2f})")
            ax.hist(v, bins=bins, density=True, histtype="step", color=COLOURS.get(kind))
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.axvline(0.0, color="black", lw=0.8, ls=":")
    ax.set_xlabel(r"normalised edit strength  $k^\top C^{-1} k_{orig} \,/\, k_{orig}^\top C^{-1} k_{orig}$")
    ax.set_ylabel("density")
    ax.set_title(title or "Key similarity to the original prompt, by perturbation")
    ax.legend(fontsize=8, frameon=False)
    return fig


def key_pca(coords: np.ndarray, kinds: Sequence[str], subject: str = "", title: str = "") -> Figure:
    """Scatter of 2-D whitened-PCA coordinates ``(n, 2)`` of one subject's keys, coloured by kind."""
    coords = np.asarray(coords, dtype=float)
    fig = Figure(figsize=(5.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    order = [k for k in dict.fromkeys(kinds) if k != "original"] + (["original"] if "original" in kinds else [])
    for kind in order:  # the original last, hollow, so keys that coincide with it stay visible
        idx = [i for i, k in enumerate(kinds) if k == kind]
        style = (dict(s=160, marker="*", facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
                 if kind == "original" else dict(s=30, marker="o", color=COLOURS.get(kind), alpha=0.75,
                                                 edgecolors="white", linewidths=0.5, zorder=2))
        ax.scatter(coords[idx, 0], coords[idx, 1], label=f"{LABELS.get(kind, kind)} ({len(idx)})", **style)
    ax.set_xlabel("whitened PC 1")
    ax.set_ylabel("whitened PC 2")
    ax.set_title(title or (f"Keys of “{subject}” under perturbations" if subject else "Keys under perturbations"),
                 fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return fig
