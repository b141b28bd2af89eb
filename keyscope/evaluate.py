"""Robustness evaluation of ROME and ROME+REP: Table 1 and the τ sweep of Figure 7 (Yan et al., Sec. 6).

For every fact (only facts the unedited model knows — top-1 on the true target — are edited, as in the
paper) :func:`evaluate_fact` computes one ROME edit and, for ``rome+rep``, fits a REP adaptor for it
(:mod:`keyscope.rep`), then asks, with each method applied (:func:`keyscope.rep.applied`; weights and hooks
are restored between facts):

* **Success** — every target token of the new object is the teacher-forced top-1 on the edit prompt;
* **Locality** — each neighbourhood prompt (other subjects, same relation) keeps the unedited model's
  top-1 tokens (teacher-forced on ``locality_ground_truth`` or ``target_true``, compared token by token);
* **Rephrase**, **Shuffle**, **Shuffle-words**, **Long** — success on the edit prompt with a rephrased
  subject, with the subject's tokens shuffled, with its words shuffled, and after ``long_context_tokens``
  tokens of other text (the probes of :func:`keyscope.perturbations.fact_probes`).

Each kind is split **by whole sources** (leave-kind-out, see :mod:`keyscope.perturbations`): **in-domain**
(``_id``) probes are of the sources REP trains on, **out-of-domain** (``_ood``) probes of sources it never sees
(other rephrase kinds, shuffles of those forms, contexts of other facts' sentences). ROME never trains on
either. An out-of-domain probe whose key is a near-twin of a key REP trained on — whitened cosine
``kᵀC⁻¹k' / (‖k‖_C ‖k'‖_C) ≥ twin_cosine`` (0.95) with any of them — says little about generalisation, so
every ``_ood`` metric is also reported over the **new** probes alone (``_ood_new``, with its count). REP's
other positives are the subject under the fact's paraphrase templates; its gate negatives are other
subjects' keys — never those of the neighbourhood prompts, which are held out for Locality — and keys of
unrelated corpus text. With :meth:`keyscope.rep.REPConfig.released` REP trains as the released code does: on
the original subject and the in-domain rephrases and token shuffles, each behind every ROME context prefix
(``Shared.prefixes``), the bare prompt as the only anchor, no templates, long contexts or negatives.

Metrics are **micro-averaged** (pooled over all prompts of all facts) with a 95% confidence interval from
a cluster bootstrap over facts (prompts of one fact are not independent). ROME's probability comparison
``P(new) > P(true)`` (whole-target log-probabilities) is reported too, as ``prob``, for comparability with
ROME's tables.

``taus`` evaluates one fitted adaptor at several gate thresholds without retraining (Figure 7).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from keyscope import rep, rome
from keyscope.datasets import Fact
from keyscope.errors import KeyscopeError
from keyscope.keys import collect_keys
from keyscope.perturbations import (
    KINDS,
    FactProbes,
    PerturbationConfig,
    fact_probes,
    subject_forms,
)
from keyscope.predictions import sample_known_facts, score_targets, target_sequence
from keyscope.similarity import probe_keys, whitened_cosine_matrix

__all__ = ["EvalConfig", "METHODS", "METRICS", "KINDS", "EvalResult", "evaluate", "evaluate_fact", "summarize",
           "bootstrap_interval", "Shared", "prepare", "fit_rep", "negative_subject_keys", "near_twins", "run_facts",
           "plan_queries", "score_plan", "QueryPlan"]

#: Methods in Table 1's row order.
METHODS = ("rome", "rome+rep")
#: The split of each perturbation kind: in-domain, out-of-domain, and out-of-domain without near-twins.
DOMAINS = ("id", "ood", "ood_new")
#: Table 1's columns.
METRICS = ("success", "locality", *(f"{kind}_{domain}" for kind in KINDS for domain in DOMAINS))


@dataclass(frozen=True)
class EvalConfig:
    """What is evaluated per fact and how intervals are computed. No I/O."""

    n: int = 100
    seed: int = 0
    probes: PerturbationConfig = field(default_factory=PerturbationConfig)  # its seed is set to `seed`
    twin_cosine: float = 0.95
    n_corpus_negatives: int = 512
    bootstrap: int = 1000
    batch_size: int = 32

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be positive, not {self.n}")
        if self.probes.seed != self.seed:  # one seed draws the facts, the splits and the probes
            object.__setattr__(self, "probes", replace(self.probes, seed=self.seed))


def near_twins(model, queries: FactProbes, layer: int, cov, rep_config: rep.REPConfig,
               anchors: torch.Tensor | None = None, batch_size: int = 32,
               prefixes: Sequence[str] = ("",)) -> dict[tuple[str, int], float]:
    """For each out-of-domain probe of ``queries`` (keyed ``(kind, index in the kind's OOD list)``), its
    largest whitened cosine ``kᵀC⁻¹k' / (‖k‖_C⁻¹ ‖k'‖_C⁻¹)`` with the keys REP trains on: the edit prompt's
    own key, :func:`keyscope.rep.training_positives` of the in-domain probes (with
    ``rep_config.positive_prefixes``, each behind each of ROME's ``prefixes``) and ``anchors`` ``(n, d_mlp)``
    (the edit's prefixed keys, :attr:`keyscope.rome.Edit.prefix_keys`, which REP keeps fixed). A probe at or
    above :attr:`EvalConfig.twin_cosine` is a near-twin of a training key."""
    ood = [(kind, i, p) for kind in KINDS for i, p in enumerate(queries.perturbed[kind][1])]
    if not ood:
        return {}
    originals = rep.behind_prefixes([queries.original], prefixes) if rep_config.positive_prefixes else [queries.original]
    training = [*originals, *rep.training_positives(queries.training_probes(), rep_config, prefixes)]
    keys = probe_keys(model, [p for _, _, p in ood] + training, layer, batch_size=batch_size)  # (n_ood + n_train, d_mlp)
    if anchors is not None:
        keys = torch.cat([keys, anchors.to(keys.device, keys.dtype)])  # (n_ood + n_train + n_anchors, d_mlp)
    cosine = whitened_cosine_matrix(keys[: len(ood)], keys[len(ood) :], cov)  # (n_ood, n_train + n_anchors)
    best = cosine.max(1).values.cpu().tolist()
    return {(kind, i): c for (kind, i, _), c in zip(ood, best)}


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class QueryPlan:
    """The scored sequences of one fact: each query is a pair of rows (new target, true target)."""

    sequences: list[tuple[list[int], int]] = field(default_factory=list)
    groups: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # metric -> (row new, row true)
    locality: list[int] = field(default_factory=list)  # rows of the neighbourhood prompts

    def add(self, seq: tuple[list[int], int]) -> int:
        self.sequences.append(seq)
        return len(self.sequences) - 1


def plan_queries(tokenizer, queries: FactProbes, twins: dict[tuple[str, int], float], threshold: float) -> QueryPlan:
    fact = queries.fact
    plan = QueryPlan()

    def query(metrics: Sequence[str], prompt: str) -> None:
        rows = (plan.add(target_sequence(tokenizer, prompt, fact.target_new)),
                plan.add(target_sequence(tokenizer, prompt, fact.target_true)))
        for metric in metrics:
            plan.groups.setdefault(metric, []).append(rows)

    query(["success"], fact.filled_prompt)
    for kind in KINDS:
        in_domain, out_of_domain = queries.perturbed[kind]
        for probe in in_domain:
            query([f"{kind}_id"], probe.prompt)
        for i, probe in enumerate(out_of_domain):
            new = twins.get((kind, i), -1.0) < threshold
            query([f"{kind}_ood", *([f"{kind}_ood_new"] if new else [])], probe.prompt)
    truth = fact.locality_ground_truth or fact.target_true
    plan.locality = [plan.add(target_sequence(tokenizer, p, truth)) for p in fact.neighborhood_prompts]
    return plan


def score_plan(model, plan: QueryPlan, unedited_locality: tuple, batch_size: int) -> dict[str, tuple[int, int, int]]:
    """Per metric ``(hits, total, prob_hits)`` for the model as it is now (edits and hooks applied)."""
    scores = score_targets(model, plan.sequences, batch_size=batch_size)
    out: dict[str, tuple[int, int, int]] = {}
    for metric in METRICS:
        if metric == "locality":
            kept = sum(scores.argmax[row] == before for row, before in zip(plan.locality, unedited_locality))
            out[metric] = (kept, len(plan.locality), 0)
            continue
        pairs = plan.groups.get(metric, [])
        hits = sum(bool(scores.top1[new]) for new, _ in pairs)
        prob = sum(bool(scores.log_probability[new] > scores.log_probability[true]) for new, true in pairs)
        out[metric] = (hits, len(pairs), prob)
    return out


# ---------------------------------------------------------------------------------------------- per fact


@dataclass(frozen=True)
class Shared:
    """What every fact of a run shares: ROME's prefixes, other subjects' keys and corpus keys (REP's gate
    negatives). Build it with :func:`prepare`."""

    prefixes: tuple[str, ...]
    subject_keys: torch.Tensor | None  # (n_subjects, d_mlp)
    subject_names: tuple[str, ...]
    corpus_keys: torch.Tensor | None  # (n_corpus, d_mlp)


def prepare(model, facts: Sequence[Fact], layer: int, corpus=None, rome_config: rome.ROMEConfig | None = None,
            rep_config: rep.REPConfig | None = None, n_corpus_negatives: int = 512, seed: int = 0,
            batch_size: int = 32) -> Shared:
    """ROME's context prefixes and, when REP gets gate negatives, the layer keys of every subject in ``facts``
    (one prompt each) and ``n_corpus_negatives`` keys of ``corpus``."""
    from keyscope.scan import sample_corpus_keys

    prefixes = rome.context_prefixes(model, rome_config or rome.ROMEConfig.for_model(model))
    if rep_config is None or not rep_config.gate_negatives:
        return Shared(prefixes, None, (), None)
    pool: dict[str, Fact] = {}
    for fact in facts:
        pool.setdefault(fact.subject.strip(), fact)
    subject_keys = collect_keys(model, [f.prompt for f in pool.values()], [f.subject for f in pool.values()],
                                layer, batch_size=batch_size)  # (n_subjects, d_mlp)
    corpus_keys = None
    if corpus is not None and n_corpus_negatives:
        corpus_keys = sample_corpus_keys(model, corpus, layer, n_corpus_negatives, seed=seed)  # (n, d_mlp)
    return Shared(prefixes, subject_keys, tuple(pool), corpus_keys)


def fit_rep(model, edit: rome.Edit, queries: FactProbes, rep_config: rep.REPConfig, shared: Shared,
            batch_size: int = 32) -> rep.REP:
    """REP's adaptor for ``edit``, trained on the in-domain probes of ``queries`` (and the negatives of
    ``shared``, never the neighbourhood prompts' subjects)."""
    keys = rep.gather_keys(model, edit, queries.training_probes(), rep_config,
                           subject_keys=negative_subject_keys(shared, queries.fact), corpus_keys=shared.corpus_keys,
                           batch_size=batch_size)
    return rep.REP(rep_config).fit(edit, keys)


def negative_subject_keys(shared: Shared, fact: Fact) -> torch.Tensor | None:
    """Keys of subjects other than the fact's own and those named in its neighbourhood prompts."""
    if shared.subject_keys is None:
        return None
    held_out = {fact.subject.strip()}
    keep = [i for i, name in enumerate(shared.subject_names)
            if name.strip() not in held_out and not any(name in p for p in fact.neighborhood_prompts)]
    return shared.subject_keys[torch.as_tensor(keep, dtype=torch.long)]


def evaluate_fact(model, fact: Fact, queries: FactProbes, layer: int, cov, methods: Sequence[str],
                  rome_config: rome.ROMEConfig, rep_config: rep.REPConfig, shared: Shared,
                  taus: Sequence[float] = (), batch_size: int = 32, twin_cosine: float = 0.95) -> dict:
    """Edit one fact with every method and score it: ``{"case_id", "edit_seconds", "methods": {name:
    {metric: (hits, total, prob_hits)}}}``; with ``taus``, ``rome+rep@τ`` entries for each threshold."""
    tokenizer = model.tokenizer
    start = time.perf_counter()
    edit = rome.compute_edit(model, rome.EditRequest(fact.prompt, fact.subject, fact.target_new, fact.target_true),
                             layer, cov, rome_config, prefixes=shared.prefixes)  # leaves the weights unchanged
    row = {"case_id": fact.case_id, "edit_seconds": time.perf_counter() - start, "methods": {}}
    twins = near_twins(model, queries, layer, cov, rep_config, edit.prefix_keys, batch_size, shared.prefixes)
    plan = plan_queries(tokenizer, queries, twins, twin_cosine)
    unedited = score_targets(model, [plan.sequences[r] for r in plan.locality], batch_size=batch_size).argmax
    if "rome" in methods:
        with rep.applied(model, edit):
            row["methods"]["rome"] = score_plan(model, plan, unedited, batch_size)
    if "rome+rep" in methods:
        start = time.perf_counter()
        fitted = fit_rep(model, edit, queries, rep_config, shared, batch_size)
        row["rep_seconds"] = time.perf_counter() - start
        names = {"rome+rep": rep_config.tau, **{f"rome+rep@{tau:g}": tau for tau in taus}}
        for group in _gate_groups(model, fitted, plan, names, batch_size):
            if group["off"] and "rome" in row["methods"]:
                scores = row["methods"]["rome"]  # the gate is off everywhere: exactly ROME
            else:
                with rep.applied(model, edit, fitted, group["tau"]):
                    scores = score_plan(model, plan, unedited, batch_size)
            for name in group["names"]:
                row["methods"][name] = scores
    return row


def _gate_groups(model, fitted: rep.REP, plan: QueryPlan, names: dict[str, float], batch_size: int) -> list[dict]:
    """Group the thresholds of ``names`` (method name → τ) by the set of positions whose gate is on in the
    sequences of ``plan``: thresholds with the same set give the same forward passes, so each group is
    scored once (Figure 7 without a pass per τ); ``off`` marks a group whose set is empty (exactly ROME).
    With dropout at inference (the paper's setting) every τ is its own group."""
    if fitted.config.dropout_at_inference:
        return [{"tau": tau, "names": [name], "off": False} for name, tau in names.items()]
    from keyscope.keys import layer_keys
    from keyscope.prompts import length_batches, pad_batch

    runs = list(dict.fromkeys(tuple(ids[:-1]) for ids, _ in plan.sequences))
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    gates = []
    for rows in length_batches([len(r) for r in runs], batch_size):
        input_ids, mask = pad_batch([runs[i] for i in rows], pad_id, device=model.cfg.device)
        keys = layer_keys(model, input_ids, mask, fitted.layer_)  # (batch, pos, d_mlp)
        gates.append(fitted.gate(keys)[mask.bool()].cpu())  # (real positions,)
    gate = torch.cat(gates)
    groups: dict[bytes, dict] = {}
    for name, tau in names.items():
        on = fitted.adaptor_.gate_on(gate, tau).numpy()
        group = groups.setdefault(on.tobytes(), {"tau": tau, "names": [], "off": not on.any()})
        group["names"].append(name)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------- summaries


def bootstrap_interval(hits: np.ndarray, totals: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the micro-average ``Σ hits / Σ totals`` under resampling of the facts (the
    clusters) with replacement."""
    hits, totals = np.asarray(hits, float), np.asarray(totals, float)
    if totals.sum() == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(hits), size=(n_resamples, len(hits)))  # (B, n_facts)
    sums = totals[index].sum(1)
    ratios = np.where(sums > 0, hits[index].sum(1) / np.maximum(sums, 1), np.nan)
    lo, hi = np.nanquantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarize(rows: Sequence[dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Per method: each metric's micro-average, its 95% interval (``ci``), the ``P(new) > P(true)`` rate
    (``prob``) and the number of prompts (``counts``)."""
    methods = sorted({m for r in rows for m in r["methods"]}, key=lambda m: (m not in METHODS, m))
    out = {}
    for method in methods:
        scored = [r["methods"][method] for r in rows if method in r["methods"]]
        entry: dict = {"ci": {}, "prob": {}, "counts": {}}
        for metric in METRICS:
            hits = np.array([s[metric][0] for s in scored])
            totals = np.array([s[metric][1] for s in scored])
            probs = np.array([s[metric][2] for s in scored])
            total = int(totals.sum())
            entry[metric] = float(hits.sum() / total) if total else None
            entry["ci"][metric] = list(bootstrap_interval(hits, totals, n_resamples, seed)) if total else None
            if metric != "locality":
                entry["prob"][metric] = float(probs.sum() / total) if total else None
            entry["counts"][metric] = total
        out[method] = entry
    return out


@dataclass
class EvalResult:
    """Per-fact rows, the summary per method (see :func:`summarize`) and the run's settings."""

    model: str
    layer: int
    rows: list[dict] = field(repr=False)
    summary: dict
    config: EvalConfig
    rep_config: rep.REPConfig
    n_known: int
    taus: tuple[float, ...] = ()
    seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)

    def table(self, methods: Sequence[str] = METHODS) -> dict:
        """Table 1: ``{method: {metric: value}}`` for the methods present."""
        return {m: {k: self.summary[m][k] for k in METRICS} for m in methods if m in self.summary}

    def tau_sweep(self) -> dict[float, dict]:
        """``{τ: {metric: value}}`` of the sweep (Figure 7)."""
        return {tau: {k: self.summary[f"rome+rep@{tau:g}"][k] for k in METRICS}
                for tau in self.taus if f"rome+rep@{tau:g}" in self.summary}

    def as_json(self) -> dict:
        methods = {m: dict(s) for m, s in self.summary.items()}
        return {"n": len(self.rows), "n_known": self.n_known, "model": self.model, "layer": self.layer,
                "methods": methods, "seconds": round(self.seconds, 1), "config": asdict(self.config),
                "rep_config": asdict(self.rep_config), "taus": list(self.taus), "skipped": self.skipped}


def run_facts(model, facts: Sequence[Fact], config: EvalConfig, context_docs: Iterable[str],
              score: Callable[[Fact, FactProbes], dict], desc: str, progress: bool = True
              ) -> tuple[list[dict], list[dict], int]:
    """``score(fact, probes)`` for ``config.n`` known facts drawn with ``config.seed``, each with its probes
    (:func:`keyscope.perturbations.fact_probes`): ``(rows, skipped, n_known)``. A fact whose probes or scoring
    raise a :class:`~keyscope.errors.KeyscopeError` (e.g. a target without a token of its own after the prompt)
    is skipped with its reason; none scored at all is an error."""
    from tqdm.auto import tqdm

    chosen, n_known = sample_known_facts(model, facts, config.n, config.seed, batch_size=config.batch_size)
    forms = subject_forms(facts)
    rows, skipped = [], []
    for fact in tqdm(chosen, desc=desc, disable=not progress):
        try:
            queries = fact_probes(model.tokenizer, fact, context_docs, config.probes, exclude=forms, other_facts=facts)
            rows.append(score(fact, queries))
        except KeyscopeError as exc:
            skipped.append({"case_id": fact.case_id, "reason": str(exc)})
    if not rows:
        raise KeyscopeError(f"no fact could be evaluated ({len(skipped)} skipped; first: {skipped[0]['reason']})")
    return rows, skipped, n_known


def evaluate(model, facts: Sequence[Fact], layer: int, cov, context_docs: Iterable[str], corpus=None,
             methods: Sequence[str] = METHODS, config: EvalConfig | None = None,
             rome_config: rome.ROMEConfig | None = None, rep_config: rep.REPConfig | None = None,
             taus: Sequence[float] = (), progress: bool = True) -> EvalResult:
    """Evaluate ``methods`` on ``config.n`` known facts drawn with ``config.seed`` (module docstring).

    ``context_docs`` supplies the long contexts (an iterator: each fact gets fresh text); ``corpus`` (a
    :mod:`keyscope.corpus` source) supplies REP's corpus negatives.
    """

    from keyscope.models import model_name

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise KeyscopeError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    config = config or EvalConfig()
    rome_config = rome_config or rome.ROMEConfig.for_model(model)
    rep_config = rep_config or rep.REPConfig()
    start = time.perf_counter()
    shared = prepare(model, facts, layer, corpus, rome_config, rep_config if "rome+rep" in methods else None,
                     config.n_corpus_negatives, config.seed, config.batch_size)

    def score(fact: Fact, queries: FactProbes) -> dict:
        return evaluate_fact(model, fact, queries, layer, cov, methods, rome_config, rep_config, shared, taus,
                             config.batch_size, config.twin_cosine)

    rows, skipped, n_known = run_facts(model, facts, config, context_docs, score, "evaluating edits", progress)
    summary = summarize(rows, config.bootstrap, config.seed)
    return EvalResult(model_name(model), layer, rows, summary, config, rep_config, n_known, tuple(taus),
                      time.perf_counter() - start, skipped)
