"""Evaluation: the Table 1 metrics and the runs that score edits (evaluate, reach, sequential,
the ablation of keyscope's departures and the lemma checks).

Layer 6: above editing; below the studies that write the paper's artefacts.
"""
