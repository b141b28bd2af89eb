from __future__ import annotations

import numpy as np
import pytest
import torch

from keyscope.analysis.keys import collect_keys
from keyscope.data.datasets import Fact
from keyscope.editing.base import make_editor, prepare_context
from keyscope.editing.request import EditRequest
from keyscope.evaluation import evaluate as ev
from keyscope.evaluation.metrics import METRICS, plan_queries, score_plan
from keyscope.model.models import load_model
from tests import hf_tiny


def test_bootstrap_interval_brackets_the_micro_average_and_narrows_with_more_facts():
    rng = np.random.default_rng(0)
    totals = rng.integers(1, 10, size=40)
    hits = rng.binomial(totals, 0.7)
    point = hits.sum() / totals.sum()
    lo, hi = ev.bootstrap_interval(hits, totals, 2000, seed=1)
    assert lo <= point <= hi and 0 < hi - lo < 0.3
    lo4, hi4 = ev.bootstrap_interval(np.tile(hits, 4), np.tile(totals, 4), 2000, seed=1)
    assert hi4 - lo4 < hi - lo
    # no prompts at all: the interval is undefined, both ends NaN (a tuple of NaNs compares unequal to anything)
    assert all(np.isnan(end) for end in ev.bootstrap_interval(np.zeros(3), np.zeros(3)))
    # the same seed gives the same interval
    assert ev.bootstrap_interval(hits, totals, 500, seed=2) == ev.bootstrap_interval(hits, totals, 500, seed=2)


def test_paired_bootstrap_interval_of_a_difference_by_hand():
    # two facts of one prompt each: A hits both, B only the second. The four equally likely resamples of two
    # facts give A − B = 1 (fact 0 twice), 0.5 (one of each, probability 1/2) and 0 (fact 1 twice).
    a, b, totals = np.array([1, 1]), np.array([0, 1]), np.array([1, 1])
    assert ev.paired_bootstrap_interval(a, totals, b, totals, 4000, seed=3) == (0.0, 1.0)
    assert ev.paired_bootstrap_interval(a, totals, b, totals, 4000, seed=3, level=0.4) == (0.5, 0.5)
    # a constant shift on every fact: every paired resample differs by exactly 2/10, while A's own interval is wide
    rng = np.random.default_rng(0)
    totals = np.full(30, 10)
    base = rng.integers(0, 8, size=30)
    lo, hi = ev.paired_bootstrap_interval(base + 2, totals, base, totals, 500, seed=1)
    assert lo == pytest.approx(0.2, abs=1e-12) and hi == pytest.approx(0.2, abs=1e-12)
    marginal = ev.bootstrap_interval(base + 2, totals, 500, seed=1)
    assert marginal[1] - marginal[0] > 0.1
    # against a base that never hits, the paired resamples are the marginal ones
    assert ev.paired_bootstrap_interval(base, totals, np.zeros(30), totals, 500, seed=1) == \
        ev.bootstrap_interval(base, totals, 500, seed=1)
    with pytest.raises(ValueError, match="same facts"):
        ev.paired_bootstrap_interval(a, np.array([1, 1]), b[:1], np.array([1]))
    assert np.isnan(ev.paired_bootstrap_interval(a, np.zeros(2), b, totals[:2])).all()


def test_summarize_micro_averages_over_prompts_not_facts():
    def scores(success, rephrase):
        return {m: (0, 0, 0) for m in METRICS} | {"success": (success, 1, success), "rephrase_id": rephrase}

    rows = [{"case_id": 0, "methods": {"rome": scores(1, (1, 1, 1))}},
            {"case_id": 1, "methods": {"rome": scores(0, (0, 9, 3))}}]
    summary = ev.summarize(rows, n_resamples=200)["rome"]
    assert summary["success"] == 0.5
    assert summary["rephrase_id"] == pytest.approx(1 / 10)  # pooled: 1 hit of 10 prompts (a macro mean is 0.5)
    assert summary["prob"]["rephrase_id"] == pytest.approx(4 / 10)
    assert summary["locality"] is None and summary["counts"]["rephrase_id"] == 10


