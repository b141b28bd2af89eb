"""Figure 4: the corpus positions whose keys an edit of a subject would reach.

``run`` scores every position of ``config.n_tokens`` corpus tokens against the subjects' keys by the
normalised edit strength ``kᵀC⁻¹k*/k*ᵀC⁻¹k*`` (:func:`keyscope.analysis.scan.scan_corpus`, subject occurrences masked),
compares the top-k unrelated scores with the scores of the same subjects' rephrased forms, and writes
``fig4_neighbors.png``, ``fig4_neighbors.csv`` (every hit with its decoded prefix) and ``fig4_rephrase.csv`` (the
rephrased forms' scores, one row each). Under ``torchrun`` the corpus batches are shared among the processes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from keyscope._infra.atomic import atomic_write, save_figure
from keyscope._infra.distributed import SINGLE, ProcessRank
from keyscope._infra.errors import KeyscopeError
from keyscope.analysis import scan
from keyscope.analysis.similarity import edit_strength_matrix, probe_keys
from keyscope.data.perturbations import REPHRASE, REPHRASES, fact_probes
from keyscope.model.models import model_name as name_of
from keyscope.studies.plotting.fig4 import fig4_neighbors
from keyscope.studies.tables import write_csv

FIGURE = "fig4_neighbors.png"
TABLE = "fig4_neighbors.csv"
REPHRASE_TABLE = "fig4_rephrase.csv"


def distinct_subjects(facts, n: int) -> list:
    """The first ``n`` facts with distinct subjects, in file order."""
    if n < 1:
        raise KeyscopeError(f"the number of subjects must be at least 1, not {n}")
    chosen: dict[str, object] = {}
    for fact in facts:
        if len(chosen) == n:
            break
        chosen.setdefault(fact.subject, fact)
    return list(chosen.values())


def _stats(values) -> dict:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {"n": 0}
    return {"n": int(values.size), "median": float(np.median(values)), "max": float(values.max()),
            "q90": float(np.quantile(values, 0.9))}


@dataclass
class ScanReport:
    model: str
    layer: int
    corpus: str
    facts: list = field(repr=False)
    results: dict[str, scan.ScanResult] = field(repr=False)
    summary: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    figure: object = field(default=None, repr=False)

    @property
    def result(self) -> scan.ScanResult:
        """The strict filter's result (what is left is unrelated text)."""
        return self.results["strict"]

    def as_json(self, config: scan.ScanConfig) -> dict:
        return {
            "model": self.model, "layer": self.layer, "corpus": self.corpus, "n_tokens": self.result.n_tokens,
            "subjects": len(self.facts), "top_k": config.top_k, "window": config.window,
            "filters": self.summary["filters"], "rephrase": self.summary["rephrase"],
            "top1": {name: [{"case_id": f.case_id, "subject": f.subject, "score": h.score if h else None,
                             "prefix": h.prefix if h else None} for f, h in zip(self.facts, result.top1())]
                     for name, result in self.results.items()},
            "figure": str(self.files[0]), "csv": str(self.files[1]),
        }


def _write_hits(path: Path, results: dict[str, scan.ScanResult], facts) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filter", "case_id", "subject", "rank", "score", "raw", "position", "prefix"])
            for name, result in results.items():
                for hit in result.neighbours():
                    writer.writerow([name, facts[hit.subject_index].case_id, hit.subject, hit.rank,
                                     f"{hit.score:.6g}", f"{hit.raw:.6g}", hit.position, hit.prefix])

    atomic_write(path, write)


