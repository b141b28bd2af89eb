"""Readers of the committed artefacts: the numbers the README's blocks (:mod:`keyscope.studies.readme`) and
``REPORT.md`` (:mod:`keyscope.studies.reproduce`) both quote, each computed once from its CSV or JSON in
``figures/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keyscope.data.perturbations import KINDS
from keyscope.evaluation.bounds import auroc
from keyscope.studies.tables import read_csv


def similarity_strengths(path: Path) -> dict[str, list[float]]:
    """A Figure 3 CSV's normalised edit strengths, per perturbation kind."""
    values: dict[str, list[float]] = {}
    for row in read_csv(path):
        values.setdefault(row["kind"], []).append(float(row["similarity"]))
    return values


def neighbour_medians(figures: Path, folder: str = "") -> dict[str, float]:
    """Figure 4 (``figures/folder/fig4_neighbors.csv``): per filter, the median score of every subject's 10 best
    hits pooled (``median_top10`` of :mod:`keyscope.studies.scan`)."""
    scores: dict[str, list[float]] = {}
    for row in read_csv(figures / folder / "fig4_neighbors.csv"):
        if int(row["rank"]) < 10:
            scores.setdefault(row["filter"], []).append(float(row["score"]))
    return {name: float(np.median(values)) for name, values in scores.items()}


def value_summary(figures: Path, folder: str = "") -> dict:
    """Figure 5 and ROME's quality (``figures/folder/fig5_value_norms.csv``): the number of edits, the median value
    norms at k* before and after and their median ratio, success, pooled locality and seconds per edit."""
    rows = read_csv(figures / folder / "fig5_value_norms.csv")
    before = np.array([float(r["value_norm_before"]) for r in rows])
    after = np.array([float(r["value_norm_after"]) for r in rows])
    return {"n": len(rows), "before": float(np.median(before)), "after": float(np.median(after)),
            "ratio": float(np.median(after / before)), "success": float(np.mean([r["success"] == "True" for r in rows])),
            "locality": sum(int(r["neighbourhood_unchanged"]) for r in rows) / sum(int(r["neighbourhood"]) for r in rows),
            "seconds": float(np.mean([float(r["seconds"]) for r in rows]))}


def tau_changes(figures: Path, folder: str = "") -> tuple[float, float, dict[str, float]]:
    """Figure 7 (``figures/folder/fig7_tau_sweep.csv``): ``(largest τ, smallest τ, {metric: change in points})``,
    each metric's change from the largest τ to the smallest (a column without prompts is ``nan``)."""
    rows = sorted(read_csv(figures / folder / "fig7_tau_sweep.csv"), key=lambda r: float(r["tau"]))
    low, high = rows[0], rows[-1]
    metrics = [k for k in rows[0] if k != "tau"]
    change = {m: 100 * (float(low[m] or "nan") - float(high[m] or "nan")) for m in metrics}
    return float(high["tau"]), float(low["tau"]), change


def bounds_numbers(figures: Path, folder: str = "") -> dict:
    """The lemma checks of one ``keyscope bounds`` run (``figures/folder/bounds_edits.csv``, ``bounds_queries.csv``):
    Lemma 4.6's AUROC of α for a query's success per method (``(auroc, positives, n)``), Lemma 4.7's for a flipped
    top-1 on neighbourhood prompts and corpus-scan prefixes (ROME), and Lemma 4.4's shares over ROME's edits."""
    edits = [r for r in read_csv(figures / folder / "bounds_edits.csv") if r.get("method", "rome") == "rome"]
    queries = read_csv(figures / folder / "bounds_queries.csv")

    def group(method: str, kinds: tuple[str, ...], label: str) -> tuple[float | None, int, int]:
        rows = [r for r in queries if r["method"] == method and r["kind"] in kinds]
        flags = [r[label] == "True" for r in rows]
        return auroc([float(r["alpha"]) for r in rows], flags), sum(flags), len(rows)

    return {"lemma_4_6": {method: group(method, KINDS, "success") for method in ("rome", "rome+rep")},
            "neighbourhood": group("rome", ("neighbourhood",), "flipped"), "corpus": group("rome", ("corpus",), "flipped"),
            "edits": len(edits), "single_head_holds": float(np.mean([r["single_head_holds"] == "True" for r in edits])),
            "best_head_share": float(np.median([float(r["best_gain_unit"]) / float(r["needed"]) for r in edits])),
            "norm_bound_holds": float(np.mean([r["norm_bound_holds"] == "True" for r in edits]))}


def rephrase_median(figures: Path, folder: str = "") -> float:
    """Figure 4's other half (``figures/folder/fig4_rephrase.csv``): the median normalised edit strength of the
    scanned subjects' rephrased forms at their original keys."""
    return float(np.median([float(r["score"]) for r in read_csv(figures / folder / "fig4_rephrase.csv")]))