def test_near_twin_ood_probes_count_in_ood_but_not_in_ood_new(tiny_checkpoints):
    from keyscope.analysis.covariance import KeyCovariance
    from keyscope.data.perturbations import KINDS, FactProbes, Probe
    from keyscope.editing import rep

    model = load_model(str(tiny_checkpoints["llama"]))
    layer = 1
    cov = KeyCovariance(layer, n_tokens=2000, seq_len=64, progress=False).fit(model, hf_tiny.TRAINING_TEXT * 10)
    fact = Fact(0, "{} is located in", "The Eiffel Tower", "Rome", "Paris")
    trained = Probe("{} is located in", "Eiffel Tower", "rephrase", "title")
    twin = Probe("{} is located in", "Eiffel Tower", "rephrase", "initials")  # the same prompt: cosine 1
    new = Probe("Yesterday the old market was busy . {} is located in", "Big Ben", "rephrase", "initials")
    perturbed = {kind: ((), ()) for kind in KINDS} | {"rephrase": ((trained,), (twin, new))}
    queries = FactProbes(fact, Probe("{} is located in", "The Eiffel Tower"), perturbed, ())
    twins = ev.near_twins(model, queries, layer, cov, rep.REPConfig())
    assert twins[("rephrase", 0)] == pytest.approx(1.0, abs=1e-6)
    assert twins[("rephrase", 1)] < 0.95
    plan = plan_queries(model.tokenizer, queries, twins, 0.95)
    assert len(plan.groups["rephrase_ood"]) == 2 and len(plan.groups["rephrase_ood_new"]) == 1
    assert len(plan.groups["rephrase_id"]) == 1 and "shuffle_id" not in plan.groups
    # REP also keeps the edit's prefixed keys: a probe equal to one of them is a near-twin too
    anchors = collect_keys(model, [new.prompt], [new.subject], layer)  # (1, d_mlp)
    with_anchors = ev.near_twins(model, queries, layer, cov, rep.REPConfig(), anchors)
    assert with_anchors[("rephrase", 1)] == pytest.approx(1.0, abs=1e-6)
    assert with_anchors[("rephrase", 0)] == pytest.approx(twins[("rephrase", 0)], abs=1e-12)  # the anchors are extra keys


def _one_rome_rep_fact(tiny_checkpoints):
    """A tiny ROME / ROME+REP setting of one fact: ``(model, layer, cov, fact, queries, context)``."""
    from keyscope.analysis.covariance import KeyCovariance
    from keyscope.data.perturbations import PerturbationConfig, fact_probes
    from keyscope.editing import rep, rome

    model = load_model(str(tiny_checkpoints["llama"]))
    layer = 1
    cov = KeyCovariance(layer, n_tokens=2000, seq_len=64, progress=False).fit(model, hf_tiny.TRAINING_TEXT * 10)
    fact = Fact(0, "The actress {}", "Danielle Darrieux", "Paris", "French",
                neighborhood_prompts=("The actress Michael Jordan", "The actress Kobe Bryant"),
                subject_rephrase=("Darrieux", "Danielle", "the actress Darrieux"))
    other = Fact(1, "{} is located in", "The Eiffel Tower", "Rome", "Paris")
    config = PerturbationConfig(n_shuffles=2, n_word_shuffles=2, n_long_contexts=2, long_context_tokens=20)
    queries = fact_probes(model.tokenizer, fact, iter(hf_tiny.TRAINING_TEXT * 20), config,
                          other_facts=[fact, other])
    context = prepare_context(model, layer, cov, ev.METHODS, [fact, other], list(hf_tiny.TRAINING_TEXT * 5),
                              {"rome": rome.ROMEConfig.for_model(model, v_num_grad_steps=3),
                               "rep": rep.REPConfig(steps=40)}, n_corpus_negatives=16)
    return model, layer, cov, fact, queries, context


