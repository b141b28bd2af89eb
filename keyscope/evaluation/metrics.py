"""The metrics of an edit, each defined once (Yan et al., "Keys to Robust Edits", Sec. 6 and Table 1; ROME's
efficacy, specificity and probability comparison, Meng et al. 2022, Sec. 3).

For an edit request with new target ``o*`` and true target ``o``, every query is a prompt that should now
complete with ``o*``; it is scored **teacher-forced** on the whole target (:func:`keyscope.analysis.predictions.score_targets`):

* a query **succeeds** when every token of ``o*`` is the top-1 prediction at its position (the target's
  tokens fed in before it), and its **probability comparison** holds when ``log P(o*) > log P(o)`` (whole
  targets; ROME's "efficacy score" as a rate);
* **Success** — the query on the edit prompt itself;
* **Rephrase**, **Shuffle**, **Shuffle-words**, **Long** — queries on the prompt with a rephrased subject, with
  its tokens shuffled, with its words shuffled, and behind a long unrelated context
  (:data:`keyscope.data.perturbations.KINDS`), each split into in-domain (``_id``: the sources REP trains on),
  out-of-domain (``_ood``) and out-of-domain without a near-twin among REP's training keys (``_ood_new``);
* **Locality** — a neighbourhood prompt (another subject, same relation) is **kept** when its teacher-forced
  top-1 tokens on its ground truth (``locality_ground_truth``, else ``o``) equal the unedited model's, token
  by token.

A :class:`QueryPlan` holds one fact's scored sequences and which metric each belongs to; :func:`score_plan`
scores it on the model as it is (edits applied) and returns ``(hits, total, prob_hits)`` per metric, which
:func:`keyscope.evaluation.evaluate.summarize` micro-averages over facts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from keyscope.analysis.predictions import TargetScores, score_targets, target_sequence
from keyscope.data.perturbations import KINDS, FactProbes

__all__ = ["DOMAINS", "METRICS", "QueryPlan", "plan_queries", "score_plan", "plan_metrics", "locality_kept", "LOCALITY", "SUCCESS"]

SUCCESS = "success"
LOCALITY = "locality"
#: The split of each perturbation kind: in-domain, out-of-domain, and out-of-domain without near-twins.
DOMAINS = ("id", "ood", "ood_new")
#: Table 1's columns.
METRICS = (SUCCESS, LOCALITY, *(f"{kind}_{domain}" for kind in KINDS for domain in DOMAINS))


@dataclass
class QueryPlan:
    """The scored sequences of one fact: each query is a pair of rows (new target, true target) in the groups
    of the metrics it counts for; ``locality`` are the rows of the neighbourhood prompts."""

    sequences: list[tuple[list[int], int]] = field(default_factory=list)
    groups: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # metric -> (row new, row true)
    locality: list[int] = field(default_factory=list)  # rows of the neighbourhood prompts

    def add(self, seq: tuple[list[int], int]) -> int:
        self.sequences.append(seq)
        return len(self.sequences) - 1

    def query(self, tokenizer, fact, metrics: Sequence[str], prompt: str) -> None:
        """A query of ``fact``'s new target (and its true one, for the probability comparison) on ``prompt``,
        counted for each of ``metrics``."""
        rows = (self.add(target_sequence(tokenizer, prompt, fact.target_new)),
                self.add(target_sequence(tokenizer, prompt, fact.target_true)))
        for metric in metrics:
            self.groups.setdefault(metric, []).append(rows)

    def neighbourhood(self, tokenizer, fact) -> None:
        """The Locality rows: ``fact``'s neighbourhood prompts with their ground truth."""
        truth = fact.locality_ground_truth or fact.target_true
        self.locality = [self.add(target_sequence(tokenizer, p, truth)) for p in fact.neighborhood_prompts]


def plan_queries(tokenizer, queries: FactProbes, twins: Mapping[tuple[str, int], float], threshold: float) -> QueryPlan:
    """Table 1's plan of one fact: Success on the edit prompt, each perturbed probe of ``queries`` in its kind's
    in- or out-of-domain column (out-of-domain probes whose near-twin cosine in ``twins`` is below
    ``threshold`` also in ``_ood_new``), and Locality on the neighbourhood prompts."""
    fact = queries.fact
    plan = QueryPlan()
    plan.query(tokenizer, fact, [SUCCESS], fact.filled_prompt)
    for kind in KINDS:
        in_domain, out_of_domain = queries.perturbed[kind]
        for probe in in_domain:
            plan.query(tokenizer, fact, [f"{kind}_id"], probe.prompt)
        for i, probe in enumerate(out_of_domain):
            new = twins.get((kind, i), -1.0) < threshold
            plan.query(tokenizer, fact, [f"{kind}_ood", *([f"{kind}_ood_new"] if new else [])], probe.prompt)
    plan.neighbourhood(tokenizer, fact)
    return plan


def score_plan(model, plan: QueryPlan, unedited_locality: Sequence, batch_size: int,
               metrics: Sequence[str] = METRICS) -> dict[str, tuple[int, int, int]]:
    """Per metric of ``metrics`` ``(hits, total, prob_hits)`` for the model as it is now (edits and hooks
    applied); ``unedited_locality`` are the unedited model's teacher-forced top-1 tokens of the Locality rows
    (``score_targets(...).argmax``)."""
    return plan_metrics(plan, score_targets(model, plan.sequences, batch_size=batch_size), unedited_locality, metrics)


def locality_kept(plan: QueryPlan, scores: TargetScores, unedited_locality: Sequence) -> list[bool]:
    """Whether each neighbourhood prompt of ``plan`` (``plan.locality``, in order) keeps the unedited top-1 tokens
    under ``scores`` (:func:`keyscope.analysis.predictions.score_targets` of ``plan.sequences``)."""
    return [scores.argmax[row] == before for row, before in zip(plan.locality, unedited_locality)]


def plan_metrics(plan: QueryPlan, scores: TargetScores, unedited_locality: Sequence,
                 metrics: Sequence[str] = METRICS) -> dict[str, tuple[int, int, int]]:
    """:func:`score_plan` of ``scores``, the teacher-forced scores of ``plan.sequences`` already computed."""
    out: dict[str, tuple[int, int, int]] = {}
    for metric in metrics:
        if metric == LOCALITY:
            kept = sum(locality_kept(plan, scores, unedited_locality))
            out[metric] = (kept, len(plan.locality), 0)
            continue
        pairs = plan.groups.get(metric, [])
        hits = sum(bool(scores.top1[new]) for new, _ in pairs)
        prob = sum(bool(scores.log_probability[new] > scores.log_probability[true]) for new, true in pairs)
        out[metric] = (hits, len(pairs), prob)
    return out
