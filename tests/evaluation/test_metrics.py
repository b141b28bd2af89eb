"""keyscope.evaluation.metrics: each metric against numbers computed by hand from hand-built teacher-forced scores, and
:func:`score_plan` on a real model against a direct teacher-forced computation from its logits."""

from __future__ import annotations

import pytest
import torch

from keyscope.analysis.predictions import TargetScores, target_sequence
from keyscope.data.datasets import Fact
from keyscope.data.perturbations import KINDS, FactProbes, Probe
from keyscope.evaluation import metrics
from keyscope.evaluation.metrics import LOCALITY, METRICS, SUCCESS, QueryPlan, plan_queries, score_plan
from keyscope.model.models import load_model
from tests import hf_tiny

# ------------------------------------------------------------------------------------ hand-computed cases

#: One row per scored sequence: (ids, n_target), log P(target), every target token top-1?, argmax tokens.
ROWS = [
    (([1, 2, 10], 1), -1.0, True, (10,)),  # 0  success, new: top-1, log P −1 > −2
    (([1, 2, 11], 1), -2.0, False, (10,)),  # 1  success, true
    (([1, 3, 10], 1), -0.5, True, (10,)),  # 2  rephrase_id #1, new: top-1, −0.5 > −3
    (([1, 3, 11], 1), -3.0, False, (10,)),  # 3  rephrase_id #1, true
    (([1, 4, 10], 1), -4.0, False, (12,)),  # 4  rephrase_id #2, new: not top-1, −4 < −1
    (([1, 4, 11], 1), -1.0, False, (12,)),  # 5  rephrase_id #2, true
    (([1, 5, 10, 13], 2), -2.0, False, (10, 14)),  # 6  rephrase_id #3, new: two tokens, only the first top-1
    (([1, 5, 11], 1), -2.0, False, (10,)),  # 7  rephrase_id #3, true: a tie, −2 = −2, is no probability hit
    (([1, 6, 10], 1), -1.5, True, (10,)),  # 8  rephrase_ood (and _ood_new), new: top-1, but −1.5 < −1
    (([1, 6, 11], 1), -1.0, False, (10,)),  # 9  rephrase_ood, true
    (([1, 7, 20], 1), -0.1, True, (20,)),  # 10 locality #1: argmax (20,) as before
    (([1, 8, 20, 21], 2), -0.1, True, (20, 22)),  # 11 locality #2: second token changed 21 → 22
    (([1, 9, 20, 21], 2), -0.1, True, (20, 21)),  # 12 locality #3: both tokens as before
]
UNEDITED_LOCALITY = [(20,), (20, 21), (20, 21)]

#: (hits, total, prob_hits) per metric, counted by hand from ROWS.
EXPECTED = {m: (0, 0, 0) for m in METRICS} | {
    SUCCESS: (1, 1, 1),
    LOCALITY: (2, 3, 0),  # rows 10 and 12 kept; row 11 keeps its first token only: not kept
    "rephrase_id": (1, 3, 1),  # row 2 top-1 (row 6 is not: its second token); P hit only row 2 (row 6 ties)
    "rephrase_ood": (1, 1, 0),
    "rephrase_ood_new": (1, 1, 0),
}


def _hand_plan(locality=(10, 11, 12)) -> tuple[QueryPlan, TargetScores]:
    plan = QueryPlan()
    for seq, *_ in ROWS:
        plan.add(seq)
    plan.groups = {SUCCESS: [(0, 1)], "rephrase_id": [(2, 3), (4, 5), (6, 7)], "rephrase_ood": [(8, 9)],
                   "rephrase_ood_new": [(8, 9)]}
    plan.locality = list(locality)
    scores = TargetScores(torch.tensor([r[1] for r in ROWS]), torch.tensor([r[2] for r in ROWS]),
                          tuple(r[3] for r in ROWS))
    return plan, scores


@pytest.fixture
def fake_scores(monkeypatch):
    """Replace the model pass of :func:`score_plan` by the hand-built scores of the plan it is given."""
    calls = []

    def install(plan: QueryPlan, scores: TargetScores) -> list:
        def score_targets(model, sequences, batch_size=32):
            assert model is None and sequences == plan.sequences and batch_size == 7
            calls.append(len(sequences))
            return scores

        monkeypatch.setattr(metrics, "score_targets", score_targets)
        return calls

    return install


def test_every_metric_equals_the_hand_count(fake_scores):
    plan, scores = _hand_plan()
    calls = fake_scores(plan, scores)
    assert score_plan(None, plan, UNEDITED_LOCALITY, 7) == EXPECTED
    assert calls == [len(ROWS)]  # one model pass for every metric
    assert set(EXPECTED) == set(METRICS) and len(METRICS) == 2 + 3 * len(KINDS)


def test_a_subset_of_metrics_and_a_fact_without_neighbourhood_prompts(fake_scores):
    plan, scores = _hand_plan(locality=())
    fake_scores(plan, scores)
    assert score_plan(None, plan, [], 7, (SUCCESS, LOCALITY)) == {SUCCESS: (1, 1, 1), LOCALITY: (0, 0, 0)}
    from keyscope.evaluation.evaluate import summarize

    out = score_plan(None, plan, [], 7)
    summary = summarize([{"case_id": 0, "methods": {"rome": out}}], n_resamples=10)["rome"]
    assert summary[LOCALITY] is None and summary["counts"][LOCALITY] == 0  # undefined, not 0 % or 100 %
    assert summary[SUCCESS] == 1.0 and summary["rephrase_id"] == pytest.approx(1 / 3)
    assert summary["prob"]["rephrase_id"] == pytest.approx(1 / 3)


