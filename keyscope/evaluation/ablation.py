"""What each of keyscope's departures from the reference code buys: ROME+REP under keyscope's settings, under
the released code's (:meth:`keyscope.editing.rep.REPConfig.released` on ROME's reference mode,
``ROMEConfig(reference=True)``), with each departure reverted alone, and with each choice keyscope tried and
dropped for the released one switched back on alone (``Variant.tried``; :data:`VARIANTS`).

Every variant is scored on the same facts, probes and Table 1 metrics as :mod:`keyscope.evaluation.evaluate` (micro-averaged,
95% cluster-bootstrap intervals); per fact the ROME edit is computed once per ROME setting and shared by every
REP variant on it, and the unedited neighbourhood predictions once. ROME alone is reported beside them, for each
ROME setting used (``rome`` and ``rome (reference)``). A variant's ``_ood_new`` probes are those without a
near-twin among *its own* training keys (:func:`keyscope.evaluation.evaluate.near_twins`); the out-of-domain probes' keys
are computed once per fact.

Whether a departure helps is read from the **difference** of each variant to keyscope's setting (:data:`BASE`),
with a paired 95% cluster-bootstrap interval (:func:`differences`, one resampling of the facts shared by both
methods, :func:`keyscope.evaluation.evaluate.paired_bootstrap_interval`): the marginal intervals of two variants scored on
the same facts overlap even where one is better on almost every fact. :func:`verdict` reads it: a departure
*helps* a column when reverting it lowers that column measurably (the whole interval of variant − keyscope below
0), *hurts* it when reverting raises it measurably; keyscope keeps a departure as its default only where it
helps some Table 1 column. For a tried variant the row is the tried
choice minus the default, so *helps* credits the default's (the released code's) choice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from keyscope._infra.distributed import SINGLE, ProcessRank
from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.predictions import score_targets
from keyscope.data.datasets import Fact
from keyscope.data.perturbations import LONG, REPHRASE, SHUFFLE, FactProbes
from keyscope.editing import rep, rome
from keyscope.editing.base import EditContext, make_editor, prepare_context
from keyscope.evaluation.evaluate import (
    Checkpoint,
    EvalConfig,
    fact_request,
    near_twins,
    ood_probe_keys,
    paired_bootstrap_interval,
    run_facts,
    run_spec,
    score_each,
    summarize,
)
from keyscope.evaluation.metrics import METRICS, plan_queries, score_plan

__all__ = ["Variant", "VARIANTS", "BASE", "AblationResult", "ablate", "ablate_fact",
           "baseline_name", "differences", "verdict"]


@dataclass(frozen=True)
class Variant:
    """ROME+REP with ``rep`` (a :class:`~keyscope.editing.rep.REPConfig`) on ROME's keyscope (``rome_reference=False``)
    or reference mode; ``departure`` says what keyscope does differently and why."""

    name: str
    departure: str
    rep: rep.REPConfig
    rome_reference: bool = False
    #: A choice keyscope measured and did not keep (the default is the released code's): the variant tries
    #: keyscope's former choice instead of reverting one.
    tried: bool = False


#: keyscope's setting, the released code's, each departure reverted alone (to the released code's choice), and
#: each choice keyscope tried and dropped for want of a measured effect (``tried``), added alone.
VARIANTS: tuple[Variant, ...] = (
    Variant("keyscope", "keyscope's settings (REPConfig(), keyscope's ROME)", rep.REPConfig()),
    Variant("released", "the released code: REPConfig.released() on ROME's reference mode", rep.REPConfig.released(),
            rome_reference=True),
    Variant("objective", "objective (α(k̂) − 1)², which sets each positive's edit strength to k*'s; the released "
            "−(k̂/‖k̂‖)ᵀu is blind to ‖k̂‖", rep.REPConfig(objective="released")),
    Variant("steps_lr", "150 Adam steps at lr 2e-3; the released 10 steps at 5e-4 barely move the adaptor",
            rep.REPConfig(steps=10, lr=5e-4)),
    Variant("long_context", "trains on long contexts (the released code's lost their subject slot)",
            rep.REPConfig(train_long_context=False)),
    Variant("gate_negatives", "the gate is trained against other subjects', corpus and context keys",
            rep.REPConfig(gate_negatives=False, gate_weight=0.0)),
    Variant("dropout_at_test", "dropout off at test time (the released code leaves it on)",
            rep.REPConfig(dropout_at_inference=True)),
    Variant("training_data", "positives: every in-domain kind once (rephrases, token and word shuffles, templates; "
            "long contexts are their own row); released: rephrases and token shuffles behind every ROME prefix",
            rep.REPConfig(positive_kinds=(REPHRASE, SHUFFLE, LONG), positive_prefixes=True)),
    Variant("input_scaling", "tried, not the default: keys scaled by 1/RMS before the gate and projection "
            "(default: the released code's unscaled keys)", rep.REPConfig(input_scaling=True), tried=True),
    Variant("anchor", "tried, not the default: the edit prompt behind every prefix as anchors, relative error ×10 "
            "(default: the released code's bare key, 50000·MSE)",
            rep.REPConfig(anchor="prefixes", anchor_loss="relative", anchor_weight=10.0), tried=True),
    Variant("adaptor", "tried, not the default: every positive at every step, biases, gate on at g ≥ τ (default: "
            "the released code's mini-batches of 15, no biases, g > τ)",
            rep.REPConfig(batch_size=None, bias=True, gate_strict=False), tried=True),
    Variant("rome_reference", "keyscope's ROME (one prefix-averaged key k*, KL after \"is a\"); reference: "
            "kmeng01/rome's", rep.REPConfig(), rome_reference=True),
)


#: The variant every other one is compared with (:func:`differences`).
BASE = "keyscope"

def verdict(difference_ci: Mapping[str, Sequence[float] | None], metrics: Sequence[str] = METRICS) -> dict:
    """What keyscope's choice does, read from the paired 95% intervals ``difference_ci`` of (variant with the
    choice reverted) − keyscope over ``metrics`` (every Table 1 column): it ``helps`` the columns whose interval lies below 0 (reverting
    it lowers them) and ``hurts`` those whose interval lies above 0. ``{"verdict": "helps" | "hurts" |
    "trade-off" | "no measured effect", "helps": [...], "hurts": [...], "keep": bool}``; ``keep``: the choice
    measurably helps some column, the rule for keeping it as keyscope's default."""
    helps = [m for m in metrics if difference_ci.get(m) is not None and difference_ci[m][1] < 0]
    hurts = [m for m in metrics if difference_ci.get(m) is not None and difference_ci[m][0] > 0]
    label = ("trade-off" if helps and hurts else "helps" if helps else "hurts" if hurts else "no measured effect")
    return {"verdict": label, "helps": helps, "hurts": hurts, "keep": bool(helps)}


