"""Figures of the paper's results.

plotting is a leaf: functions take arrays and return matplotlib figures; nothing here imports the rest of
keyscope. Figures are built with :class:`matplotlib.figure.Figure` directly (Agg canvas, no pyplot global
state), one module per figure (``fig4.py``, …); callers save them with ``fig.savefig(path)``.
"""

from __future__ import annotations

#: The resolution of a figure shown in a notebook (:func:`show`): small PNGs to commit with the notebooks' outputs
#: (the files the studies write are 150 dpi).
SHOW_DPI = 72


def show(figure, dpi: int = SHOW_DPI):
    """``figure`` as a PNG for a notebook (an :class:`IPython.display.Image`, the notebook cell's value), at ``dpi``
    and without the writer's version in the PNG's metadata. The one way the notebooks in ``notebooks/`` show a
    figure: every study returns the figures it writes (``result.figures``, ``report.figure``, or a ``…_figure``
    function of the study)."""
    import io

    from IPython.display import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return Image(data=buffer.getvalue(), format="png")
