"""Figures of the paper's results.

plotting is a leaf: functions take arrays and return matplotlib figures; nothing here imports the rest of
keyscope. Figures are built with :class:`matplotlib.figure.Figure` directly (Agg canvas, no pyplot global
state), one module per figure (``fig4.py``, …); callers save them with ``fig.savefig(path)``.
"""