def differences(rows: Sequence[dict], names: Sequence[str], base: str = BASE, n_resamples: int = 1000,
                seed: int = 0) -> dict[str, dict]:
    """For each of ``names`` (not ``base``) scored beside ``base`` in ``rows`` (:func:`ablate_fact`'s): the
    difference of every Table 1 metric's micro-average to ``base``'s, ``Σh/Σt − Σh_b/Σt_b`` (a rate, not points),
    and its paired 95% cluster-bootstrap interval over the facts where both are scored
    (:func:`keyscope.evaluation.evaluate.paired_bootstrap_interval`): ``{name: {"difference": {metric: d},
    "difference_ci": {metric: [lo, hi]}, "verdict": verdict(...)}}``, ``None`` where either method has no prompt of
    the metric."""
    out = {}
    for name in names:
        if name == base:
            continue
        paired = [(r["methods"][name], r["methods"][base]) for r in rows if name in r["methods"] and base in r["methods"]]
        entry: dict = {"difference": {}, "difference_ci": {}}
        for metric in METRICS:
            hits, totals, base_hits, base_totals = (np.array([pair[j][metric][i] for pair in paired], float)
                                                    for j, i in ((0, 0), (0, 1), (1, 0), (1, 1)))
            if totals.sum() == 0 or base_totals.sum() == 0:
                entry["difference"][metric] = entry["difference_ci"][metric] = None
                continue
            entry["difference"][metric] = float(hits.sum() / totals.sum() - base_hits.sum() / base_totals.sum())
            entry["difference_ci"][metric] = list(paired_bootstrap_interval(hits, totals, base_hits, base_totals,
                                                                            n_resamples, seed))
        entry["verdict"] = verdict(entry["difference_ci"])
        out[name] = entry
    return out


def baseline_name(reference: bool) -> str:
    """The method name of ROME alone under a ROME setting."""
    return "rome (reference)" if reference else "rome"


def ablate_fact(model, fact: Fact, queries: FactProbes, variants: Sequence[Variant],
                contexts: dict[bool, EditContext], twin_cosine: float = 0.95) -> dict:
    """Score ROME and every variant on one fact: ``{"case_id", "methods": {name: {metric: (hits, total,
    prob_hits)}}}`` as :func:`keyscope.evaluation.evaluate.evaluate_fact`'s rows. ``contexts`` holds the run's
    :class:`~keyscope.editing.base.EditContext` per ROME setting (``True``: reference mode)."""
    request = fact_request(fact)
    edits = {ref: make_editor("rome", model, contexts[ref]).compute([request])
             for ref in sorted({v.rome_reference for v in variants})}
    row: dict = {"case_id": fact.case_id, "methods": {}}
    unedited = None
    first = contexts[variants[0].rome_reference]
    ood_keys = ood_probe_keys(model, queries, first.layer, first.batch_size)  # (n_ood, d_mlp), every variant's
    for variant in variants:
        context = contexts[variant.rome_reference].with_config("rep", variant.rep)
        edit = edits[variant.rome_reference]
        twins = near_twins(model, queries, context.layer, context.cov, variant.rep, edit.prefix_keys,
                           context.batch_size, context.prefixes, ood_keys)
        plan = plan_queries(model.tokenizer, queries, twins, twin_cosine)
        if unedited is None:  # the neighbourhood prompts are the same in every plan
            unedited = score_targets(model, [plan.sequences[r] for r in plan.locality],
                                     batch_size=context.batch_size).argmax
        baseline = baseline_name(variant.rome_reference)
        if baseline not in row["methods"]:
            with edit.applied(model):
                row["methods"][baseline] = score_plan(model, plan, unedited, context.batch_size)
        adapted = make_editor("rome+rep", model, context).adapt(edit, [queries])
        with adapted.applied(model):
            row["methods"][variant.name] = score_plan(model, plan, unedited, context.batch_size)
    return row