def rephrase_scores(model, facts: Sequence, cov, layer: int, k_stars: torch.Tensor | None = None) -> list[torch.Tensor]:
    """For scale: the edit strengths ``s(k; k*)`` of each fact's rephrased-subject keys (same template, every
    rephrasing: :data:`keyscope.data.perturbations.REPHRASES`) against its own ``k*``; one float64 tensor per fact
    (empty when the fact has no rephrased subjects). All probes run in one batched
    :func:`keyscope.analysis.similarity.probe_keys` call."""
    if k_stars is None:
        k_stars = scan.subject_keys(model, facts, layer)  # (S, d_mlp)
    tokenizer = model.tokenizer
    probes, owner = [], []
    for j, fact in enumerate(facts):
        for probe in fact_probes(tokenizer, fact, None, REPHRASES).perturbed[REPHRASE][0]:
            probes.append(probe)
            owner.append(j)
    if not probes:
        return [torch.empty(0, dtype=torch.float64) for _ in facts]
    keys = probe_keys(model, probes, layer)  # (n, d_mlp)
    strengths = edit_strength_matrix(keys, k_stars, cov).cpu()  # (n, S)
    owners = torch.as_tensor(owner)  # (n,)
    rows = torch.arange(len(probes))
    own = strengths[rows, owners]  # (n,)
    return [own[owners == j] for j in range(len(facts))]


def _filter_summary(result: scan.ScanResult, other: scan.ScanResult | None) -> dict:
    scores = result.scores[result.positions >= 0].numpy()  # unmasked hits only
    top1 = [hit.score for hit in result.top1() if hit is not None]
    summary = {"median_top10": float(np.median(scores)) if scores.size else None, "neighbours": _stats(scores),
               "top1": _stats(top1), "excluded_positions": int(result.n_excluded.sum())}
    if other is not None:  # how many of these hits the other filter keeps too
        kept = [len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(result.positions, other.positions)]
        summary["shared_with_strict"] = sum(kept) / max(1, int((result.positions >= 0).sum()))
    return summary


def run(model, facts, config: scan.ScanConfig, *, cov, corpus, out_dir: str | Path, model_name: str | None = None,
        progress: bool = True, world: ProcessRank = SINGLE) -> ScanReport:
    """Scan ``corpus`` (a corpus name or path, :mod:`keyscope.data.corpus`) for the keys of ``facts`` at
    ``config.layer`` (covariance ``cov``) under both exclusion filters; write the figure and CSV into ``out_dir``;
    ``model_name`` titles the figure (default: the model's own name).

    Under ``torchrun`` (``world``) each rank scans its share of the corpus batches and every rank gets the
    merged top-k (:func:`keyscope.analysis.scan.scan_scores`); rank 0 alone scores the rephrased subjects and writes
    files, the other ranks return a report without a summary or files."""
    source = corpus
    model_name = model_name or name_of(model)
    k_stars = scan.subject_keys(model, facts, config.layer)  # (S, d_mlp)
    results = scan.scan_corpus(model, facts, cov, source, config, progress=progress, k_stars=k_stars, world=world)
    if not world.is_main:
        return ScanReport(model_name, config.layer, str(source), facts, results)
    rephrase = rephrase_scores(model, facts, cov, config.layer, k_stars=k_stars)
    rephrase_all = torch.cat(rephrase).numpy() if rephrase else np.empty(0)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    neighbour_scores = {name: r.scores[r.positions >= 0].numpy() for name, r in results.items()}
    figure = fig4_neighbors(neighbour_scores, rephrase_all, title=(
        f"{model_name}, layer {config.layer}: top-{config.top_k} corpus keys vs. rephrased subjects"))
    figure_path, table_path = out / FIGURE, out / TABLE
    save_figure(figure, figure_path, dpi=150)
    _write_hits(table_path, results, facts)
    write_csv(out / REPHRASE_TABLE, [{"case_id": f.case_id, "subject": f.subject, "score": float(score)}
                               for f, scores in zip(facts, rephrase) for score in scores.tolist()])
    summary = {"filters": {name: _filter_summary(r, results.get("strict") if name != "strict" else None)
                           for name, r in results.items()},
               "rephrase": _stats(rephrase_all)}
    return ScanReport(model_name, config.layer, str(source), facts, results, summary, [figure_path, table_path, out / REPHRASE_TABLE],
                      figure)
