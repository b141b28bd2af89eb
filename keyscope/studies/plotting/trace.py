"""Causal tracing figures (Meng et al. 2022, Figure 1): where a model recalls a fact.

Left: the average indirect effect of restoring each layer's MLP output and attention output at the subject's
last token, the layer ROME would edit marked. Right: one fact traced at every token × layer (MLP and attention
panels), the subject's tokens marked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLOURS = {"mlp": "tab:green", "attn": "tab:red"}
LABELS = {"mlp": "MLP output", "attn": "attention output"}


def causal_trace(profile: Mapping[str, Sequence[float]], layer: int, heatmap: Mapping[str, np.ndarray] | None = None,
                 tokens: Sequence[str] = (), subject: tuple[int, int] | None = None, title: str = "") -> Figure:
    """The average indirect effect per layer (``profile[kind]``, one value per layer) with ``layer`` marked,
    and, if given, one fact's ``heatmap[kind]`` ``(n_tokens, n_layers)`` with its ``tokens`` and the subject's
    token span ``[first, last]``."""
    kinds = [k for k in ("mlp", "attn") if k in profile]
    n_panels = 1 + (len(kinds) if heatmap else 0)
    fig = Figure(figsize=(4.6 + 3.6 * (n_panels - 1), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    ax = axes[0]
    n_layers = len(profile[kinds[0]])
    x = np.arange(n_layers)
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax.bar(x + (i - (len(kinds) - 1) / 2) * width, profile[kind], width, color=COLOURS[kind], label=LABELS[kind])
    ax.axvline(layer, color="black", linestyle="--", linewidth=1, label=f"edit layer {layer}")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("average indirect effect on P(answer)")
    ax.set_title("restored at the subject's last token", fontsize=9)
    ax.legend(fontsize="small", frameon=False)
    if heatmap:
        for ax, kind in zip(axes[1:], kinds):
            values = np.asarray(heatmap[kind], dtype=float)  # (n_tokens, n_layers)
            bound = max(float(np.abs(values).max()), 1e-6)
            image = ax.imshow(values, cmap="Greens" if kind == "mlp" else "Reds", vmin=min(0.0, values.min()),
                              vmax=bound, aspect="auto")
            labels = [t.replace("\n", " ") + ("*" if subject and subject[0] <= i <= subject[1] else "")
                      for i, t in enumerate(tokens)]
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_xticks(range(values.shape[1]))
            ax.set_xlabel("layer")
            ax.set_title(f"{LABELS[kind]} restored (* subject)", fontsize=9)
            fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