def test_tau_groups_score_exactly_like_one_pass_per_tau(tiny_checkpoints):
    from keyscope.editing import rep, rome

    model, layer, cov, fact, queries, context = _one_rome_rep_fact(tiny_checkpoints)
    rome_config, rep_config = context.config("rome"), context.config("rep")
    taus = (0.05, 0.5, 0.95)
    editors = {m: make_editor(m, model, context) for m in ev.METHODS}
    row = ev.evaluate_fact(model, fact, queries, editors, context, taus)
    assert set(row["methods"]) == {"rome", "rome+rep", *(f"rome+rep@{t:g}" for t in taus)}
    edit = rome.compute_edit(model, EditRequest(fact.prompt, fact.subject, fact.target_new, fact.target_true),
                             layer, cov, rome_config, prefixes=context.prefixes)
    fitted = editors["rome+rep"].fit(edit, queries)
    twins = ev.near_twins(model, queries, layer, cov, rep_config, edit.prefix_keys, prefixes=context.prefixes)
    plan = plan_queries(model.tokenizer, queries, twins, 0.95)
    unedited = ev.score_targets(model, [plan.sequences[r] for r in plan.locality]).argmax
    for tau in taus:
        with rep.REPEdit(rome.ROMEEdits([edit]), {(0, layer): fitted}).applied(model, tau):
            assert score_plan(model, plan, unedited, 32) == row["methods"][f"rome+rep@{tau:g}"], tau


def test_gate_counts_by_hand():
    counts = ev.gate_counts(kept=[True, False, False, True], own=[True, True, False, False],
                            other=[False, True, False, False], adaptors=[1, 2, 0, 0], positions=[0.5, 0.25, 0, 0])
    assert counts == {"prompts": 4, "on": 2, "off": 2, "own": 2, "other": 1, "failed": 2, "kept": 2, "failed_on": 1,
                      "failed_own": 1, "failed_other": 1, "kept_on": 1, "kept_off": 1, "adaptors_failed": 2,
                      "adaptors_kept": 1, "positions_failed": 0.25, "positions_kept": 0.5}
    with pytest.raises(ValueError, match="entries"):
        ev.gate_counts([True], [True], [True], adaptors=[1, 2])
    rows = [{"case_id": 0, "methods": {"x": {m: (0, 0, 0) for m in METRICS}}, "gates": {"x": counts}},
            {"case_id": 1, "methods": {"x": {m: (0, 0, 0) for m in METRICS}, "y": {m: (0, 0, 0) for m in METRICS}},
             "gates": {"x": ev.gate_counts([False], [False], [True])}}]
    summary = ev.summarize(rows, n_resamples=10)
    assert summary["x"]["gate_locality"] == pytest.approx(3 / 5) and summary["x"]["gate_locality_other"] == 2 / 5
    assert summary["x"]["gate_locality_failed"] == 2 / 3 and summary["x"]["locality_gate_off"] == 1 / 2
    assert summary["x"]["gate_adaptors_failed"] == 2 / 3 and summary["x"]["gate_positions_kept"] == 0.25
    assert summary["y"]["gate_locality"] is None and summary["y"]["gate_counts"] is None