@dataclass
class AblationResult:
    """Per-fact rows and the summary per variant and ROME baseline (:func:`keyscope.evaluation.evaluate.summarize`)."""

    model: str
    layer: int
    variants: tuple[Variant, ...]
    rows: list[dict] = field(repr=False)
    summary: dict
    config: EvalConfig
    n_known: int
    seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)

    @property
    def baselines(self) -> list[str]:
        return [baseline_name(ref) for ref in sorted({v.rome_reference for v in self.variants})]

    def as_json(self) -> dict:
        return {"n": len(self.rows), "n_known": self.n_known, "model": self.model, "layer": self.layer,
                "variants": {v.name: {"departure": v.departure, "rome_reference": v.rome_reference,
                                      "rep_config": asdict(v.rep), **self.summary[v.name]} for v in self.variants},
                "baselines": {name: self.summary[name] for name in self.baselines},
                "seconds": round(self.seconds, 1), "config": asdict(self.config), "skipped": self.skipped}


def ablate(model, facts: Sequence[Fact], layer: int, cov, context_docs: Iterable[str], corpus=None,
           variants: Sequence[Variant] = VARIANTS, config: EvalConfig | None = None, tau: float | None = None,
           seed: int | None = None, progress: bool = True, world: ProcessRank = SINGLE,
           checkpoint: Checkpoint | None = None) -> AblationResult:
    """Score ROME and each of ``variants`` on ``config.n`` known facts (module docstring). ``tau`` and ``seed``,
    if given, replace every variant's gate threshold and adaptor seed. Under ``torchrun`` (``world``) the facts
    are shared among the ranks and every rank gets all rows (:func:`keyscope.evaluation.evaluate.run_facts`). ``checkpoint``:
    the per-fact rows kept on disk as they come, and with ``checkpoint.resume`` a stopped run continued
    (:class:`keyscope.evaluation.evaluate.Checkpoint`, as :func:`keyscope.evaluation.evaluate.evaluate` keeps them; its spec gets
    :func:`keyscope.evaluation.evaluate.run_spec`, the variants and the configs)."""
    from keyscope.model.models import model_name

    if not variants:
        raise KeyscopeError("no ablation variant to run")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise KeyscopeError(f"ablation variant names must be distinct, not {names}")
    config = config or EvalConfig()
    overrides = {k: v for k, v in (("tau", tau), ("seed", seed)) if v is not None}
    variants = tuple(replace(v, rep=replace(v.rep, **overrides)) for v in variants)
    rome_configs = {ref: rome.ROMEConfig.for_model(model, reference=ref) for ref in (False, True)}
    start = time.perf_counter()
    negatives = next((v.rep for v in variants if v.rep.gate_negatives), None)
    context = prepare_context(model, layer, cov, ("rome+rep",) if negatives else ("rome",), facts, corpus,
                              {"rome": rome_configs[False], "rep": negatives}, config.n_corpus_negatives, config.seed,
                              config.batch_size)
    contexts = {ref: context.with_config("rome", rome_configs[ref]) for ref in (False, True)}

    def score(items):
        return score_each(items, lambda fact, queries: ablate_fact(model, fact, queries, variants, contexts,
                                                                   config.twin_cosine))

    if checkpoint is not None:
        checkpoint.describe(command="ablation", **run_spec(model, facts, layer, cov, corpus),
                            variants=[asdict(v) for v in variants], config=asdict(config),
                            rome_configs=[asdict(rome_configs[ref]) for ref in (False, True)])
    rows, skipped, n_known = run_facts(model, facts, config, context_docs, score, "ablation", progress, world=world,
                                       checkpoint=checkpoint)
    summary = summarize(rows, config.bootstrap, config.seed)
    if BASE in names:
        for name, entry in differences(rows, names, BASE, config.bootstrap, config.seed).items():
            summary[name].update(entry)
    return AblationResult(model_name(model), layer, variants, rows, summary, config, n_known,
                          time.perf_counter() - start, skipped)
