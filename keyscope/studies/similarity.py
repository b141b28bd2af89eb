"""Figure 3: whitened similarity of perturbed subject keys to the original key.

``run`` picks ``config.n_subjects`` facts of distinct subjects (seeded; :class:`SimilarityConfig`), builds each
fact's rephrased, shuffled, long-context and random-subject probes (:func:`keyscope.data.perturbations.fact_probes`),
measures the normalised edit strength of every probe's key against the original prompt's key in the metric ``C⁻¹``
of the layer's key covariance, and writes ``fig3_similarity.png``, ``fig3_pca.png`` and ``fig3_similarity.csv``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from keyscope._infra.atomic import atomic_write, save_figure
from keyscope._infra.errors import KeyscopeError
from keyscope.analysis import similarity
from keyscope.data.corpus import ContextSource
from keyscope.data.perturbations import KINDS, RANDOM, PerturbationConfig, fact_probes, subject_forms
from keyscope.model.models import model_name as name_of
from keyscope.studies.plotting import fig3

#: Kinds of the Figure 3 study, in display order; ``random`` is the other-subject baseline.
STUDY_KINDS = (*KINDS, RANDOM)

TABLE = "fig3_similarity.csv"


def perturbation_study(model, facts: Sequence, layer: int, cov, context_docs, config: PerturbationConfig | None = None,
                       progress: bool = True, other_facts=None, exclude: frozenset[str] = frozenset()):
    """Normalised edit strength ``s(k; k_orig) = kᵀC⁻¹k_orig / k_origᵀC⁻¹k_orig`` of every perturbed key of
    every fact against the fact's original key (Yan et al., Sec. 3 and Figure 3), for every probe of
    :func:`keyscope.data.perturbations.fact_probes` (in- and out-of-domain alike) and the random baseline.

    Returns ``(rows, keys)``: ``rows`` is a list of dicts (``case_id``, ``subject``, ``kind`` in
    :data:`STUDY_KINDS`, ``source``, ``prompt``, ``similarity``) and ``keys`` maps ``case_id`` to ``(kinds,
    keys)`` with ``keys`` of shape ``(n_probes, d_mlp)`` (original first), for the PCA panel.
    """
    from tqdm.auto import tqdm

    config = config or PerturbationConfig()
    tokenizer = model.tokenizer
    contexts = ContextSource.of(context_docs)  # one for every fact: each long context has text of its own
    pool = [f.subject for f in facts]
    rows: list[dict] = []
    keys_by_case: dict = {}
    for fact in tqdm(facts, desc="perturbation keys", disable=not progress):
        probes = fact_probes(tokenizer, fact, contexts, config, exclude=exclude, other_facts=other_facts,
                             subject_pool=pool).all()
        keys = similarity.probe_keys(model, probes, layer)  # (n_probes, d_mlp)
        strength = similarity.edit_strength(keys[1:], keys[0], cov).cpu()  # (n_probes - 1,)
        for probe, s in zip(probes[1:], strength.tolist()):
            rows.append({"case_id": fact.case_id, "subject": fact.subject, "kind": probe.kind, "source": probe.source,
                         "prompt": probe.prompt, "similarity": s})
        keys_by_case[fact.case_id] = ([p.kind for p in probes], keys.cpu())
    return rows, keys_by_case


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per kind: ``n``, ``mean``, ``median``, ``q10``, ``q90`` of the normalised similarity."""
    out: dict[str, dict[str, float]] = {}
    for kind in STUDY_KINDS:
        values = np.array([r["similarity"] for r in rows if r["kind"] == kind], dtype=np.float64)
        if values.size == 0:
            continue
        out[kind] = {
            "n": int(values.size),
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "q10": float(np.quantile(values, 0.1)),
            "q90": float(np.quantile(values, 0.9)),
        }
    return out


@dataclass
class SimilarityResult:
    model: str
    layer: int
    summary: dict
    rows: list[dict] = field(repr=False)
    files: list[Path] = field(default_factory=list)
    figures: dict = field(default_factory=dict, repr=False)  # name -> matplotlib Figure

    def as_json(self) -> dict:
        return {"perturbations": self.summary, "model": self.model, "layer": self.layer}