def test_gates_on_locality_prompts_are_attributed_to_own_and_other_requests(tiny_checkpoints):
    from contextlib import ExitStack, contextmanager

    from keyscope.analysis.keys import layer_keys
    from keyscope.editing import rep
    from keyscope.editing.base import ModelEdit
    from keyscope.evaluation.metrics import QueryPlan
    from tests.editing.test_rep import forced_adaptor

    class TwoRequests(ModelEdit):  # two requests' adaptors, nothing else
        gated = True

        def __init__(self, adaptors):
            self.adaptors, self.requests = adaptors, ("a", "b")
            self.layers = tuple(sorted({a.layer_ for _, a in adaptors}))

        @contextmanager
        def applied(self, model, tau=None):
            with ExitStack() as stack:
                for _, adaptor in self.adaptors:
                    stack.enter_context(rep.adapted(model, adaptor, tau))
                yield model

        def strength(self, keys, layer=None, request=0, tau=None):
            raise NotImplementedError

        def request_adaptors(self):
            return list(self.adaptors)

    model = load_model(str(tiny_checkpoints["llama"]))
    layer = 1
    fact = Fact(0, "The actress {}", "Danielle Darrieux", "Paris", "French",
                neighborhood_prompts=("The actress Michael Jordan", "Kobe", "The old market in the city of Rome",
                                      "The Eiffel Tower is", "The actress Kobe Bryant of the team"))
    plan = QueryPlan()
    plan.query(model.tokenizer, fact, ["success"], fact.filled_prompt)
    plan.neighbourhood(model.tokenizer, fact)
    unedited = ev.score_targets(model, [plan.sequences[r] for r in plan.locality]).argmax
    runs = [plan.sequences[r][0][:-1] for r in plan.locality]  # each Locality prompt as fed, alone (no padding)
    probe = forced_adaptor(model, layer, 0.0, seed=3)
    with torch.no_grad():
        gates = [probe.adaptor_.gate_probability(layer_keys(model, torch.tensor([ids]), None, layer).float())[0]
                 for ids in runs]  # (pos,) each, unedited keys: what the first adaptor of `layer` sees
    tau = float(torch.stack([g.max() for g in gates]).median())  # some prompts fire, some do not
    reference = [bool((g > tau).any()) for g in gates]
    share = [float((g > tau).float().mean()) for g in gates]  # of the prompt's positions
    assert 0 < sum(reference) < len(reference)
    partial = forced_adaptor(model, layer, 0.0, tau=tau, seed=3)
    edit = TwoRequests([(1, partial), (0, forced_adaptor(model, layer + 1, 50.0))])  # request 0's gate always on
    n = len(runs)
    with edit.applied(model):
        expected = score_plan(model, plan, unedited, 2)
        scores, as_first = ev._scored_with_gates(model, edit, plan, unedited, 2, own=0)  # passes of 2 runs, padded
        _, as_second = ev._scored_with_gates(model, edit, plan, unedited, 2, own=1)
    assert scores == expected
    assert as_first["own"] == n and as_first["other"] == sum(reference) and as_first["on"] == n
    assert as_second["own"] == sum(reference) and as_second["other"] == n
    assert as_first["failed"] == n - scores["locality"][0] == as_first["failed_own"]
    assert as_first["layers"][str(layer)]["other"] == sum(reference) and as_first["layers"][str(layer)]["own"] == 0
    assert as_first["layers"][str(layer + 1)]["own"] == n
    assert as_first["adaptors_failed"] + as_first["adaptors_kept"] == n + sum(reference)  # adaptors on, per prompt
    assert as_first["positions_failed"] + as_first["positions_kept"] == pytest.approx(n)  # request 0's: everywhere
    alone = as_first["layers"][str(layer)]
    assert alone["positions_failed"] + alone["positions_kept"] == pytest.approx(sum(share))
    off = TwoRequests([(0, forced_adaptor(model, layer, -50.0)), (1, forced_adaptor(model, layer + 1, -50.0, seed=1))])
    with off.applied(model):
        scores, counts = ev._scored_with_gates(model, off, plan, unedited, 32, own=0)
    assert counts["on"] == 0 and counts["off"] == n and scores["locality"] == (n, n, 0)  # gates off: unedited


def test_gate_recording_changes_no_score(tiny_checkpoints):
    model, _, _, fact, queries, context = _one_rome_rep_fact(tiny_checkpoints)
    editors = {m: make_editor(m, model, context) for m in ev.METHODS}
    edits, _ = ev.compute_edits(editors, [ev.fact_request(fact)], [queries])
    taus = (0.001, 0.5, 0.999)
    plain = ev.evaluate_fact(model, fact, queries, editors, context, taus, edits=edits, record_gates=False)
    recorded = ev.evaluate_fact(model, fact, queries, editors, context, taus, edits=edits)
    assert recorded["methods"] == plain["methods"] and "gates" not in plain
    assert set(recorded["gates"]) == {"rome+rep", *(f"rome+rep@{t:g}" for t in taus)}
    for name, counts in recorded["gates"].items():
        assert counts["prompts"] == 2 and counts["failed"] == 2 - recorded["methods"][name]["locality"][0]
    assert recorded["gates"]["rome+rep@0.999"]["on"] <= recorded["gates"]["rome+rep@0.001"]["on"]
    summary, plain_summary = ev.summarize([recorded], 50), ev.summarize([plain], 50)
    for method in summary:
        assert {m: summary[method][m] for m in METRICS} == {m: plain_summary[method][m] for m in METRICS}
    assert summary["rome"]["gate_locality"] is None and summary["rome+rep"]["gate_counts"]["prompts"] == 2
    assert recorded["gates"]["rome+rep@0.001"]["on"] > 0  # a group scored with the recording on, not skipped


