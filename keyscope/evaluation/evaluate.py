"""Robustness evaluation of ROME and ROME+REP: Table 1 and the τ sweep of Figure 7 (Yan et al., Sec. 6).

For every fact (only facts the unedited model knows — top-1 on the true target — are edited, as in the
paper) :func:`evaluate_fact` computes the edit of each method (any of :data:`keyscope.editing.base.EDITORS`: ROME,
ROME+REP, …; a batch editor writes ``EvalConfig.edit_batch`` facts at once, :func:`evaluate_batch`), then asks,
with each method's edit applied (:meth:`keyscope.editing.base.ModelEdit.applied`; weights and hooks are restored
between facts):

* **Success** — every target token of the new object is the teacher-forced top-1 on the edit prompt;
* **Locality** — each neighbourhood prompt (other subjects, same relation) keeps the unedited model's
  top-1 tokens (teacher-forced on ``locality_ground_truth`` or ``target_true``, compared token by token);
* **Rephrase**, **Shuffle**, **Shuffle-words**, **Long** — success on the edit prompt with a rephrased
  subject, with the subject's tokens shuffled, with its words shuffled, and after ``long_context_tokens``
  tokens of other text (the probes of :func:`keyscope.data.perturbations.fact_probes`).

Each kind is split **by whole sources** (leave-kind-out, see :mod:`keyscope.data.perturbations`): **in-domain**
(``_id``) probes are of the sources REP trains on, **out-of-domain** (``_ood``) probes of sources it never sees
(other rephrase kinds, shuffles of those forms, contexts of other facts' sentences). ROME never trains on
either. An out-of-domain probe whose key is a near-twin of a key REP trained on — whitened cosine
``kᵀC⁻¹k' / (‖k‖_C ‖k'‖_C) ≥ twin_cosine`` (0.95) with any of them — says little about generalisation, so
every ``_ood`` metric is also reported over the **new** probes alone (``_ood_new``, with its count). REP's
other positives are the subject under the fact's paraphrase templates; its gate negatives are other
subjects' keys — never those of the neighbourhood prompts, which are held out for Locality — and keys of
unrelated corpus text. With :meth:`keyscope.editing.rep.REPConfig.released` REP trains as the released code does: on
the original subject and the in-domain rephrases and token shuffles, each behind every ROME context prefix
(:attr:`keyscope.editing.base.EditContext.prefixes`), the bare prompt as the only anchor, no templates, long contexts or negatives.

Metrics are **micro-averaged** (pooled over all prompts of all facts) with a 95% confidence interval from
a cluster bootstrap over facts (prompts of one fact are not independent). ROME's probability comparison
``P(new) > P(true)`` (whole-target log-probabilities) is reported too, as ``prob``, for comparability with
ROME's tables.

``taus`` evaluates one fitted adaptor at several gate thresholds without retraining (Figure 7).

**Gate diagnostics** (gated methods, REP; not Table 1 metrics): in the very forward passes that score a fact's
Locality prompts with the edit applied, :func:`keyscope.editing.rep.recorded_gates` records where each adaptor of the edit
switches its branch on (``g(k) > τ``, on the keys that adaptor sees there). A neighbourhood prompt **fires** when
some adaptor is on at some position fed to the model (the prompt and its teacher-forced ground truth but the last
token: every position whose key can change a scored prediction), through the fact's **own** request's adaptor or
**another** request's (a batch edit, MEMIT+REP). Per method (:data:`GATE_STATS`): ``gate_locality`` — the share of
Locality prompts that fire (``_own``, ``_other``: through the fact's own / another request's adaptor);
``gate_locality_failed`` (``_own``, ``_other``) and ``gate_locality_kept`` — that share among the prompts whose
top-1 changed / was kept; ``locality_gate_on`` and ``locality_gate_off`` — Locality among the prompts that fire /
do not; ``gate_adaptors_failed`` / ``_kept`` — the mean number of adaptors that fire on a failed / kept prompt,
and ``gate_positions_failed`` / ``_kept`` — the mean share of its positions where some adaptor is on; all pooled
over facts, with the counts in ``gate_counts``; ``None`` for a method without a gate.
``gate_locality_by_layer`` holds the same statistics with only the adaptors of one edited layer counted (MEMIT+REP
has one per request and layer). The recording changes no score (the gate is computed again from the same keys).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from keyscope._infra.distributed import SINGLE, ProcessRank, all_gather_object, broadcast_object
from keyscope._infra.errors import EmptyCorpus, KeyscopeError
from keyscope.analysis.predictions import sample_known_facts, score_targets, target_runs
from keyscope.analysis.similarity import probe_keys, whitened_cosine_matrix
from keyscope.data.corpus import ContextSource
from keyscope.data.datasets import Fact
from keyscope.data.perturbations import (
    KINDS,
    FactProbes,
    PerturbationConfig,
    fact_probes,
    subject_forms,
)
from keyscope.editing import rep, rome
from keyscope.editing.base import (
    EDITORS,
    EditContext,
    Editor,
    ModelEdit,
    check_methods,
    make_editor,
    prepare_context,
)
from keyscope.editing.prefixes import prefixed_keys
from keyscope.editing.request import EditRequest
from keyscope.evaluation.metrics import (
    METRICS,
    QueryPlan,
    locality_kept,
    plan_metrics,
    plan_queries,
    score_plan,
)

__all__ = ["EvalConfig", "METHODS", "EvalResult", "evaluate", "evaluate_fact", "evaluate_batch",
           "compute_edits", "score_each", "fact_request", "summarize", "bootstrap_interval", "paired_bootstrap_interval", "near_twins",
           "ood_probe_keys", "run_facts", "GATE_STATS", "gate_counts", "Checkpoint", "run_spec"]

#: The methods evaluated by default, in Table 1's row order (any of :data:`keyscope.editing.base.EDITORS` can be asked).
METHODS = ("rome", "rome+rep")
#: The gate diagnostics of a gated method's summary (module docstring): name → (numerator, denominator), sums of
#: :func:`gate_counts` over facts.
GATE_STATS = {
    "gate_locality": ("on", "prompts"),
    "gate_locality_own": ("own", "prompts"),
    "gate_locality_other": ("other", "prompts"),
    "gate_locality_failed": ("failed_on", "failed"),
    "gate_locality_failed_own": ("failed_own", "failed"),
    "gate_locality_failed_other": ("failed_other", "failed"),
    "gate_locality_kept": ("kept_on", "kept"),
    "locality_gate_on": ("kept_on", "on"),
    "locality_gate_off": ("kept_off", "off"),
    "gate_adaptors_failed": ("adaptors_failed", "failed"),
    "gate_adaptors_kept": ("adaptors_kept", "kept"),
    "gate_positions_failed": ("positions_failed", "failed"),
    "gate_positions_kept": ("positions_kept", "kept"),
}


@dataclass(frozen=True)
class EvalConfig:
    """What is evaluated per fact and how intervals are computed. No I/O."""

    n: int = 100
    seed: int = 0
    probes: PerturbationConfig = field(default_factory=PerturbationConfig)  # its seed is set to `seed`
    twin_cosine: float = 0.95
    n_corpus_negatives: int = 512
    bootstrap: int = 1000
    batch_size: int = 32  # prompts per forward pass
    edit_batch: int = 1  # facts per edit of a batch editor (MEMIT); other editors edit one fact at a time

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be positive, not {self.n}")
        if self.edit_batch < 1:
            raise ValueError(f"edit_batch must be positive, not {self.edit_batch}")
        if self.probes.seed != self.seed:  # one seed draws the facts, the splits and the probes
            object.__setattr__(self, "probes", replace(self.probes, seed=self.seed))


def ood_probe_keys(model, queries: FactProbes, layer: int, batch_size: int = 32) -> torch.Tensor:
    """The keys ``(n_ood, d_mlp)`` of the out-of-domain probes of ``queries``, in :func:`near_twins`' order (kind
    by kind, each kind's OOD list in order): they do not depend on what REP trains on, so a caller scoring several
    REP settings on one fact computes them once and passes them to :func:`near_twins`."""
    ood = [p for kind in KINDS for p in queries.perturbed[kind][1]]
    if not ood:
        return torch.empty((0, int(model.cfg.d_mlp)), device=model.cfg.device)  # (0, d_mlp)
    return probe_keys(model, ood, layer, batch_size=batch_size)  # (n_ood, d_mlp)


def near_twins(model, queries: FactProbes, layer: int, cov, rep_config: rep.REPConfig,
               anchors: torch.Tensor | None = None, batch_size: int = 32,
               prefixes: Sequence[str] = ("",), ood_keys: torch.Tensor | None = None) -> dict[tuple[str, int], float]:
    """For each out-of-domain probe of ``queries`` (keyed ``(kind, index in the kind's OOD list)``), its
    largest whitened cosine ``kᵀC⁻¹k' / (‖k‖_C⁻¹ ‖k'‖_C⁻¹)`` with the keys REP trains on: the edit prompt's
    own key, :func:`keyscope.editing.rep.training_positives` of the in-domain probes (with
    ``rep_config.positive_prefixes``, each behind each of ROME's ``prefixes``) and ``anchors`` ``(n, d_mlp)``
    (the edit's prefixed keys, :attr:`keyscope.editing.rome.RankOneEdit.prefix_keys`: REP's anchors with
    ``anchor="prefixes"``; under the default bare anchor they are kept anyway, so the filter is the stricter
    one — k* is their mean, and a probe near one of them is near the edit itself). A probe at or
    above :attr:`EvalConfig.twin_cosine` is a near-twin of a training key. ``ood_keys`` are the probes' keys
    from :func:`ood_probe_keys` when already computed (the same numbers: they are computed apart from the
    training keys either way)."""
    ood = [(kind, i) for kind in KINDS for i in range(len(queries.perturbed[kind][1]))]
    if not ood:
        return {}
    if ood_keys is None:
        ood_keys = ood_probe_keys(model, queries, layer, batch_size)  # (n_ood, d_mlp)
    if len(ood_keys) != len(ood):
        raise ValueError(f"got {len(ood_keys)} out-of-domain keys for {len(ood)} out-of-domain probes")
    originals = rep.behind_prefixes([queries.original], prefixes) if rep_config.positive_prefixes else [queries.original]
    training = [*originals, *rep.training_positives(queries.training_probes(), rep_config, prefixes)]
    keys = probe_keys(model, training, layer, batch_size=batch_size)  # (n_train, d_mlp)
    if anchors is not None:
        keys = torch.cat([keys, anchors.to(keys.device, keys.dtype)])  # (n_train + n_anchors, d_mlp)
    cosine = whitened_cosine_matrix(ood_keys.to(keys.device, keys.dtype), keys, cov)  # (n_ood, n_train + n_anchors)
    best = cosine.max(1).values.cpu().tolist()
    return dict(zip(ood, best))


# ---------------------------------------------------------------------------------------------- scoring


# ---------------------------------------------------------------------------------------------- per fact


def fact_request(fact: Fact) -> EditRequest:
    """The edit request of a fact: its prompt, subject, new and true target."""
    return EditRequest(fact.prompt, fact.subject, fact.target_new, fact.target_true)


def _anchor_keys(model, fact: Fact, edits: dict[str, ModelEdit], context: EditContext) -> torch.Tensor:
    """The edit prompt's keys behind each of ROME's context prefixes ``(n_prefixes, d_mlp)`` (REP's anchors with
    ``anchor="prefixes"``, and the anchors of :func:`near_twins`): from a one-fact ROME-based edit of this row when there is one."""
    for edit in edits.values():
        keys = getattr(edit, "prefix_keys", None)
        if keys is not None and len(edit.requests) == 1:
            return keys
    return prefixed_keys(model, fact_request(fact), context.layer, context.prefixes)


def compute_edits(editors: Mapping[str, Editor], requests: Sequence[EditRequest], probes: Sequence | None,
                  done: Mapping[str, ModelEdit] | None = None) -> tuple[dict[str, ModelEdit], dict[str, float]]:
    """Each editor's edit of ``requests`` (those not in ``done``), in order; a method that adapts another's edit
    (:attr:`~keyscope.editing.base.Editor.base`) adapts the one computed here when its base is among ``editors``.
    Returns the edits and the seconds each took."""
    edits = dict(done or {})
    seconds = {}
    for name in sorted(editors, key=lambda n: editors[n].base in editors):  # bases first, then their adapters
        editor = editors[name]
        if name in edits:
            continue
        start = time.perf_counter()
        base = edits.get(editor.base) if editor.base else None
        edits[name] = editor.adapt(base, probes) if base is not None else editor.compute(requests, probes)
        seconds[name] = time.perf_counter() - start
    return edits, seconds


def evaluate_fact(model, fact: Fact, queries: FactProbes, editors: Mapping[str, Editor], context: EditContext,
                  taus: Sequence[float] = (), twin_cosine: float = 0.95,
                  edits: Mapping[str, ModelEdit] | None = None, own_request: int = 0,
                  record_gates: bool = True) -> dict:
    """Edit one fact with every method of ``editors`` (name → :class:`~keyscope.editing.base.Editor`) and score it:
    ``{"case_id", "seconds": {method: s}, "methods": {name: {metric: (hits, total, prob_hits)}}}``. ``edits``
    holds edits computed beforehand (a batch editor's edit of several facts, this one request ``own_request`` of
    them). With ``taus``, a gated method ``m`` also gets ``m@τ`` entries, one per threshold. With
    ``record_gates``, the row also holds ``"gates": {name: gate_counts(...)}`` for every gated entry (module
    docstring; the scores are the same either way)."""
    batch_size = context.batch_size
    computed, seconds = compute_edits(editors, [fact_request(fact)], [queries], edits)
    row = {"case_id": fact.case_id, "seconds": seconds, "methods": {}}
    anchors = _anchor_keys(model, fact, {n: e for n, e in computed.items() if n not in (edits or {})}, context)
    twins = near_twins(model, queries, context.layer, context.cov, context.configs.get("rep", rep.REPConfig()),
                       anchors, batch_size, context.prefixes)
    plan = plan_queries(model.tokenizer, queries, twins, twin_cosine)
    unedited = score_targets(model, [plan.sequences[r] for r in plan.locality], batch_size=batch_size).argmax
    for name, editor in editors.items():
        edit = computed[name]
        if not edit.gated:
            with edit.applied(model):
                row["methods"][name] = score_plan(model, plan, unedited, batch_size)
            continue
        names = {name: edit.tau, **{f"{name}@{tau:g}": tau for tau in taus}}
        own = own_request if name in (edits or {}) else 0
        for group in _gate_groups(model, edit, plan, names, batch_size):
            gates = None
            if group["off"] and editor.base in row["methods"]:
                scores = row["methods"][editor.base]  # the gate is off everywhere: exactly the base edit
                if record_gates:  # no adaptor fires; which prompts failed does not matter then, only how many
                    n, kept = len(plan.locality), scores["locality"][0]
                    gates = gate_counts([i < kept for i in range(n)], [False] * n, [False] * n)
                    gates["layers"] = {str(a.layer_): dict(gates) for _, a in edit.request_adaptors()}
            elif record_gates:
                with edit.applied(model, group["tau"]):
                    scores, gates = _scored_with_gates(model, edit, plan, unedited, batch_size, own)
            else:
                with edit.applied(model, group["tau"]):
                    scores = score_plan(model, plan, unedited, batch_size)
            for member in group["names"]:
                row["methods"][member] = scores
                if gates is not None:
                    row.setdefault("gates", {})[member] = gates
    return row


def gate_counts(kept: Sequence[bool], own: Sequence[bool], other: Sequence[bool],
                adaptors: Sequence[int] | None = None, positions: Sequence[float] | None = None) -> dict:
    """The gate diagnostics' counts (module docstring) over one fact's Locality prompts, given for each whether it
    kept its top-1 (``kept``) and whether its own request's adaptor (``own``) or another request's (``other``)
    was on at some position: ``prompts``, ``on``/``off`` (some adaptor on / none), ``own``, ``other``,
    ``failed``/``kept`` (top-1 changed / kept), ``failed_on``, ``failed_own``, ``failed_other``, ``kept_on``,
    ``kept_off``; and, given for each prompt how many adaptors were on somewhere in it (``adaptors``) and the share
    of its positions where some adaptor was on (``positions``; both 0 when not given), their sums over the failed
    and the kept prompts: ``adaptors_failed``, ``adaptors_kept``, ``positions_failed``, ``positions_kept``."""
    n = len(kept)
    adaptors = [0] * n if adaptors is None else adaptors
    positions = [0.0] * n if positions is None else positions
    if not n == len(own) == len(other) == len(adaptors) == len(positions):
        raise ValueError(f"got {n} kept, {len(own)} own, {len(other)} other, {len(adaptors)} adaptor and "
                         f"{len(positions)} position entries")
    on = [a or b for a, b in zip(own, other)]
    failed = [not k for k in kept]
    return {"prompts": n, "on": sum(on), "off": n - sum(on), "own": sum(own), "other": sum(other),
            "failed": sum(failed), "kept": n - sum(failed),
            "failed_on": sum(f and o for f, o in zip(failed, on)),
            "failed_own": sum(f and bool(o) for f, o in zip(failed, own)),
            "failed_other": sum(f and bool(o) for f, o in zip(failed, other)),
            "kept_on": sum(k and o for k, o in zip(kept, on)),
            "kept_off": sum(k and not o for k, o in zip(kept, on)),
            "adaptors_failed": sum(a for f, a in zip(failed, adaptors) if f),
            "adaptors_kept": sum(a for f, a in zip(failed, adaptors) if not f),
            "positions_failed": sum(p for f, p in zip(failed, positions) if f),
            "positions_kept": sum(p for f, p in zip(failed, positions) if not f)}


def _scored_with_gates(model, edit: ModelEdit, plan: QueryPlan, unedited: Sequence, batch_size: int,
                       own: int) -> tuple[dict, dict]:
    """:func:`score_plan` on the model as it is (``edit`` applied) and the :func:`gate_counts` of its Locality
    prompts, read in the same forward passes (:func:`keyscope.editing.rep.recorded_gates`); ``own`` is the index of the
    scored fact among ``edit.requests``. Pass ``b`` of :func:`keyscope.analysis.predictions.target_runs` is call ``b`` of
    every adaptor; an adaptor fires on a run where its gate is on at one of the run's real (unpadded) positions.
    The counts hold ``"layers": {str(layer): gate_counts(...)}`` too, each with the adaptors of that layer alone."""
    adaptors = edit.request_adaptors()
    with rep.recorded_gates([a for _, a in adaptors]) as calls:
        scores = score_targets(model, plan.sequences, batch_size=batch_size)
    runs, run_of, batches = target_runs(plan.sequences, batch_size)
    layers = sorted({a.layer_ for _, a in adaptors})
    fired = {(mine, layer): np.zeros(len(runs), dtype=int)  # (own request?, layer) -> adaptors on per run (n_runs,)
             for mine in (True, False) for layer in layers}
    where = {layer: [np.zeros(len(run), dtype=bool) for run in runs] for layer in layers}  # positions on, per run
    wanted = {run_of[i] for i in plan.locality}  # only the Locality runs are read below
    for (request, adaptor), record in zip(adaptors, calls):
        if len(record) != len(batches):
            raise RuntimeError(f"an adaptor was called {len(record)} times in {len(batches)} forward passes")
        for batch, on in zip(batches, record):  # on: (batch, pos)
            if on.shape != (len(batch), max(len(runs[r]) for r in batch)):
                raise RuntimeError(f"gate of shape {tuple(on.shape)} for a pass of {len(batch)} runs")
            for row, r in enumerate(batch):
                if r not in wanted:
                    continue
                real = on[row, : len(runs[r])].numpy()  # (len(run),)
                fired[(request == own, adaptor.layer_)][r] += bool(real.any())
                where[adaptor.layer_][r] |= real
    rows = [run_of[i] for i in plan.locality]
    kept = locality_kept(plan, scores, unedited)

    def counts_of(chosen: Sequence[int]) -> dict:
        own_on, other_on = ([bool(sum(fired[(mine, layer)][r] for layer in chosen)) for r in rows]
                            for mine in (True, False))
        n_on = [int(sum(fired[(mine, layer)][r] for mine in (True, False) for layer in chosen)) for r in rows]
        share = [float(np.logical_or.reduce([where[layer][r] for layer in chosen]).mean()) for r in rows]
        return gate_counts(kept, own_on, other_on, n_on, share)

    counts = counts_of(layers) | {"layers": {str(layer): counts_of([layer]) for layer in layers}}
    return plan_metrics(plan, scores, unedited), counts


def evaluate_batch(model, items: Sequence[tuple[Fact, FactProbes]], editors: Mapping[str, Editor],
                   context: EditContext, taus: Sequence[float] = (), twin_cosine: float = 0.95,
                   record_gates: bool = True) -> tuple[list[dict], list[dict]]:
    """:func:`evaluate_fact` for each of ``items`` (fact, probes), the batch editors' edits computed once for all of
    them (MEMIT writes the facts of a batch jointly); ``(rows, skipped)``. A batch edit that cannot be computed
    skips the whole batch; a fact that cannot be scored skips that fact, each with its reason."""
    batched = {name: e for name, e in editors.items() if e.batched}
    shared: dict[str, ModelEdit] = {}
    if batched:
        try:
            shared, _ = compute_edits(batched, [fact_request(f) for f, _ in items], [q for _, q in items])
        except KeyscopeError as exc:
            return [], [{"case_id": f.case_id, "reason": str(exc)} for f, _ in items]
    position = {fact.case_id: i for i, (fact, _) in enumerate(items)}  # the fact's request in the batch edits
    return score_each(items, lambda fact, queries: evaluate_fact(model, fact, queries, editors, context, taus,
                                                                 twin_cosine, shared, position[fact.case_id],
                                                                 record_gates))


def score_each(items: Sequence[tuple[Fact, FactProbes]], score: Callable[[Fact, FactProbes], dict]
               ) -> tuple[list[dict], list[dict]]:
    """``score(fact, probes)`` for each of ``items``: ``(rows, skipped)``, a fact whose scoring raises a
    :class:`~keyscope._infra.errors.KeyscopeError` skipped with its reason."""
    rows, skipped = [], []
    for fact, queries in items:
        try:
            rows.append(score(fact, queries))
        except KeyscopeError as exc:
            skipped.append({"case_id": fact.case_id, "reason": str(exc)})
    return rows, skipped


def _gate_groups(model, edit: ModelEdit, plan: QueryPlan, names: dict[str, float], batch_size: int) -> list[dict]:
    """Group the thresholds of ``names`` (method name → τ) by the set of positions whose gate is on in the
    sequences of ``plan``: thresholds with the same set give the same forward passes, so each group is
    scored once (Figure 7 without a pass per τ); ``off`` marks a group whose set is empty (exactly the base edit).
    When the gate's on-set does not decide the adapted keys (dropout at inference, the paper's setting), or the
    edit has several gates (several requests or layers), every τ is its own group."""
    if not edit.gate_decides or len(edit.requests) > 1 or len(edit.layers) > 1:  # one gate decides: group
        return [{"tau": tau, "names": [name], "off": False} for name, tau in names.items()]
    from keyscope.analysis.keys import layer_keys
    from keyscope.data.prompts import pad_batch

    runs, _, batches = target_runs(plan.sequences, batch_size)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    gates = []
    for rows in batches:
        input_ids, mask = pad_batch([runs[i] for i in rows], pad_id, device=model.cfg.device)
        keys = layer_keys(model, input_ids, mask, edit.layers[-1])  # (batch, pos, d_mlp)
        gates.append(edit.gate(keys)[mask.bool()].cpu())  # (real positions,)
    gate = torch.cat(gates)
    groups: dict[bytes, dict] = {}
    for name, tau in names.items():
        on = edit.gate_on(gate, tau).numpy()
        group = groups.setdefault(on.tobytes(), {"tau": tau, "names": [], "off": not on.any()})
        group["names"].append(name)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------- summaries


def _resampled_micro(hits: np.ndarray, totals: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The micro-average ``Σ hits / Σ totals`` of each resample of facts ``index`` ``(B, n_facts)``: ``(B,)``,
    NaN where a resample holds no prompt."""
    hits, totals = np.asarray(hits, float), np.asarray(totals, float)
    sums = totals[index].sum(1)  # (B,)
    return np.where(sums > 0, hits[index].sum(1) / np.maximum(sums, 1), np.nan)


def _resamples(n_facts: int, n_resamples: int, seed: int) -> np.ndarray:
    """Facts drawn with replacement, one row per resample: ``(n_resamples, n_facts)``."""
    return np.random.default_rng(seed).integers(0, n_facts, size=(n_resamples, n_facts))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.nanquantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_interval(hits: np.ndarray, totals: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the micro-average ``Σ hits / Σ totals`` under resampling of the facts (the
    clusters) with replacement."""
    totals = np.asarray(totals, float)
    if totals.sum() == 0:
        return (float("nan"), float("nan"))
    return _percentiles(_resampled_micro(hits, totals, _resamples(len(totals), n_resamples, seed)), level)


def paired_bootstrap_interval(hits: np.ndarray, totals: np.ndarray, base_hits: np.ndarray, base_totals: np.ndarray,
                              n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the difference of micro-averages ``Σ hits / Σ totals − Σ base_hits / Σ base_totals``
    of two methods scored on the same facts (entry ``i`` of every array is fact ``i``), under one resampling of
    the facts shared by both methods (a paired cluster bootstrap): what the facts have in common cancels, so the
    interval is that of the difference, not of either rate. With the same ``seed`` the resamples are those of
    :func:`bootstrap_interval`."""
    totals, base_totals = np.asarray(totals, float), np.asarray(base_totals, float)
    if len(totals) != len(base_totals):
        raise ValueError(f"a paired interval needs the same facts: got {len(totals)} and {len(base_totals)}")
    if totals.sum() == 0 or base_totals.sum() == 0:
        return (float("nan"), float("nan"))
    index = _resamples(len(totals), n_resamples, seed)  # (B, n_facts)
    return _percentiles(_resampled_micro(hits, totals, index) - _resampled_micro(base_hits, base_totals, index), level)


def summarize(rows: Sequence[dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Per method: each metric's micro-average, its 95% interval (``ci``), the ``P(new) > P(true)`` rate
    (``prob``) and the number of prompts (``counts``); the gate diagnostics of :data:`GATE_STATS` and their summed
    :func:`gate_counts` (``gate_counts``) of the rows that hold them (``None`` for a method none does)."""
    order = list(EDITORS)
    methods = sorted({m for r in rows for m in r["methods"]},
                     key=lambda m: (m not in EDITORS, order.index(m) if m in EDITORS else 0, m))
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
        gates = [r["gates"][method] for r in rows if method in r.get("gates", {})]
        counts = _summed_counts(gates) if gates else None
        entry["gate_counts"] = counts
        entry |= _gate_stats(counts)
        entry["gate_locality_by_layer"] = ({layer: _gate_stats(c) for layer, c in counts["layers"].items()}
                                           if counts and "layers" in counts else None)
        out[method] = entry
    return out


def _summed_counts(gates: Sequence[dict]) -> dict:
    """:func:`gate_counts` of several facts summed, count by count (and layer by layer, where given)."""
    total = {k: sum(g[k] for g in gates) for k in gates[0] if k != "layers"}
    if all("layers" in g for g in gates):
        layers = dict.fromkeys(layer for g in gates for layer in g["layers"])
        total["layers"] = {layer: _summed_counts([g["layers"][layer] for g in gates if layer in g["layers"]])
                           for layer in layers}
    return total


def _gate_stats(counts: dict | None) -> dict[str, float | None]:
    """:data:`GATE_STATS` of summed :func:`gate_counts` (``None`` each without counts or with a zero denominator)."""
    return {stat: counts[num] / counts[den] if counts and counts[den] else None
            for stat, (num, den) in GATE_STATS.items()}


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


#: The cache folder of :class:`Checkpoint` files (``<cache>/<kind>/<hash of the spec>/``) and their format.
CHECKPOINT_KIND = "fact_rows_checkpoint"
CHECKPOINT_FORMAT = 1


@dataclass
class Checkpoint:
    """The per-fact rows of a :func:`run_facts` run kept on disk, so that a stopped run continues where it stopped
    (``keyscope evaluate --resume``), as :mod:`keyscope.analysis.covariance_job` keeps the covariance's sums.

    ``spec`` is everything the rows depend on: the caller's part (``keyscope evaluate``: the long contexts' text),
    the run's (:meth:`describe`, called by :func:`evaluate`: model name and weights fingerprint, dtype, device
    type, layer, ``C``, a digest of the facts, corpus, methods and every config) and :func:`run_facts`' (the drawn
    facts' case ids, the chunk size, the number of processes). Its SHA-256 names the folder
    ``<cache>/fact_rows_checkpoint/<hash>/`` (:func:`keyscope._infra.cache.artefact_dir`); each rank of ``K`` keeps its own
    chunks in ``rank<r>of<K>.json``: the spec and, per scored chunk, its index, case ids, rows and skips, rewritten
    atomically (:func:`keyscope._infra.atomic.write_text`) after every chunk (one fact, or one batch of a batch editor).
    Floats are written as Python's shortest exact repr, so the restored rows give the same tables bit for bit
    (only the ``(hits, total, prob_hits)`` tuples come back as lists).

    Without ``resume`` a run starts afresh and overwrites a checkpoint of the same spec. With ``resume`` the
    chunks found are not scored again; a run with any other spec finds no checkpoint (another folder), and one
    whose file cannot be read or holds another spec is not used: either is one warning, and the run starts
    afresh. The caller removes the checkpoint (:meth:`remove`) once its results are safe (``keyscope evaluate``:
    after writing its outputs); a run stopped any other way (Ctrl-C, a crash, another rank's failure) keeps it.
    ``restored`` is the number of facts restored, over all ranks, once :func:`run_facts` returns.
    """

    spec: dict = field(default_factory=dict)
    resume: bool = False
    root: str | Path | None = None  # the cache root (keyscope._infra.cache.cache_root)
    path: Path | None = field(default=None, init=False)
    restored: int = field(default=0, init=False)
    _full: dict = field(default_factory=dict, init=False, repr=False)

    def describe(self, **parts) -> None:
        """Add ``parts`` (plain JSON, or dataclasses' ``asdict``: tuples are lists, other objects their repr) to
        the spec."""
        self.spec = {**self.spec, **json.loads(json.dumps(parts, default=repr))}

    def open(self, case_ids: Sequence, chunk: int, world: ProcessRank) -> dict[int, tuple[list, list, list]]:
        """Fix the checkpoint's path for the drawn facts ``case_ids``, in chunks of ``chunk``, on ``world``; with
        ``resume`` return the chunks it holds (index → ``(case_ids, rows, skipped)``), else nothing."""
        from keyscope._infra import cache

        self._full = {**self.spec, "format": CHECKPOINT_FORMAT, "facts_drawn": list(case_ids), "chunk": chunk,
                      "world_size": world.size}
        self.path = cache.artefact_dir(CHECKPOINT_KIND, self._full, self.root) / f"rank{world.rank}of{world.size}.json"
        if not self.resume:
            return {}
        if not self.path.exists():
            facts = f"{len(case_ids)} fact{'s' if len(case_ids) != 1 else ''}"
            warnings.warn(f"no checkpoint of this run ({facts}, {world.size} process{'es' if world.distributed else ''}) "
                          "to resume; starting afresh (a stopped run "
                          "continues only with the same model, data, facts, methods, settings and processes)",
                          stacklevel=3)
            return {}
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            if stored["spec"] != json.loads(cache.canonical_json(self._full)):
                raise ValueError("it was written for a different run")
            return {int(index): (ids, rows, skipped) for index, ids, rows, skipped in stored["chunks"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged file is never used silently
            warnings.warn(f"checkpoint {self.path} not used ({exc}); starting afresh", stacklevel=3)
            return {}

    def save(self, chunks: Mapping[int, tuple[list, list, list]]) -> None:
        """Write ``chunks`` (index → ``(case_ids, rows, skipped)``) with the spec, atomically."""
        from keyscope._infra import cache
        from keyscope._infra.atomic import write_text

        payload = {"spec": json.loads(cache.canonical_json(self._full)),
                   "chunks": [[index, *chunks[index]] for index in sorted(chunks)]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps(payload, default=_plain_number) + "\n")

    def remove(self) -> None:
        """Delete this rank's checkpoint, and its folder once no rank's is left in it."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


def _plain_number(value):
    """A NumPy (or torch) scalar in a row as the Python number it holds (``json.dumps``' ``default``)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    raise TypeError(f"a per-fact row holds a {type(value).__name__}, which a checkpoint cannot keep")


def run_spec(model, facts: Sequence[Fact], layer: int, cov, corpus=None) -> dict:
    """What every per-fact run's rows depend on besides its methods and configs (a :class:`Checkpoint`'s spec):
    the keyscope version, model name, fingerprint of all weights (:func:`keyscope.analysis.covariance.weights_fingerprint`),
    dtype, device type, layer, a digest of ``C`` (and its ridge scale), of every fact (they supply negatives and
    names a shuffle must not spell) and the corpus (:func:`keyscope.data.corpus.corpus_id`)."""
    import hashlib

    from keyscope import __version__
    from keyscope.analysis.covariance import weights_fingerprint
    from keyscope.data.corpus import corpus_id
    from keyscope.model.models import model_name

    matrix = getattr(cov, "C_", cov).detach().to("cpu", torch.float64).contiguous()
    records = json.dumps([asdict(f) for f in facts], sort_keys=True, default=repr).encode("utf-8")
    return {"keyscope": __version__, "model": model_name(model), "weights": weights_fingerprint(model),
            "dtype": str(next(model.original_model.parameters()).dtype),
            "device": torch.device(model.cfg.device).type, "layer": layer,
            "covariance": hashlib.sha256(matrix.numpy().tobytes()).hexdigest()[:16],
            "ridge_scale": getattr(getattr(cov, "config", None), "ridge_scale", None),
            "facts": hashlib.sha256(records).hexdigest()[:16],
            "corpus": corpus_id(corpus) if corpus is not None else None}


def run_facts(model, facts: Sequence[Fact], config: EvalConfig, context_docs: Iterable[str],
              score: Callable[[Sequence[tuple[Fact, FactProbes]]], tuple[list[dict], list[dict]]], desc: str,
              progress: bool = True, chunk: int = 1, world: ProcessRank = SINGLE,
              checkpoint: Checkpoint | None = None) -> tuple[list[dict], list[dict], int]:
    """``score(items)`` for ``config.n`` known facts drawn with ``config.seed``, in chunks of ``chunk`` facts
    with their probes (:func:`keyscope.data.perturbations.fact_probes`); ``score`` returns ``(rows, skipped)``.
    Returns ``(rows, skipped, n_known)``, in the drawn order. A fact whose probes raise a
    :class:`~keyscope._infra.errors.KeyscopeError` (e.g. a target without a token of its own after the prompt) is
    skipped with its reason; none scored at all is an error, and so is a corpus too small for a long context
    (:class:`~keyscope._infra.errors.EmptyCorpus`: no other fact would fare better). The facts share one
    :class:`~keyscope.data.corpus.ContextSource` over ``context_docs``.

    Under ``torchrun`` (``world``) every rank takes rank 0's draw of the facts (so a near-tie read differently on
    another device cannot split the chunks differently), builds every fact's probes (cheap, and the long contexts
    come from one stream, so each fact gets the same text as in a single process), but scores
    only the chunks ``rank, rank + K, …``; the rows and skips of all ranks are gathered on every rank and put in
    the drawn order — a single process's rows, since each fact's scores depend only on the fact, its probes and
    the shared setup (seeded generators, no global random state).

    With a ``checkpoint`` (:class:`Checkpoint`) every scored chunk is added to it, and with ``checkpoint.resume``
    the chunks it holds are taken from it instead of scored: every fact's probes are still built, in order (the
    long contexts come from one stream), so the other chunks are scored exactly as in an uninterrupted run and the
    rows are its rows. Under ``torchrun`` each rank keeps its own chunks.
    """
    from tqdm.auto import tqdm

    chosen, n_known = sample_known_facts(model, facts, config.n, config.seed, batch_size=config.batch_size)
    if world.distributed:  # rank 0's draw on every rank: a near-tie top-1 read differently can't split the chunks
        ids, n_known = broadcast_object(([f.case_id for f in chosen], n_known), world)
        wanted = set(ids)
        by_id = {f.case_id: f for f in facts if f.case_id in wanted} | {f.case_id: f for f in chosen}
        chosen = [by_id[i] for i in ids]
    forms = subject_forms(facts)
    contexts = ContextSource.of(context_docs)
    done = checkpoint.open([f.case_id for f in chosen], chunk, world) if checkpoint is not None else {}
    rows, skipped, pending = [], [], []
    chunks = restored = 0

    def flush() -> None:
        nonlocal chunks, restored
        if chunks % world.size == world.rank:  # this rank's chunk (distributed.shard's striding)
            ids = [fact.case_id for fact, _ in pending]
            if chunks in done and done[chunks][0] == ids:  # scored before the run was stopped
                _, scored, failed = done[chunks]
                restored += len(ids)
            else:
                scored, failed = score(pending)
                if checkpoint is not None:
                    done[chunks] = (ids, scored, failed)
                    checkpoint.save(done)
            rows.extend(scored)
            skipped.extend(failed)
        chunks += 1
        bar.update(len(pending))
        pending.clear()

    with tqdm(total=len(chosen), desc=desc, disable=not progress or not world.is_main) as bar:
        for fact in chosen:
            try:
                pending.append((fact, fact_probes(model.tokenizer, fact, contexts, config.probes, exclude=forms,
                                                  other_facts=facts)))
            except EmptyCorpus:
                raise
            except KeyscopeError as exc:
                if world.is_main:  # every rank finds it; one records it
                    skipped.append({"case_id": fact.case_id, "reason": str(exc)})
                bar.update(1)
            if len(pending) == chunk:
                flush()
        if pending:
            flush()
    if world.distributed:
        shares = all_gather_object((rows, skipped, restored), world)
        rows = [row for share, _, _ in shares for row in share]
        skipped = [skip for _, share, _ in shares for skip in share]
        restored = sum(share for _, _, share in shares)
    if checkpoint is not None:
        checkpoint.restored = restored
    if not rows:
        raise KeyscopeError(f"no fact could be evaluated ({len(skipped)} skipped; first: {skipped[0]['reason']})")
    order = {fact.case_id: i for i, fact in enumerate(chosen)}  # the drawn order, whatever the chunks did
    rows.sort(key=lambda r: order[r["case_id"]])
    skipped.sort(key=lambda r: order[r["case_id"]])
    return rows, skipped, n_known


def evaluate(model, facts: Sequence[Fact], layer: int, cov, context_docs: Iterable[str], corpus=None,
             methods: Sequence[str] = METHODS, config: EvalConfig | None = None,
             rome_config: rome.ROMEConfig | None = None, rep_config: rep.REPConfig | None = None,
             taus: Sequence[float] = (), progress: bool = True,
             load_covariance: Callable[[int], object] | None = None, world: ProcessRank = SINGLE,
             record_gates: bool = True, checkpoint: Checkpoint | None = None) -> EvalResult:
    """Evaluate ``methods`` (names in :data:`keyscope.editing.base.EDITORS`) on ``config.n`` known facts drawn with
    ``config.seed`` (module docstring); batch editors get ``config.edit_batch`` facts per edit.

    ``context_docs`` supplies the long contexts (a :class:`~keyscope.data.corpus.ContextSource` or the documents of
    one: each long context takes text of its own); ``corpus`` (a
    :mod:`keyscope.data.corpus` source) supplies REP's corpus negatives; ``load_covariance(L)`` the key covariance of
    another layer, for editors that edit several. Under ``torchrun`` (``world``) the facts (or batches of facts)
    are shared among the ranks and every rank gets all rows (:func:`run_facts`); ``cov`` and what
    ``load_covariance`` returns must be the same on every rank. ``record_gates``: the gate diagnostics of gated
    methods (module docstring), which change no other number. ``checkpoint``: keep the per-fact rows on disk as
    they come and, with ``checkpoint.resume``, continue a stopped run (:class:`Checkpoint`; its spec gets
    :func:`run_spec`, the methods and every config here; the caller adds what it alone knows, the long contexts'
    source, and removes it once the results are safe).
    """

    from keyscope.model.models import model_name

    methods = check_methods(methods)
    config = config or EvalConfig()
    rep_config = rep_config or rep.REPConfig()
    start = time.perf_counter()
    context = prepare_context(model, layer, cov, methods, facts, corpus, {"rome": rome_config, "rep": rep_config},
                              config.n_corpus_negatives, config.seed, config.batch_size, load_covariance)
    editors = {name: make_editor(name, model, context) for name in methods}
    gated = [m for m in methods if EDITORS[m].gated]
    if taus and not gated:
        raise KeyscopeError(f"a τ sweep needs a gated method ({', '.join(m for m in EDITORS if EDITORS[m].gated)})")

    def score(items):
        return evaluate_batch(model, items, editors, context, taus, config.twin_cosine, record_gates)

    if checkpoint is not None:
        checkpoint.describe(command="evaluate", **run_spec(model, facts, layer, cov, corpus), methods=list(methods),
                            config=asdict(config), rome_config=asdict(rome_config) if rome_config else None,
                            rep_config=asdict(rep_config), taus=list(taus), record_gates=record_gates)
    rows, skipped, n_known = run_facts(model, facts, config, context_docs, score, "evaluating edits", progress,
                                       chunk=config.edit_batch if any(e.batched for e in editors.values()) else 1,
                                       world=world, checkpoint=checkpoint)
    summary = summarize(rows, config.bootstrap, config.seed)
    return EvalResult(model_name(model), layer, rows, summary, config, rep_config, n_known, tuple(taus),
                      time.perf_counter() - start, skipped)