def pick_facts(facts, n_subjects: int, seed: int) -> list:
    """``n_subjects`` facts with distinct subjects, drawn with ``seed`` (all of them if fewer)."""
    if n_subjects < 1:
        raise KeyscopeError(f"the number of subjects must be at least 1, not {n_subjects}")
    by_subject: dict[str, object] = {}
    for fact in facts:
        by_subject.setdefault(fact.subject, fact)
    chosen = list(by_subject.values())
    random.Random(seed).shuffle(chosen)
    if not chosen:
        raise KeyscopeError("no facts to study: the dataset is empty")
    return chosen[:n_subjects]


@dataclass(frozen=True)
class SimilarityConfig:
    """What the Figure 3 study measures. No I/O.

    ``layer``: the key layer; ``n_subjects``: facts of distinct subjects studied, drawn with ``seed`` (which also
    draws their shuffles and long contexts); ``pca_subject``: the subject of the PCA panel (default: the first
    studied)."""

    layer: int
    n_subjects: int = 100
    seed: int = 0
    pca_subject: str | None = None


def run(model, facts, config: SimilarityConfig, *, cov, context_docs, out_dir: str | Path,
        model_name: str | None = None, progress: bool = True) -> SimilarityResult:
    """Run the Figure 3 study of ``config`` on ``facts`` (``cov``: the layer's key covariance; ``context_docs``: the
    text of the long contexts) and write its outputs into ``out_dir``; ``model_name`` titles the figures (default:
    the model's own name)."""
    model_name = model_name or name_of(model)
    layer, n_subjects, seed, pca_subject = config.layer, config.n_subjects, config.seed, config.pca_subject
    chosen = pick_facts(facts, n_subjects, seed)
    probes = PerturbationConfig(seed=seed)
    forms = subject_forms(facts)
    context_docs = ContextSource.of(context_docs)  # the PCA subject's contexts follow the others' text
    rows, keys = perturbation_study(model, chosen, layer, cov, context_docs, probes, progress=progress,
                                    other_facts=facts, exclude=forms)
    summary = summarize(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    csv_path = out / TABLE
    atomic_write(csv_path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    values = {kind: [r["similarity"] for r in rows if r["kind"] == kind] for kind in STUDY_KINDS}
    dist = fig3.similarity_distributions(values, title=f"{model_name}, layer {layer}: keys vs. the original key")
    dist_path = out / "fig3_similarity.png"
    save_figure(dist, dist_path, dpi=150)

    pca_fact = next((f for f in chosen if f.subject == pca_subject), None) if pca_subject else None
    if pca_subject and pca_fact is None:
        pca_fact = next((f for f in facts if f.subject == pca_subject), None)
        if pca_fact is None:
            raise KeyscopeError(f"--pca-subject {pca_subject!r} is not a subject of the dataset")
        _, extra = perturbation_study(model, [pca_fact], layer, cov, context_docs, probes, progress=False,
                                      other_facts=facts, exclude=forms)
        keys.update(extra)
    pca_fact = pca_fact or chosen[0]
    kinds, pca_keys = keys[pca_fact.case_id]
    coords = similarity.whitened_pca(pca_keys, cov)
    pca_path = out / "fig3_pca.png"
    pca = fig3.key_pca(coords.numpy(), kinds, subject=pca_fact.subject)
    save_figure(pca, pca_path, dpi=150)
    return SimilarityResult(model_name, layer, summary, rows, [dist_path, pca_path, csv_path],
                            {"similarity": dist, "pca": pca})


def format_table(summary: dict) -> str:
    """The summary as a fixed-width text table (one row per perturbation kind)."""
    lines = [f"{'perturbation':<14}{'n':>6}{'mean':>9}{'median':>9}{'q10':>9}{'q90':>9}"]
    for kind, s in summary.items():
        lines.append(f"{kind:<14}{s['n']:>6}{s['mean']:>9.3f}{s['median']:>9.3f}{s['q10']:>9.3f}{s['q90']:>9.3f}")
    return "\n".join(lines)