def test_run_facts_share_one_context_source_and_stop_on_a_corpus_too_small(monkeypatch, recwarn):
    """Every fact of a run takes its long contexts from one source over ``context_docs`` (a list too), so no two
    share text while the corpus lasts; a corpus too small for one context stops the run with its own line rather
    than skipping every fact."""
    from types import SimpleNamespace

    from keyscope._infra.errors import EmptyCorpus
    from keyscope.data.perturbations import PerturbationConfig

    tok = hf_tiny.byte_level_bpe_tokenizer()
    facts = [Fact(case_id=i, prompt="{} works as a", subject=subject, target_new="poet", target_true="doctor")
             for i, subject in enumerate(("Ann Bea", "Cid Dee", "Eve Fay", "Gus Hal"))]
    monkeypatch.setattr(ev, "sample_known_facts", lambda model, facts, n, seed, batch_size: (list(facts)[:n], n))
    probes = PerturbationConfig(n_rephrase=0, n_shuffles=0, n_word_shuffles=0, n_long_contexts=2,
                                long_context_tokens=20, n_random=0)
    config = ev.EvalConfig(n=4, probes=probes)
    model = SimpleNamespace(tokenizer=tok)
    docs = [f"Document {i}: {text}" for i, text in enumerate(hf_tiny.TRAINING_TEXT)]  # distinct documents

    def score(items):
        return [{"case_id": f.case_id, "long": [p.template for p in q.perturbed["long"][0]]} for f, q in items], []

    rows, skipped, _ = ev.run_facts(model, facts, config, docs, score, "t", progress=False)
    contexts = [template for row in rows for template in row["long"]]
    assert not skipped and len(contexts) == len(set(contexts)) == 8 and not recwarn.list
    with pytest.raises(EmptyCorpus, match="only .* tokens of text in the 1 context documents given"):
        ev.run_facts(model, facts, config, ["Paris is big."], score, "t", progress=False)


def test_checkpoint_keeps_chunks_by_spec_and_refuses_another_runs_file(tmp_path):
    import warnings

    from keyscope._infra.distributed import ProcessRank

    rows = [{"case_id": 7, "seconds": {"rome": 0.1 + 0.2}, "methods": {"rome": {"success": (1, 1, 0)}}}]
    first = ev.Checkpoint({"context": "a"}, root=tmp_path)
    assert first.open([7, 9], 1, ProcessRank()) == {}  # a fresh run restores nothing
    first.save({0: ([7], rows, [])})
    assert first.path == tmp_path / ev.CHECKPOINT_KIND / first.path.parent.name / "rank0of1.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (ids, restored, skipped), = ev.Checkpoint({"context": "a"}, resume=True, root=tmp_path).open(
            [7, 9], 1, ProcessRank()).values()
    assert ids == [7] and skipped == []
    assert restored[0]["seconds"]["rome"] == 0.1 + 0.2  # floats exactly; tuples come back as lists
    assert restored[0]["methods"]["rome"]["success"] == [1, 1, 0]
    # another spec, another draw or another number of processes: another file, so nothing to resume, one warning
    for spec, ids, world in (({"context": "b"}, [7, 9], ProcessRank()), ({"context": "a"}, [9, 7], ProcessRank()),
                             ({"context": "a"}, [7, 9], ProcessRank(rank=0, size=2))):
        with pytest.warns(UserWarning, match="no checkpoint of this run"):
            assert ev.Checkpoint(spec, resume=True, root=tmp_path).open(ids, 1, world) == {}
    # a damaged file, or one holding another spec, is not used
    first.path.write_text("{not json")
    with pytest.warns(UserWarning, match="not used"):
        assert ev.Checkpoint({"context": "a"}, resume=True, root=tmp_path).open([7, 9], 1, ProcessRank()) == {}
    other = ev.Checkpoint({"context": "b"}, root=tmp_path)
    other.open([7, 9], 1, ProcessRank())
    other.save({0: ([7], rows, [])})
    first.path.write_text(other.path.read_text())
    with pytest.warns(UserWarning, match="written for a different run"):
        assert ev.Checkpoint({"context": "a"}, resume=True, root=tmp_path).open([7, 9], 1, ProcessRank()) == {}
    first.remove()
    assert not first.path.parent.exists()