def test_locality_is_compared_token_by_token(fake_scores):
    plan, scores = _hand_plan()
    fake_scores(plan, scores)
    assert score_plan(None, plan, [(20,), (20, 22), (20, 21)], 7, (LOCALITY,)) == {LOCALITY: (3, 3, 0)}
    assert score_plan(None, plan, [(21,), (22, 21), (21, 20)], 7, (LOCALITY,)) == {LOCALITY: (0, 3, 0)}


def test_plan_queries_puts_each_probe_in_its_columns():
    tokenizer = hf_tiny.word_level_tokenizer()
    fact = Fact(0, "{} is located in", "The Eiffel Tower", "Lakers.", "Slovenia.",  # words of the vocabulary
                neighborhood_prompts=("Michael Jordan is located in", "Kobe Bryant is located in"),
                locality_ground_truth="France.")
    shuffled = Probe("{} is located in", "Tower The Eiffel", "shuffle")
    rephrased = [Probe("{} is located in", s, "rephrase") for s in ("Eiffel Tower", "The Tower", "Tower")]
    perturbed = {kind: ((), ()) for kind in KINDS} | {"rephrase": ((rephrased[0],), tuple(rephrased[1:])),
                                                      "shuffle": ((), (shuffled,))}
    queries = FactProbes(fact, Probe(fact.prompt, fact.subject), perturbed, ())
    twins = {("rephrase", 0): 0.99, ("rephrase", 1): 0.2}  # shuffle 0 has no entry: no twin, new
    plan = plan_queries(tokenizer, queries, twins, 0.95)

    def rows(prompt):
        return (plan.sequences.index(target_sequence(tokenizer, prompt, "Lakers.")),
                plan.sequences.index(target_sequence(tokenizer, prompt, "Slovenia.")))

    assert plan.groups == {
        SUCCESS: [rows("The Eiffel Tower is located in")],
        "rephrase_id": [rows("Eiffel Tower is located in")],
        "rephrase_ood": [rows("The Tower is located in"), rows("Tower is located in")],
        "rephrase_ood_new": [rows("Tower is located in")],
        "shuffle_ood": [rows("Tower The Eiffel is located in")],
        "shuffle_ood_new": [rows("Tower The Eiffel is located in")],
    }
    assert [plan.sequences[r] for r in plan.locality] == [target_sequence(tokenizer, p, "France.")
                                                          for p in fact.neighborhood_prompts]
    assert len(plan.sequences) == len(set(map(str, plan.sequences))) == 2 * 5 + 2  # 5 queries, 2 neighbours


# ------------------------------------------------------------------------------------ on a real model


def _dense(model, ids: list[int], n_target: int) -> tuple[float, bool, tuple[int, ...]]:
    """log P(target), all target tokens top-1, argmax tokens: one unbatched forward pass, read by hand."""
    with torch.no_grad():
        logp = model(torch.tensor([ids]), return_type="logits")[0].double().log_softmax(-1)  # (pos, vocab)
    positions = range(len(ids) - n_target - 1, len(ids) - 1)  # the logits at t − 1 predict token t
    wanted = ids[len(ids) - n_target :]
    best = tuple(int(logp[p].argmax()) for p in positions)
    return sum(float(logp[p, t]) for p, t in zip(positions, wanted)), list(best) == list(wanted), best


def test_score_plan_equals_a_direct_teacher_forced_computation(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama"]))
    tokenizer = model.tokenizer
    fact = Fact(0, "{} is located in", "The Eiffel Tower", "Los Angeles Lakers", "Paris",
                neighborhood_prompts=("Michael Jordan is located in", "Kobe Bryant played for the"))
    perturbed = {kind: ((), ()) for kind in KINDS} | {
        "rephrase": ((Probe(fact.prompt, "Eiffel Tower", "rephrase"),), (Probe(fact.prompt, "The Tower", "rephrase"),)),
        "long": ((), (Probe("Apple A5 runs iOS. {} is located in", "The Eiffel Tower", "long"),))}
    plan = plan_queries(tokenizer, FactProbes(fact, Probe(fact.prompt, fact.subject), perturbed, ()), {}, 0.95)
    # a multi-token query whose first token is the model's top-1 and whose second is not: no success
    context = target_sequence(tokenizer, fact.filled_prompt, "Paris")[0][:-1]
    first = _dense(model, [*context, 0], 1)[2][0]
    after_first = _dense(model, [*context, first, 0], 1)[2][0]
    second = next(t for t in range(5, 50) if t != after_first)
    plan.groups["long_id"] = [(plan.add(([*context, first, second], 2)), plan.add(([*context, first], 1)))]
    dense = [_dense(model, list(ids), n) for ids, n in plan.sequences]
    assert any(n >= 2 for _, n in plan.sequences[:2])  # the new target has several tokens

    unedited = [dense[r][2] for r in plan.locality]
    assert unedited[0] != unedited[1]
    expected = {}
    for metric in METRICS:
        if metric == LOCALITY:
            expected[metric] = (2, 2, 0)  # the same model: every neighbour kept
            continue
        pairs = plan.groups.get(metric, [])
        expected[metric] = (sum(dense[new][1] for new, _ in pairs), len(pairs),
                            sum(dense[new][0] > dense[true][0] for new, true in pairs))
    assert expected["long_id"] == (0, 1, 0)  # P(first, second) < P(first) and second is not top-1
    assert dense[plan.groups["long_id"][0][1]][1]  # the first token alone is a success
    for batch_size in (1, 32):
        assert score_plan(model, plan, unedited, batch_size) == expected
    # an edited model's neighbours are compared to the unedited argmax: a different one is not kept
    changed = [tuple(t + 1 for t in unedited[0]), unedited[1]]
    assert score_plan(model, plan, changed, 32, (LOCALITY,)) == {LOCALITY: (1, 2, 0)}
